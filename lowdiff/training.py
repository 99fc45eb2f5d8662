"""Training (paper §3.4, Algorithm 1): one denoising loss per resolution, summed.

For the lowest resolution the loss is unconditional. For each higher resolution r the clean image
is downsampled to the previous resolution, perturbed with independent noise (truncation
augmentation), upsampled back to r and concatenated to the noisy input. Each resolution's forward
pass runs only its sub-network, so its loss reaches only the parameters that sub-network uses.
Single-resolution (EDM baseline) configs train with the same code: one loss, no condition.

The recipe (batch, learning rate and its ramp-up, EMA, clipping, loss weighting, augmentation) is the
config's :class:`~lowdiff.configs.TrainingRecipe`: EDM's for the paper configs. Each resolution's loss
is reduced as EDM reduces it — summed over the image's pixels, averaged over the batch — weighted per
the recipe's ``loss_weighting``. Augmentation (EDM's, :mod:`lowdiff.augment`) is applied to the
full-resolution image before the resolutions are cut from it, and its labels go to every stage.

Randomness: every random draw of step k (which images, σ, noise, augmentation) comes from generators
seeded by (seed, k) alone, drawn for the whole batch at once. A step therefore depends only on the
weights and the step number, which is what makes a resumed run continue exactly.

Many devices (``torchrun … -m lowdiff train``): data-parallel with torch.distributed (DDP). Every rank
draws the same global batch of indices and the same global draws, takes its own slice of both, and
DDP averages the gradients of per-rank losses scaled so that the sum is the global batch's mean: the
step is the single-process step on the same global batch, whatever the number of ranks or of
gradient-accumulation rounds (``batch_gpu``), up to floating-point summation order (and dropout, whose
masks come from each rank's own generator). Only rank 0 logs, writes grids and checkpoints; the
checkpoint holds global counts only, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowdiff.augment import AUGMENT_LABELS, AugmentPipe
from lowdiff.autoencoder import KLAutoencoder, LatentDecoder
from lowdiff.configs import LossWeighting, ModelConfig
from lowdiff.errors import CheckpointError, ConfigError, SettingsError
from lowdiff.flow_training import flow_cascade_loss
from lowdiff.imaging import save_png, tile
from lowdiff.model import (
    AUTOENCODER_WEIGHTS,
    CHECKPOINT_FORMAT,
    LowDiffModel,
    TorchStage,
    atomic_torch_save,
    config_from_dict,
    config_to_dict,
    load_model,
    read_checkpoint,
)
from lowdiff.precond import Denoiser
from lowdiff.progress import Progress
from lowdiff.requests import check_class_labels, labels_tensor
from lowdiff.sampler import FunctionStage, generate_images, upsample_condition


@dataclass
class TrainOptions:
    """How one run goes (the recipe itself — batch, lr, EMA, … — is the config's ``training``)."""

    total_kimg: float = 200.0  # training images, thousands
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 500  # steps
    checkpoint_minutes: float = 10.0  # also save after this much wall time since the last save
    grid_every: int = 1000  # steps; 0 = never
    threads: int = 0  # 0 = torch's default
    device: str = "cpu"  # "cpu" or "cuda" (under torchrun: this rank's cuda:LOCAL_RANK)
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; weights, optimizer and EMA stay fp32)
    batch_gpu: int = 0  # images per forward/backward on one device (EDM's batch_gpu); 0 = the rank's whole share
    workers: int = 0  # DataLoader worker processes


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """What torchrun (or any launcher following its convention) put in the environment."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise SettingsError("WORLD_SIZE, RANK and LOCAL_RANK must be integers", None) from None
        if world < 1 or not 0 <= rank < world:
            raise SettingsError(f"RANK {rank} outside WORLD_SIZE {world}", None)
        return cls(rank, world, local)

    def device(self, kind: str) -> torch.device:
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise SettingsError("CUDA is not available on this machine", "device")
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPUs); torchrun provides the rendezvous."""
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def downsample(x: torch.Tensor, resolution: int) -> torch.Tensor:
    factor = x.shape[-1] // resolution
    return F.avg_pool2d(x, factor) if factor > 1 else x


