"""Model and engine loading from settings, shared by ``lowdiff serve`` and the app's background load."""

from __future__ import annotations

from lowdiff.model import CheckpointError, LowDiffModel
from service.settings import ServeSettings, SettingsError


def load_model(settings: ServeSettings) -> LowDiffModel:
    """--checkpoint, else --config (random weights), else the embedded default; errors name the flag."""
    if settings.config is not None:
        try:
            return LowDiffModel.from_config(settings.config)
        except ValueError as exc:
            raise SettingsError(f"--config: {exc}") from None
    try:
        return LowDiffModel.load(settings.checkpoint)
    except CheckpointError as exc:
        raise SettingsError(f"--checkpoint: {exc}") from None
