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
"""

from __future__ import annotations

import copy
import hashlib
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from lowdiff.augment import AUGMENT_LABELS, AugmentPipe
from lowdiff.configs import LossWeighting, ModelConfig
from lowdiff.errors import CheckpointError, ConfigError
from lowdiff.imaging import save_png, tile
from lowdiff.model import (
    CHECKPOINT_FORMAT,
    LowDiffModel,
    atomic_torch_save,
    config_from_dict,
    config_to_dict,
    load_model,
    read_checkpoint,
)
from lowdiff.precond import Denoiser
from lowdiff.sampler import upsample_condition


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


def sample_grid(model: LowDiffModel, rows: int = 10, cols: int = 10, seed0: int = 0) -> torch.Tensor:
    """A uint8 grid [C, rows·R, cols·R]: one row per class (or just seeds for unconditional models)."""
    seeds = [seed0 + i for i in range(rows * cols)]
    labels = [i // cols % max(model.config.num_classes, 1) for i in range(rows * cols)]
    images = model.generate(seeds, labels if model.config.conditional else None)
    return tile(images, rows, cols)


class Trainer:
    """Owns the network, its EMA, the optimizer and the run directory; resumable."""

    def __init__(self, config: ModelConfig, options: TrainOptions, run_dir: Path):
        self.config = config
        self.recipe = config.training
        self.options = options
        self.run_dir = run_dir
        if self.recipe.augment_p > 0 and config.network.augment_dim != AUGMENT_LABELS:
            raise ConfigError(
                f"augmentation needs a network with {AUGMENT_LABELS} augment labels; "
                f"{config.name}'s augment_dim is {config.network.augment_dim}",
                "augment_p",
            )
        torch.manual_seed(options.seed)
        self.model = LowDiffModel(config)
        self.denoiser = self.model.denoiser
        self.ema = copy.deepcopy(self.denoiser.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.denoiser.parameters(), lr=self.recipe.lr, betas=(0.9, 0.999), eps=1e-8)
        self.step = 0
        self.nimg = 0
        self.skipped_steps = 0
        self.wall_seconds = 0.0
        self.ramp_origin = 0  # nimg at which the learning-rate ramp-up (re)starts

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
        }

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        payload = read_checkpoint(self.checkpoint_path)
        if config_from_dict(payload["config"]).network != self.config.network:
            raise CheckpointError(f"{self.checkpoint_path}: it was trained with another network config", "run_dir")
        try:
            self.denoiser.net.load_state_dict(payload["state_dict"])
            self.ema.load_state_dict(payload["ema_state_dict"])
            self.optimizer.load_state_dict(payload["optimizer"])
            state = payload["train_state"]
            self.step, self.nimg = int(state["step"]), int(state["nimg"])
            self.skipped_steps, self.wall_seconds = int(state["skipped_steps"]), float(state["wall_seconds"])
            self.ramp_origin = int(state.get("ramp_origin", 0))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{self.checkpoint_path}: not a resumable training checkpoint ({type(exc).__name__})", "run_dir"
            ) from None
        return True

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
        if keep_count:
            meta = source.metadata
            self.step = int(meta.get("step", 0))
            self.nimg = self.ramp_origin = int(meta.get("training_images", 0))
            self.wall_seconds = float(meta.get("wall_seconds", 0.0))

    def ema_model(self) -> LowDiffModel:
        model = LowDiffModel(self.config)
        model.denoiser.net.load_state_dict(self.ema.state_dict())
        model.metadata = self.metadata()
        return model

    def batch_indices(self, step: int, num_images: int) -> torch.Tensor:
        """The global batch of ``step``: ``batch_size`` indices into the training set, with replacement."""
        gen = step_generator(self.options.seed, step, "data")
        return torch.randint(0, num_images, (self.recipe.batch_size,), generator=gen)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[int, float] | None:
        """One optimizer step on a batch; returns per-resolution mean losses, or None if the step was
        skipped (a non-finite loss or gradient)."""
        recipe = self.recipe
        batch = images.shape[0]
        self.denoiser.train()
        gen = step_generator(self.options.seed, self.step, "noise")
        draws = draw_step(self.denoiser, batch, images.shape[1], self.config.resolutions, gen, recipe.augment_p)
        augment_labels = None
        if draws.augment is not None:
            images, augment_labels = AugmentPipe.apply(images, draws.augment)
        self.optimizer.zero_grad(set_to_none=True)
        total, per_res = per_image_loss(
            self.denoiser, images, labels, self.config.resolutions, draws, recipe.loss_weighting, augment_labels
        )
        (total.sum() / batch).backward()
        params = [p for p in self.denoiser.parameters() if p.grad is not None]
        finite = bool(torch.stack([p.grad.isfinite().all() for p in params]).all()) if params else False
        if not finite:
            # EDM zeroes non-finite gradient elements (nan_to_num) and steps anyway; a whole step is
            # skipped here instead, so one bad batch never moves the weights at all.
            self.skipped_steps += 1
            return None
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
        return {r: float(v.detach().mean()) for r, v in per_res.items()}

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, log: TextIO = sys.stderr) -> bool:
        """Train to ``total_kimg``; returns True if stopped early by SIGINT/SIGTERM (after saving).

        The checkpoint is written atomically every ``checkpoint_every`` steps, every
        ``checkpoint_minutes`` of wall time, at the end, and on a stop signal, so an interrupted run
        loses at most the step in progress."""
        opts = self.options
        if opts.threads:
            torch.set_num_threads(opts.threads)
        total = int(opts.total_kimg * 1000)
        n = images.shape[0]
        (self.run_dir / "grids").mkdir(parents=True, exist_ok=True)
        window_start, window_images = time.perf_counter(), 0
        last_time = last_save = time.perf_counter()
        with _stop_signals() as stop:
            while self.nimg < total and not stop:
                idx = self.batch_indices(self.step, n)
                batch_labels = labels[idx] if labels is not None else None
                per_res = self.train_step(images[idx], batch_labels)
                now = time.perf_counter()
                self.wall_seconds += now - last_time
                last_time = now
                window_images += len(idx)
                if per_res is not None and self.step % opts.log_every == 0:
                    rate = window_images / max(now - window_start, 1e-9)
                    self._log_progress(per_res, total, rate, log)
                    window_start, window_images = now, 0
                due = self.step and self.step % opts.checkpoint_every == 0
                if due or now - last_save > opts.checkpoint_minutes * 60:
                    self.save()
                    last_save = time.perf_counter()
                if opts.grid_every and self.step and self.step % opts.grid_every == 0:
                    save_png(sample_grid(self.ema_model()), self.run_dir / "grids" / f"step{self.step:07d}.png")
                    last_time = time.perf_counter()  # grid time is not training time
            self.save()
            if stop:
                return True
        if opts.grid_every:
            save_png(sample_grid(self.ema_model()), self.run_dir / "grids" / "final.png")
        return False

    def _log_progress(self, per_res: dict[int, float], total: int, rate: float, log: TextIO) -> None:
        eta = (total - self.nimg) / max(rate, 1e-9)
        frac = self.nimg / total
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        losses = " ".join(f"{r}:{v:.4f}" for r, v in per_res.items())
        print(
            f"[{bar}] {self.nimg / 1000:7.1f}/{total / 1000:.0f} kimg  step {self.step}  "
            f"loss {losses}  {rate:5.1f} img/s  eta {eta / 60:5.1f} min"
            + (f"  skipped {self.skipped_steps}" if self.skipped_steps else ""),
            file=log,
            flush=True,
        )


class _StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def _stop_signals() -> Iterator[_StopFlag]:
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
