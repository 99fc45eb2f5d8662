"""Runtimes that execute the cascade: one stage runner per resolution, one shared schedule.

:class:`CascadeEngine` is what callers (the CLI, the benchmark, the HTTP service) hold: a model's
cascade bound to one runtime, loaded and warmed once. Each runtime provides stage runners
(:class:`lowdiff.sampler.StageRunner`); the cascade loop itself is always
:func:`lowdiff.sampler.run_cascade`, driven by the model's :class:`~lowdiff.schedule.CascadeSchedule`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lowdiff.model import LowDiffModel
from lowdiff.sampler import StageCallback, StageRunner

ENGINE_KINDS = ("torch",)


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

    @property
    def config_name(self) -> str:
        return self.model.config.name

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
        }


def load_engine(
    model: LowDiffModel,
    kind: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
) -> CascadeEngine:
    """Bind ``model`` to runtime ``kind``; a runtime this machine lacks raises :class:`EngineUnavailable`."""
    if kind == "torch":
        from engines.torch_eager import torch_runners

        return CascadeEngine(model, torch_runners(model, device, precision), kind, device, precision)
    raise ValueError(f"unknown engine {kind!r}; available: {', '.join(ENGINE_KINDS)}")
