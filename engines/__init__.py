"""Runtimes that execute the cascade: one stage runner per resolution, one shared schedule.

:class:`CascadeEngine` is what callers (the CLI, the benchmark, the HTTP service) hold: a model's
cascade bound to one runtime, loaded and warmed once. Each runtime provides stage runners
(:class:`lowdiff.sampler.StageRunner`); the cascade loop itself is always
:func:`lowdiff.sampler.run_cascade`, driven by the model's :class:`~lowdiff.schedule.CascadeSchedule`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowdiff.model import LowDiffModel
from lowdiff.sampler import StageCallback, StageRunner

# torch: PyTorch eager (CPU/CUDA). cudagraph: PyTorch with each stage captured as CUDA graphs (GPU).
# onnxruntime: the exported per-stage ONNX graphs (CPU EP; CUDA/TensorRT EPs on a GPU).
# tensorrt: per-stage TensorRT engines (GPU; written against the docs, never run here).
ENGINE_KINDS = ("torch", "cudagraph", "onnxruntime", "tensorrt")


class EngineUnavailable(RuntimeError):
    """The requested runtime is not usable on this machine (missing library or device)."""


class CascadeEngine:
    def __init__(
        self,
        model: LowDiffModel,
        runners: Mapping[int, StageRunner],
        kind: str,
        device: str,
        precision: str,
    ):
        missing = set(model.config.resolutions) - set(runners)
        if missing:
            raise ValueError(f"engine {kind!r} has no runner for stage(s) {sorted(missing)}")
        self.model = model
        self.runners = dict(runners)
        self.kind = kind
        self.device = device
        self.precision = precision
        self.engine_dir: str | None = None
        self.scratch: tempfile.TemporaryDirectory | None = None

    def generate(
        self,
        seeds: Sequence[int],
        class_labels: Sequence[int] | None = None,
        on_stage: StageCallback | None = None,
    ) -> torch.Tensor:
        """uint8 images [B, C, R, R]; image i depends only on (class_labels[i], seeds[i])."""
        return self.model.generate(seeds, class_labels, runners=self.runners, on_stage=on_stage)

    def warmup(self, batch_size: int = 1) -> None:
        labels = [0] * batch_size if self.model.config.conditional else None
        self.generate(list(range(batch_size)), labels)

    def info(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "model": config.name,
            "engine": self.kind,
            "device": self.device,
            "precision": self.precision,
            "resolutions": list(config.resolutions),
            "nfe_per_stage": list(config.schedule.nfe),
            "schedule": config.schedule.to_dict(),
            "conditional": config.conditional,
            "num_classes": config.num_classes,
            "image_channels": config.network.img_channels,
            "checkpoint_sha256": self.model.metadata.get("checkpoint_sha256"),
            "engine_dir": self.engine_dir,
        }


def load_engine(
    model: LowDiffModel,
    kind: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    *,
    engine_dir: str | Path | None = None,
    threads: int | None = None,
    warmup: bool = False,
) -> CascadeEngine:
    """Bind ``model`` to runtime ``kind``; a runtime this machine lacks raises :class:`EngineUnavailable`.

    ``engine_dir`` is an exported folder (`lowdiff export`) for ``onnxruntime`` and ``tensorrt``;
    without one, ``onnxruntime`` exports the model's stages into a private temporary folder first
    (TensorRT engines take minutes to build, so ``tensorrt`` needs a prebuilt folder). ``threads``
    sets ONNX Runtime's intra-op threads (default: torch's). With ``warmup`` the engine
    runs one batch-1 cascade before it is returned, so the first real request pays no set-up cost.
    """
    if kind == "torch":
        from engines.torch_eager import torch_runners

        engine = CascadeEngine(model, torch_runners(model, device, precision), kind, device, precision)
    elif kind == "cudagraph":
        from engines.cudagraph import cudagraph_runners

        engine = CascadeEngine(model, cudagraph_runners(model, device, precision), kind, device, precision)
    elif kind == "onnxruntime":
        from engines.onnxruntime_engine import onnxruntime_runners, providers_for

        providers_for(device)  # fail on a missing runtime or provider before spending time on export
        scratch = None
        if engine_dir is None:
            from export.onnx_stages import export_onnx

            scratch = tempfile.TemporaryDirectory(prefix=f"lowdiff-onnx-{model.config.name}-")
            export_onnx(model, scratch.name)
            runners = onnxruntime_runners(model, scratch.name, device, precision, threads)
        else:
            runners = onnxruntime_runners(model, engine_dir, device, precision, threads)
        engine = CascadeEngine(model, runners, kind, device, precision)
        engine.scratch = scratch  # the temporary export lives (and is removed) with the engine
    elif kind == "tensorrt":
        from engines.tensorrt_engine import tensorrt_runners

        if engine_dir is None:
            raise ValueError("engine 'tensorrt' needs engine_dir: build one with `lowdiff export --format tensorrt`")
        engine = CascadeEngine(model, tensorrt_runners(model, engine_dir, device, precision), kind, device, precision)
    else:
        raise ValueError(f"unknown engine {kind!r}; available: {', '.join(ENGINE_KINDS)}")
    engine.engine_dir = None if engine_dir is None else str(engine_dir)
    if warmup:
        engine.warmup()
    return engine
