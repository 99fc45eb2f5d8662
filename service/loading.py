"""Model and engine loading from settings, shared by ``lowdiff serve`` and the app's background load."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lowdiff.model import CheckpointError, LowDiffModel, default_checkpoint_path
from service.settings import ServeSettings, SettingsError


def load_model(settings: ServeSettings) -> LowDiffModel:
    """--checkpoint, else --config (random weights), else the embedded default; errors name the flag."""
    if settings.config is not None:
        try:
            return LowDiffModel.from_config(settings.config)
        except ValueError as exc:
            raise SettingsError(f"--config: {exc}") from None
    if settings.checkpoint is None and not default_checkpoint_path().is_file():
        raise SettingsError(
            f"--checkpoint: the embedded default model is not installed ({default_checkpoint_path()}); "
            "pass --checkpoint PATH"
        )
    try:
        return LowDiffModel.load(settings.checkpoint)
    except CheckpointError as exc:
        raise SettingsError(f"--checkpoint: {exc}") from None


def engine_kwargs(load_engine: Callable[..., Any], settings: ServeSettings) -> dict[str, Any]:
    """Keyword arguments for ``engines.load_engine`` as this build's signature accepts them.

    ``--engine-dir`` is passed through only if the loader takes it; asking for it from a loader
    that does not is an error rather than a silent fallback to another runtime.
    """
    kwargs: dict[str, Any] = {"kind": settings.engine, "device": settings.device, "precision": settings.precision}
    accepted = inspect.signature(load_engine).parameters
    if settings.engine_dir is not None:
        if "engine_dir" not in accepted:
            raise SettingsError("--engine-dir: this build's engine loader takes no engine folder")
        kwargs["engine_dir"] = settings.engine_dir
    if settings.threads and "threads" in accepted:  # e.g. ONNX Runtime's intra-op threads
        kwargs["threads"] = settings.threads
    return kwargs
