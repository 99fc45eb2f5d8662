"""A LowDiff model as users hold it: config + preconditioned network, checkpoint I/O, generation."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lowdiff.configs import ModelConfig, get_config
from lowdiff.network import NetworkConfig, UnifiedUNet
from lowdiff.precond import Denoiser
from lowdiff.sampler import FunctionStage, StageCallback, StageRunner, run_cascade, to_uint8
from lowdiff.schedule import CascadeSchedule

DEFAULT_CHECKPOINT_NAME = "fashion32.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a LowDiff checkpoint."""


def default_checkpoint_path() -> Path:
    return Path(str(resources.files("lowdiff") / "weights" / DEFAULT_CHECKPOINT_NAME))


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    net = asdict(config.network)
    net.pop("extra", None)
    return {
        "name": config.name,
        "network": net,
        "schedule": config.schedule.to_dict(),
        "preconditioning": config.preconditioning,
        "pad": config.pad,
        "description": config.description,
    }


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    net = dict(data["network"])
    for key in ("resolutions", "channel_mult", "attn_resolutions"):
        net[key] = tuple(net[key])
    return ModelConfig(
        name=data["name"],
        network=NetworkConfig(**net),
        schedule=CascadeSchedule.from_dict(data["schedule"]),
        preconditioning=data["preconditioning"],
        pad=data.get("pad", 0),
        description=data.get("description", ""),
    )


class TorchStage:
    """A stage function backed by the PyTorch denoiser (eager)."""

    def __init__(self, denoiser: Denoiser, resolution: int):
        self.denoiser = denoiser
        self.resolution = resolution

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.denoiser(x, sigma, class_labels, self.resolution, condition, sigma_cond)


class LowDiffModel:
    def __init__(self, config: ModelConfig, denoiser: Denoiser | None = None):
        self.config = config
        if denoiser is None:
            denoiser = Denoiser(UnifiedUNet(config.network), kind=config.preconditioning)
        self.denoiser = denoiser.eval()
        self.metadata: dict[str, Any] = {}

    @classmethod
    def from_config(cls, name: str) -> LowDiffModel:
        return cls(get_config(name))

    @property
    def schedule(self) -> CascadeSchedule:
        return self.config.schedule

    def with_schedule(self, schedule: CascadeSchedule) -> LowDiffModel:
        if schedule.resolutions != self.config.resolutions:
            raise ValueError(
                f"schedule resolutions {schedule.resolutions} differ from the model's {self.config.resolutions}"
            )
        other = LowDiffModel(replace(self.config, schedule=schedule), self.denoiser)
        other.metadata = self.metadata
        return other

    def stage_runners(self) -> dict[int, StageRunner]:
        """Eager PyTorch on the CPU, fp32: the reference every engine is compared with."""
        return {r: FunctionStage(TorchStage(self.denoiser, r)) for r in self.config.resolutions}

    def check_labels(self, class_labels: Sequence[int] | None, count: int) -> torch.Tensor | None:
        if not self.config.conditional:
            if class_labels is not None and any(c is not None for c in class_labels):
                raise ValueError("class_label: this model is unconditional and takes no class label")
            return None
        if class_labels is None or len(class_labels) != count:
            raise ValueError("class_label: a class label is required for every image")
        for c in class_labels:
            if not 0 <= int(c) < self.config.num_classes:
                raise ValueError(f"class_label: {c} is out of range 0…{self.config.num_classes - 1}")
        return torch.tensor([int(c) for c in class_labels], dtype=torch.long)

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        class_labels: Sequence[int] | None = None,
        runners: Mapping[int, StageRunner] | None = None,
        on_stage: StageCallback | None = None,
    ) -> torch.Tensor:
        """uint8 images [B, C, R, R] for the given seeds (and class labels)."""
        labels = self.check_labels(class_labels, len(seeds))
        runners = runners if runners is not None else self.stage_runners()
        x = run_cascade(self.schedule, runners, seeds, labels, self.config.network.img_channels, on_stage)
        return to_uint8(x)

    # --- checkpoints ---
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        payload = {
            "format": "lowdiff-checkpoint-v1",
            "config": config_to_dict(self.config),
            "state_dict": self.denoiser.net.state_dict(),
            "metadata": self.metadata,
        }
        if extra:
            payload.update(extra)
        atomic_torch_save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path | None = None) -> LowDiffModel:
        """Load a checkpoint (EMA weights); no path = the embedded default model."""
        path = Path(path) if path is not None else default_checkpoint_path()
        payload = read_checkpoint(path)
        config = config_from_dict(payload["config"])
        model = cls(config)
        weights = payload.get("ema_state_dict", payload["state_dict"])
        try:
            model.denoiser.net.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit config {config.name!r}: {exc}") from None
        model.metadata = dict(payload.get("metadata", {}))
        model.metadata["checkpoint_sha256"] = file_sha256(path)
        model.metadata["checkpoint_path"] = str(path)
        return model


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable LowDiff checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != "lowdiff-checkpoint-v1":
        raise CheckpointError(f"{path}: not a LowDiff checkpoint (missing format tag)")
    return payload


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