def step_generator(seed: int, step: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's ``stream`` ("data", "noise"): seeded from (seed, step, stream) only."""
    digest = hashlib.sha256(f"lowdiff-train:{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class StepDraws:
    """Every random draw of one training step for a whole batch: σ and noise per resolution, the
    condition's σ and noise per conditioned resolution, augmentation parameters. Slicing it gives
    a part of the batch exactly the draws it would have had in the whole."""

    sigma: list[torch.Tensor]  # [B] per resolution
    noise: list[torch.Tensor]  # [B, C, r, r] per resolution
    sigma_cond: list[torch.Tensor | None]  # [B] per resolution (None for the first)
    noise_cond: list[torch.Tensor | None]  # [B, C, r_prev, r_prev] per resolution (None for the first)
    augment: torch.Tensor | None  # [B, 8] augmentation parameters, None = no augmentation

    def slice(self, start: int, stop: int) -> StepDraws:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return StepDraws(
            [t[start:stop] for t in self.sigma],
            [t[start:stop] for t in self.noise],
            [cut(t) for t in self.sigma_cond],
            [cut(t) for t in self.noise_cond],
            cut(self.augment),
        )


def draw_step(
    denoiser: Denoiser,
    batch: int,
    channels: int,
    resolutions: tuple[int, ...],
    generator: torch.Generator | None,
    augment_p: float = 0.0,
) -> StepDraws:
    """All of a step's draws for ``batch`` images, in one fixed order (augmentation, then per resolution)."""
    device = generator.device if generator is not None else torch.device("cpu")
    augment = AugmentPipe(augment_p).sample(batch, generator, device) if augment_p > 0 else None
    draws = StepDraws([], [], [], [], augment)
    for k, res in enumerate(resolutions):
        draws.sigma.append(denoiser.sample_training_sigma(batch, generator))
        draws.noise.append(torch.randn(batch, channels, res, res, generator=generator, device=device))
        if k == 0:
            draws.sigma_cond.append(None)
            draws.noise_cond.append(None)
        else:
            low = resolutions[k - 1]
            draws.sigma_cond.append(denoiser.sample_training_sigma(batch, generator))
            draws.noise_cond.append(torch.randn(batch, channels, low, low, generator=generator, device=device))
    return draws


def per_image_loss(
    denoiser: Denoiser,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    resolutions: tuple[int, ...],
    draws: StepDraws,
    weighting: LossWeighting = "pixels",
    augment_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(loss per image [B], {resolution: loss per image [B]}): EDM's weighted loss summed over pixels
    (``"pixels"``) or averaged over them (``"equal"``), summed over resolutions."""
    total = images.new_zeros(images.shape[0])
    per_resolution: dict[int, torch.Tensor] = {}
    for k, res in enumerate(resolutions):
        target = downsample(images, res)
        sigma = draws.sigma[k]
        noisy = target + draws.noise[k] * sigma[:, None, None, None]
        condition = sigma_cond = None
        if k > 0:
            sigma_cond, noise_cond = draws.sigma_cond[k], draws.noise_cond[k]
            assert sigma_cond is not None and noise_cond is not None
            low = downsample(images, resolutions[k - 1]) + noise_cond * sigma_cond[:, None, None, None]
            condition = upsample_condition(low, res)
        denoised = denoiser(noisy, sigma, labels, res, condition, sigma_cond, augment_labels)
        weight = denoiser.loss_weight(sigma)[:, None, None, None]
        loss = (weight * (denoised - target) ** 2).flatten(1).sum(dim=1)
        if weighting == "equal":
            loss = loss / target[0].numel()
        per_resolution[res] = loss
        total = total + loss
    return total, per_resolution


def cascade_loss(
    denoiser: Denoiser,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    resolutions: tuple[int, ...],
    generator: torch.Generator | None = None,
    weighting: LossWeighting = "pixels",
) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean over the batch of :func:`per_image_loss` with fresh draws (no augmentation), and the
    per-resolution means — for evaluating a loss outside the training loop."""
    draws = draw_step(denoiser, images.shape[0], images.shape[1], resolutions, generator)
    total, per_res = per_image_loss(denoiser, images, labels, resolutions, draws, weighting)
    return total.mean(), {r: float(v.detach().mean()) for r, v in per_res.items()}


def sample_grid(
    model: LowDiffModel, rows: int = 10, cols: int = 10, seed0: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """A uint8 grid [C, rows·R, cols·R]: one row per class (or just seeds for unconditional models).

    With ``device`` the sampler runs there (a GPU run's grids take seconds, not CPU minutes); the images
    are the same as on the CPU up to the device's arithmetic."""
    seeds = [seed0 + i for i in range(rows * cols)]
    labels = [i // cols % max(model.config.num_classes, 1) for i in range(rows * cols)]
    if device is None or device.type == "cpu" or model.config.latent:  # latent grids: decoded on the CPU
        images = model.generate(seeds, labels if model.config.conditional else None)
    else:
        checked = labels_tensor(
            check_class_labels(model.config, labels if model.config.conditional else None, len(seeds))
        )
        denoiser = model.denoiser.to(device)
        runners = {r: FunctionStage(TorchStage(denoiser, r, device), device) for r in model.config.resolutions}
        images = generate_images(model.schedule, runners, seeds, checked, model.config.network.img_channels)
    return tile(images, rows, cols)


class _StepLoss(nn.Module):
    """The cascade loss of a batch as one module call, so DDP sees one forward per backward."""

    def __init__(self, denoiser: Denoiser, resolutions: tuple[int, ...], weighting: LossWeighting):
        super().__init__()
        self.denoiser = denoiser
        self.resolutions = resolutions
        self.weighting = weighting

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        draws: StepDraws,
        augment_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return per_image_loss(self.denoiser, images, labels, self.resolutions, draws, self.weighting, augment_labels)


class _StepBatches(torch.utils.data.Sampler[list[int]]):
    """Endless batches of indices for one rank: step k's global batch is drawn from (seed, k) alone,
    and this rank gets its contiguous slice of it."""

    def __init__(self, trainer: Trainer, num_images: int, start: int):
        super().__init__()
        self.seed, self.batch = trainer.options.seed, trainer.recipe.batch_size
        self.num_images, self.start = num_images, start
        self.share, self.offset = trainer.share, trainer.offset

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            gen = step_generator(self.seed, step, "data")
            idx = torch.randint(0, self.num_images, (self.batch,), generator=gen)
            yield idx[self.offset : self.offset + self.share].tolist()
            step += 1


class _Images(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        self.images = images
        self.labels = labels if labels is not None else torch.zeros(len(images), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class Trainer:
    """Owns the network, its EMA, the optimizer and the run directory; resumable, on any number of ranks."""

    def __init__(
        self, config: ModelConfig, options: TrainOptions, run_dir: Path, distributed: Distributed | None = None
    ):
        self.config = config
        self.recipe = config.training
        self.options = options
        self.run_dir = run_dir
        self.dist = distributed or Distributed()
        if self.recipe.augment_p > 0 and config.network.augment_dim != AUGMENT_LABELS:
            raise ConfigError(
                f"augmentation needs a network with {AUGMENT_LABELS} augment labels; "
                f"{config.name}'s augment_dim is {config.network.augment_dim}",
                "augment_p",
            )
        if options.precision not in PRECISIONS:
            raise SettingsError(f"expected one of {', '.join(PRECISIONS)}, got {options.precision!r}", "precision")
        world = self.dist.world
        if self.recipe.batch_size % world:
            raise SettingsError(
                f"the batch of {self.recipe.batch_size} does not split evenly over {world} processes", "batch_size"
            )
        if config.latent and world > 1:
            raise SettingsError("latent (flow) configs train in one process for now", "config")
        self.share = self.recipe.batch_size // world  # this rank's images per step
        self.offset = self.dist.rank * self.share
        self.batch_gpu = options.batch_gpu or self.share
        if self.share % self.batch_gpu:
            raise SettingsError(
                f"each process's {self.share} images per step do not split into rounds of {self.batch_gpu}", "batch_gpu"
            )
        self.device = self.dist.device(options.device)
        torch.manual_seed(options.seed)  # the same initial weights on every rank
        self.model = LowDiffModel(config)
        self.denoiser = self.model.denoiser.to(self.device)
        self.ema = copy.deepcopy(self.denoiser.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.denoiser.parameters(), lr=self.recipe.lr, betas=(0.9, 0.999), eps=1e-8)
        torch.manual_seed(options.seed + self.dist.rank)  # dropout masks: each rank its own
        self.loss = _StepLoss(self.denoiser, config.resolutions, self.recipe.loss_weighting)
        self.loss_ddp: nn.Module = self.loss
        if world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_ddp = DistributedDataParallel(self.loss, device_ids=device_ids)
        self.step = 0
        self.nimg = 0
        self.skipped_steps = 0
        self.wall_seconds = 0.0
        self.ramp_origin = 0  # nimg at which the learning-rate ramp-up (re)starts
        self.autoencoder_sha256: str | None = None  # a latent run's autoencoder file (kept in the metadata)

    @property
    def iteration(self) -> int:
        """Steps attempted (taken + skipped): what a step's draws are keyed by."""
        return self.step + self.skipped_steps

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save(self) -> None:
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": config_to_dict(self.config),
                "state_dict": self.denoiser.net.state_dict(),
                "ema_state_dict": self.ema.state_dict(),
                **({} if self.model.decoder is None else {AUTOENCODER_WEIGHTS: self.model.decoder.state_dict()}),
                "optimizer": self.optimizer.state_dict(),
                "metadata": self.metadata(),
                "train_state": {
                    "step": self.step,
                    "nimg": self.nimg,
                    "skipped_steps": self.skipped_steps,
                    "wall_seconds": self.wall_seconds,
                    "ramp_origin": self.ramp_origin,
                    "options": asdict(self.options),
                },
            },
            self.checkpoint_path,
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "config": self.config.name,
            "step": self.step,
            "training_images": self.nimg,
            "wall_seconds": round(self.wall_seconds, 1),
            "batch_size": self.recipe.batch_size,
            "lr": self.recipe.lr,
            "ema_halflife_kimg": self.recipe.ema_halflife_kimg,
        } | ({} if self.autoencoder_sha256 is None else {"autoencoder_sha256": self.autoencoder_sha256})

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            self._check_same_state()
            return False
        payload = read_checkpoint(self.checkpoint_path)
        if config_from_dict(payload["config"]).network != self.config.network:
            raise CheckpointError(f"{self.checkpoint_path}: it was trained with another network config", "run_dir")
        try:
            self.denoiser.net.load_state_dict(payload["state_dict"])
            self.ema.load_state_dict(payload["ema_state_dict"])
            self.optimizer.load_state_dict(payload["optimizer"])
            if self.model.decoder is not None:  # a latent run's autoencoder travels with it
                self.model.decoder.load_state_dict(payload[AUTOENCODER_WEIGHTS])
            state = payload["train_state"]
            self.step, self.nimg = int(state["step"]), int(state["nimg"])
            self.skipped_steps, self.wall_seconds = int(state["skipped_steps"]), float(state["wall_seconds"])
            self.ramp_origin = int(state.get("ramp_origin", 0))
            source = payload.get("metadata", {}).get("autoencoder_sha256")
            self.autoencoder_sha256 = source if isinstance(source, str) else None
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{self.checkpoint_path}: not a resumable training checkpoint ({type(exc).__name__})", "run_dir"
            ) from None
        self._check_same_state()
        return True

    def _check_same_state(self) -> None:
        """Every rank must have resumed the same step (the run folder on storage every node shares)."""
        if self.dist.world == 1:
            return
        counts = torch.tensor([self.iteration, -self.iteration], dtype=torch.int64, device=self._collective_device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if int(counts[0]) != -int(counts[1]):
            raise CheckpointError(
                f"the processes resumed from different steps ({-int(counts[1])}…{int(counts[0])}): "
                "the run folder must be on storage that every node shares",
                "run_dir",
            )

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def init_from(self, path: Path, keep_count: bool = False) -> None:
        """Warm start: network and EMA from a checkpoint's weights (EMA if it has one); fresh optimizer.

        For continuing from an inference checkpoint such as the embedded model, which carries no
        optimizer state; the learning-rate ramp-up runs again (from the starting point). With
        ``keep_count`` the step and training-image counters continue from the checkpoint's metadata,
        so a run that lost its training checkpoint can be continued to an exact total budget."""
        try:
            source = load_model(path)
        except CheckpointError as exc:
            raise exc.for_field("init_from") from None
        if source.config.network != self.config.network:
            raise CheckpointError(f"{path}: it was trained with another network config", "init_from")
        weights = source.denoiser.net.state_dict()
        self.denoiser.net.load_state_dict(weights)
        self.ema.load_state_dict(weights)
        if self.model.decoder is not None and source.decoder is not None:
            self.model.decoder.load_state_dict(source.decoder.state_dict())  # the latents' own autoencoder
            source_sha = source.metadata.get("autoencoder_sha256")
            self.autoencoder_sha256 = source_sha if isinstance(source_sha, str) else None
        if keep_count:
            meta = source.metadata
            self.step = int(meta.get("step", 0))
            self.nimg = self.ramp_origin = int(meta.get("training_images", 0))
            self.wall_seconds = float(meta.get("wall_seconds", 0.0))

    def use_autoencoder(self, autoencoder: KLAutoencoder, sha256: str | None = None) -> None:
        """A fresh latent run's decode stage: the decoder and latent statistics of the trained autoencoder
        whose (normalised) latents the run trains on, so that every checkpoint it writes decodes to images.

        Without this a fresh latent run would carry a randomly initialised decoder (LowDiffModel's
        default), and its checkpoints would sample noise however well the DiT trained."""
        if self.model.decoder is None:
            raise SettingsError(f"{self.config.name} is a pixel config; only latent configs take one", "autoencoder")
        if autoencoder.config != self.config.autoencoder:
            raise CheckpointError(
                f"the file's autoencoder ({autoencoder.config}) is not the one {self.config.name} is built for "
                f"({self.config.autoencoder})",
                "autoencoder",
            )
        decoder = LatentDecoder.from_autoencoder(autoencoder)
        self.model.decoder.load_state_dict(decoder.state_dict())
        self.autoencoder_sha256 = sha256

    def ema_model(self) -> LowDiffModel:
        model = LowDiffModel(self.config, decoder=self.model.decoder)
        model.denoiser.net.load_state_dict({k: v.cpu() for k, v in self.ema.state_dict().items()})
        model.metadata = self.metadata()
        return model

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[int, float] | None:
        """One optimizer step on this rank's share of the global batch (the whole batch in one process).

        Returns the per-resolution mean losses of this rank's images, or None if the step was skipped (a
        non-finite gradient, the same decision on every rank since gradients are all-reduced)."""
        if self.config.latent:
            return self._flow_step(images, labels)
        recipe, device = self.recipe, self.device
        share = images.shape[0]
        batch = share * self.dist.world
        self.denoiser.train()
        gen = step_generator(self.options.seed, self.iteration, "noise", device)
        draws = draw_step(self.denoiser, batch, images.shape[1], self.config.resolutions, gen, recipe.augment_p)
        draws = draws.slice(self.offset, self.offset + share) if self.dist.world > 1 else draws
        images = images.to(device, non_blocking=True)
        labels = None if labels is None else labels.to(device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        rounds = max(share // self.batch_gpu, 1)
        sums: dict[int, torch.Tensor] = {}
        for k in range(rounds):
            part = slice(k * share // rounds, (k + 1) * share // rounds)
            x, y = images[part], None if labels is None else labels[part]
            d = draws.slice(part.start, part.stop)
            augment_labels = None
            if d.augment is not None:
                x, augment_labels = AugmentPipe.apply(x, d.augment)
            elif self.config.network.augment_dim:  # zeros = "not augmented"; keeps map_augment in DDP's graph
                augment_labels = torch.zeros(x.shape[0], self.config.network.augment_dim, device=device)
            last = k == rounds - 1
            sync = nullcontext() if last or self.loss_ddp is self.loss else self.loss_ddp.no_sync()
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.options.precision == "bf16")
            with sync:
                with autocast:
                    total, per_res = self.loss_ddp(x, y, d, augment_labels)
                # DDP averages over ranks, so each rank's sum is scaled by world/batch: the gradient is
                # that of the global batch's mean loss.
                (total.float().sum() * (self.dist.world / batch)).backward()
            for r, v in per_res.items():
                sums[r] = sums.get(r, 0) + v.detach().float().sum()
        if not self._update(batch):
            return None
        return {r: float(v) / share for r, v in sums.items()}

    def _flow_step(self, latents: torch.Tensor, labels: torch.Tensor | None) -> dict[int, float] | None:
        """A latent config's step: the flow loss of :mod:`lowdiff.flow_training` on a batch of normalised
        latents (one process, one round), then the same update as a pixel step (skip, clip, ramp, EMA)."""
        self.denoiser.train()
        gen = step_generator(self.options.seed, self.iteration, "noise", self.device)
        latents = latents.to(self.device, non_blocking=True)
        labels = None if labels is None else labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.precision == "bf16")
        with autocast:
            total, per_res = flow_cascade_loss(self.denoiser, self.config, latents, labels, gen)
        total.float().backward()
        return per_res if self._update(latents.shape[0]) else None

    def _update(self, batch: int) -> bool:
        """After the backward pass: skip a non-finite step (False), else clip, ramp the learning rate,
        step the optimizer and the EMA (True)."""
        recipe = self.recipe
        params = [p for p in self.denoiser.parameters() if p.grad is not None]
        finite = bool(torch.stack([p.grad.isfinite().all() for p in params]).all()) if params else False
        if not finite:
            # EDM zeroes non-finite gradient elements (nan_to_num) and steps anyway; a whole step is
            # skipped here instead, so one bad batch never moves the weights at all.
            self.skipped_steps += 1
            return False
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        ramp = max(recipe.lr_rampup_kimg * 1000, 1)
        for group in self.optimizer.param_groups:
            group["lr"] = recipe.lr * min(1.0, (self.nimg - self.ramp_origin + 1) / ramp)
        self.optimizer.step()
        self.step += 1
        self.nimg += batch
        halflife = recipe.ema_halflife_kimg * 1000
        if recipe.ema_rampup_ratio:
            halflife = min(halflife, self.nimg * recipe.ema_rampup_ratio)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.denoiser.net.parameters()):
                p_ema.lerp_(p.detach(), 1 - beta)
        return True

    def loader(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.utils.data.DataLoader:
        """This rank's batches from the step being resumed on: workers and pinned memory on a GPU."""
        workers = self.options.workers
        return torch.utils.data.DataLoader(
            _Images(images, labels),
            batch_sampler=_StepBatches(self, len(images), self.iteration),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, log: TextIO | None = sys.stderr) -> bool:
        """Train to ``total_kimg``; returns True if stopped early by SIGINT/SIGTERM (after saving).

        The checkpoint is written atomically (rank 0) every ``checkpoint_every`` steps, every
        ``checkpoint_minutes`` of wall time, at the end, and on a stop signal, so an interrupted run
        loses at most the step in progress. A signal on any rank stops every rank after the same step."""
        opts = self.options
        main = self.dist.main
        log = log if main else None
        if opts.threads:
            torch.set_num_threads(opts.threads)
        total = int(opts.total_kimg * 1000)
        if main and opts.grid_every:
            (self.run_dir / "grids").mkdir(parents=True, exist_ok=True)
        last_time = last_save = time.perf_counter()
        batches = iter(self.loader(images, labels))
        stopping = False
        progress = Progress(total, f"training {self.config.name}", "img", stream=log, initial=self.nimg)
        with stop_signals() as stop, progress:
            while self.nimg < total and not stopping:
                batch_images, batch_labels = next(batches)
                per_res = self.train_step(batch_images, batch_labels if labels is not None else None)
                now = time.perf_counter()
                self.wall_seconds += now - last_time
                last_time = now
                stopping = self._agree(bool(stop))
                figures: dict[str, Any] = {"step": self.step}
                if per_res is not None and self.step % opts.log_every == 0:
                    per_res = self._mean_over_ranks(per_res)
                    figures.update({f"loss{r}": v for r, v in per_res.items()})
                    if self.skipped_steps:
                        figures["skipped"] = self.skipped_steps
                progress.update(self.recipe.batch_size, **figures)
                due = self.step and self.step % opts.checkpoint_every == 0
                if main and (due or now - last_save > opts.checkpoint_minutes * 60):
                    self.save()
                    last_save = time.perf_counter()
                if main and opts.grid_every and self.step and self.step % opts.grid_every == 0:
                    grid = sample_grid(self.ema_model(), device=self.device)
                    save_png(grid, self.run_dir / "grids" / f"step{self.step:07d}.png")
                    last_time = time.perf_counter()  # grid time is not training time
            if main:
                self.save()
            if stopping:
                return True
        if main and opts.grid_every:
            save_png(sample_grid(self.ema_model(), device=self.device), self.run_dir / "grids" / "final.png")
        return False

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any (one all-reduce per step; nothing in one process)."""
        if self.dist.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _mean_over_ranks(self, per_res: dict[int, float]) -> dict[int, float]:
        if self.dist.world == 1:
            return per_res
        t = torch.tensor(list(per_res.values()), dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return {r: float(v) / self.dist.world for r, v in zip(per_res, t)}


class _StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_signals() -> Iterator[_StopFlag]:
    """SIGINT/SIGTERM set a flag that the training loop checks after each step (main thread only)."""
    flag = _StopFlag()

    def handler(signum: int, _frame: object) -> None:
        flag.signal = signum

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers, the loop runs to its end
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
