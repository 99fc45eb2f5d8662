"""The small KL autoencoder a latent config generates in: training it, its file, and encoding a dataset.

A latent model (``fashion32-latent``) is three steps, each a command: ``lowdiff train-autoencoder``
(:class:`AutoencoderTrainer`, then :func:`finish_autoencoder`), ``lowdiff encode-latents``
(:func:`encode_dataset`), then ``lowdiff train --autoencoder AE.pt`` on the latents, which puts this
autoencoder's decoder and statistics into every checkpoint of the run.

Loss: L1 reconstruction plus a small KL term, LDM's autoencoder loss without its perceptual (LPIPS) and
adversarial parts — LPIPS needs ImageNet-trained VGG weights and is made for natural RGB images, and a
GAN doubles the cost and the ways a short CPU run can fail. L1 rather than L2: L2's optimum on an
uncertain edge is the average of the candidates, a grey blur, while L1's is their median, so edges and
the flat black background (most of a Fashion-MNIST image) come out sharper; it is also LDM's pixel term.
Both terms are summed over an image and averaged over the batch (LDM's reduction), so ``kl_weight``
compares with LDM's 1e-6. The default 1e-4 is larger because there are only 256 latent values and the
diffusion model must be able to land near them: the KL term keeps the latents' scale bounded and the
posterior's variance above zero, so that the decoder learns to tolerate latents a little off the
encoder's means (what a diffusion model's samples are). It stays small: reconstruction dominates.
Decoding samples the posterior during training (the reparameterisation); encoding for statistics and
for the diffusion model's data takes the posterior's mean, as LightningDiT's feature extraction does.

Randomness follows :mod:`lowdiff.training`: step k's images and posterior noise come from generators
seeded by (seed, k), so a resumed run continues exactly. The run folder holds ``checkpoint.pt``
(weights, Adam, counts; written atomically); the final file, written by :func:`finish_autoencoder`,
holds the weights with the per-channel latent mean and std over the training images (the
normalisation the diffusion model sees), the autoencoder's config, the padding and size of the images
it encodes, and what it was trained on with its held-out reconstruction error.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from lowdiff.autoencoder import AutoencoderConfig, KLAutoencoder
from lowdiff.errors import CheckpointError, SettingsError
from lowdiff.hashing import file_sha256
from lowdiff.model import atomic_torch_save, autoencoder_config_from_dict, check_weights
from lowdiff.progress import Progress
from lowdiff.training import step_generator, stop_signals

AUTOENCODER_FORMAT = "lowdiff-autoencoder-v1"  # the final file (what encode-latents and train read)
TRAINING_FORMAT = "lowdiff-autoencoder-training-v1"  # a run folder's resumable checkpoint
MAX_PAD = 64
MAX_IMAGE_RESOLUTION = 4096


@dataclass(frozen=True)
class AutoencoderRecipe:
    """How the autoencoder is trained; stored in the run's checkpoint, so a resumed run keeps it."""

    batch_size: int = 64
    lr: float = 5e-4  # Adam; a small conv net with GroupNorm trains stably here without a warm-up
    kl_weight: float = 1e-4  # see the module docstring
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SettingsError(f"must be ≥ 1, got {self.batch_size}", "batch_size")
        if not 0 < self.lr < math.inf:
            raise SettingsError(f"must be a finite number > 0, got {self.lr}", "lr")
        if not 0 <= self.kl_weight < math.inf:
            raise SettingsError(f"must be a finite number ≥ 0, got {self.kl_weight}", "kl_weight")


@dataclass
class AutoencoderRunOptions:
    """How one run goes (not part of the recipe: a resumed run may change them)."""

    total_kimg: float = 60.0
    log_every: int = 20
    checkpoint_every: int = 250  # steps
    checkpoint_minutes: float = 10.0


@dataclass
class AutoencoderFile:
    """A trained autoencoder as :func:`load_autoencoder` read it."""

    autoencoder: KLAutoencoder  # eval mode, latent statistics loaded
    pad: int  # black border added to each side of the dataset's images before encoding
    image_resolution: int  # the side of the (padded) images it encodes
    metadata: dict[str, Any]
    sha256: str
    path: Path


def autoencoder_loss(
    autoencoder: KLAutoencoder, images: torch.Tensor, noise: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, float, float]:
    """(loss, L1 per pixel, KL per image) of a batch: L1 of the decoded posterior sample, summed over each
    image, plus ``kl_weight`` × the KL divergence of the posterior from N(0, I), both averaged over the batch."""
    mean, logvar = autoencoder.encode_moments(images)
    z = mean + (0.5 * logvar).exp() * noise
    reconstruction = autoencoder.decode(z)
    l1 = (reconstruction - images).abs().flatten(1).sum(dim=1).mean()
    kl = (0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)).flatten(1).sum(dim=1).mean()
    return l1 + kl_weight * kl, float(l1.detach()) / images[0].numel(), float(kl.detach())


class AutoencoderTrainer:
    """Owns the autoencoder, its Adam state and the run folder; resumable. One process, CPU or one GPU."""

    def __init__(
        self,
        config: AutoencoderConfig,
        recipe: AutoencoderRecipe,
        options: AutoencoderRunOptions,
        run_dir: Path,
        *,
        name: str,
        pad: int,
        image_resolution: int,
        device: str = "cpu",
    ):
        self.config = config
        self.recipe = recipe
        self.options = options
        self.run_dir = run_dir
        self.name = name  # the latent config it is trained for (a label in the files)
        self.pad = pad
        self.image_resolution = image_resolution
        self.device = torch.device(device)
        torch.manual_seed(recipe.seed)
        self.autoencoder = KLAutoencoder(config).to(self.device)
        self.optimizer = torch.optim.Adam(self.autoencoder.parameters(), lr=recipe.lr)
        self.step = 0
        self.nimg = 0
        self.skipped_steps = 0
        self.wall_seconds = 0.0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def iteration(self) -> int:
        """Steps attempted (taken + skipped): what a step's draws are keyed by."""
        return self.step + self.skipped_steps

    def save(self) -> None:
        atomic_torch_save(
            {
                "format": TRAINING_FORMAT,
                "name": self.name,
                "autoencoder": asdict(self.config),
                "pad": self.pad,
                "image_resolution": self.image_resolution,
                "recipe": asdict(self.recipe),
                "state_dict": self.autoencoder.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "train_state": {
                    "step": self.step,
                    "nimg": self.nimg,
                    "skipped_steps": self.skipped_steps,
                    "wall_seconds": self.wall_seconds,
                },
            },
            self.checkpoint_path,
        )

    @staticmethod
    def stored_recipe(checkpoint: Path) -> AutoencoderRecipe:
        """The recipe a run folder's checkpoint was started with (a resumed run continues with it)."""
        payload = _read_training_checkpoint(checkpoint)
        try:
            return AutoencoderRecipe(**payload["recipe"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{checkpoint}: no usable recipe ({type(exc).__name__})", "run_dir") from None

    def resume(self) -> bool:
        """Continue from the run folder's checkpoint (False if there is none)."""
        if not self.checkpoint_path.exists():
            return False
        payload = _read_training_checkpoint(self.checkpoint_path)
        try:
            stored = autoencoder_config_from_dict(payload["autoencoder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.checkpoint_path}: invalid autoencoder config ({exc})", "run_dir") from None
        if stored != self.config or payload.get("pad") != self.pad:
            raise CheckpointError(
                f"{self.checkpoint_path}: it was trained with another autoencoder config or padding", "run_dir"
            )
        try:
            self.autoencoder.load_state_dict(payload["state_dict"])
            self.optimizer.load_state_dict(payload["optimizer"])
            state = payload["train_state"]
            self.step, self.nimg = int(state["step"]), int(state["nimg"])
            self.skipped_steps, self.wall_seconds = int(state["skipped_steps"]), float(state["wall_seconds"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{self.checkpoint_path}: not a resumable autoencoder checkpoint ({type(exc).__name__})", "run_dir"
            ) from None
        return True

    def train_step(self, images: torch.Tensor) -> tuple[float, float] | None:
        """One Adam step on ``images`` (the whole batch); (L1 per pixel, KL per image), or None if skipped
        for a non-finite gradient (the weights do not move at all; the next step draws afresh)."""
        self.autoencoder.train()
        gen = step_generator(self.recipe.seed, self.iteration, "noise", self.device)
        side = images.shape[-1] // self.config.downsampling
        noise = torch.randn(images.shape[0], self.config.z_channels, side, side, generator=gen, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss, l1, kl = autoencoder_loss(self.autoencoder, images.to(self.device), noise, self.recipe.kl_weight)
        loss.backward()
        params = [p for p in self.autoencoder.parameters() if p.grad is not None]
        if not bool(torch.stack([p.grad.isfinite().all() for p in params]).all()):
            self.skipped_steps += 1
            return None
        self.optimizer.step()
        self.step += 1
        self.nimg += images.shape[0]
        return l1, kl

    def batch_indices(self, num_images: int) -> torch.Tensor:
        """This step's images (with replacement), drawn from (seed, step) alone as the diffusion trainer draws."""
        gen = step_generator(self.recipe.seed, self.iteration, "data")
        return torch.randint(0, num_images, (self.recipe.batch_size,), generator=gen)

    def fit(self, images: torch.Tensor, log: TextIO | None = sys.stderr) -> bool:
        """Train to ``total_kimg`` images; True if stopped early by SIGINT/SIGTERM (after saving).

        The checkpoint is written every ``checkpoint_every`` steps, every ``checkpoint_minutes`` and at
        the end, so an interrupted run loses at most the step in progress."""
        opts = self.options
        total = int(opts.total_kimg * 1000)
        last_time = last_save = time.perf_counter()
        progress = Progress(total, f"training the autoencoder of {self.name}", "img", stream=log, initial=self.nimg)
        stopped = False
        with stop_signals() as stop, progress:
            while self.nimg < total and not stopped:
                figures = self.train_step(images[self.batch_indices(len(images))])
                now = time.perf_counter()
                self.wall_seconds += now - last_time
                last_time = now
                stopped = bool(stop)
                shown: dict[str, Any] = {"step": self.step}
                if figures is not None and self.step % opts.log_every == 0:
                    shown.update(l1=figures[0], kl=figures[1])
                if self.skipped_steps:
                    shown["skipped"] = self.skipped_steps
                progress.update(self.recipe.batch_size, **shown)
                if (
                    self.step and self.step % opts.checkpoint_every == 0
                ) or now - last_save > opts.checkpoint_minutes * 60:
                    self.save()
                    last_save = time.perf_counter()
            self.save()
        return stopped


def _read_training_checkpoint(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})", "run_dir") from None
    if not isinstance(payload, dict) or payload.get("format") != TRAINING_FORMAT:
        raise CheckpointError(f"{path}: not an autoencoder training checkpoint (missing format tag)", "run_dir")
    return payload


@torch.no_grad()
def posterior_means(
    autoencoder: KLAutoencoder, images: torch.Tensor, batch: int = 256, log: TextIO | None = None, desc: str = ""
) -> torch.Tensor:
    """The posterior's mean (raw, not normalised) for each image, in batches, float32 on the CPU."""
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    out = []
    with Progress(len(images), desc or "encoding", "img", stream=log) as progress:
        for start in range(0, len(images), batch):
            part = images[start : start + batch].to(device)
            out.append(autoencoder.encode_moments(part)[0].float().cpu())
            progress.update(len(part))
    return torch.cat(out)


def latent_statistics(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [1, C, 1, 1] over images and positions (float64 sums, float32 result)."""
    x = means.double().transpose(0, 1).flatten(1)  # [C, N·H·W]
    mean = x.mean(dim=1)
    std = (x.square().mean(dim=1) - mean.square()).clamp_min(0).sqrt()
    shape = (1, -1, 1, 1)
    return mean.float().reshape(shape), std.float().clamp_min(1e-6).reshape(shape)


@torch.no_grad()
def reconstruction_error(
    autoencoder: KLAutoencoder, images: torch.Tensor, batch: int = 256, log: TextIO | None = None
) -> dict[str, float]:
    """Mean L1 and MSE per pixel (images in [−1, 1]) of decode(posterior mean), and the PSNR in dB on
    the [0, 1] scale: how much of the images the latents keep."""
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    l1 = se = 0.0
    with Progress(len(images), "held-out reconstruction", "img", stream=log) as progress:
        for start in range(0, len(images), batch):
            part = images[start : start + batch].to(device)
            recon = autoencoder.decode(autoencoder.encode_moments(part)[0]).clamp(-1, 1)
            l1 += float((recon - part).abs().double().sum())
            se += float((recon - part).square().double().sum())
            progress.update(len(part))
    count = images.numel()
    mse = se / count
    psnr = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf
    return {"l1": round(l1 / count, 6), "mse": round(mse, 6), "psnr_db": round(psnr, 3)}


def finish_autoencoder(
    trainer: AutoencoderTrainer,
    train_images: torch.Tensor,
    held_out: torch.Tensor,
    out: Path,
    metadata: dict[str, Any],
    log: TextIO | None = sys.stderr,
    batch: int = 256,
) -> dict[str, Any]:
    """Latent statistics over ``train_images``, reconstruction error on ``held_out``, and the final file.

    Returns the metadata written (``metadata`` plus the training counts, statistics and errors)."""
    ae = trainer.autoencoder
    means = posterior_means(ae, train_images, batch, log, "latent statistics")
    mean, std = latent_statistics(means)
    with torch.no_grad():
        ae.latent_mean.copy_(mean.to(ae.latent_mean.device))
        ae.latent_std.copy_(std.to(ae.latent_std.device))
    # The posterior's spread against the latents' spread: near 0, the latents are deterministic codes;
    # a few per cent, the decoder was trained on latents that far off the means.
    with torch.no_grad():
        sample = train_images[: min(len(train_images), 1024)].to(next(ae.parameters()).device)
        logvar = ae.encode_moments(sample)[1]
        posterior_std = float(((0.5 * logvar).exp() / ae.latent_std).mean())
    errors = reconstruction_error(ae, held_out, batch, log) if len(held_out) else {}
    written = dict(metadata) | {
        "config": trainer.name,
        "step": trainer.step,
        "training_images": trainer.nimg,
        "wall_seconds": round(trainer.wall_seconds, 1),
        "recipe": asdict(trainer.recipe),
        "loss": "L1 (sum over pixels) + kl_weight · KL (sum over latent elements), batch mean",
        "train_images": len(train_images),
        "held_out_images": len(held_out),
        "held_out_reconstruction": errors,
        "latent_mean": [round(v, 6) for v in mean.flatten().tolist()],
        "latent_std": [round(v, 6) for v in std.flatten().tolist()],
        "posterior_std_over_latent_std": round(posterior_std, 6),
    }
    save_autoencoder(ae, out, trainer.pad, trainer.image_resolution, written)
    return written


def save_autoencoder(
    autoencoder: KLAutoencoder, path: Path, pad: int, image_resolution: int, metadata: dict[str, Any]
) -> None:
    """The final file (atomic): config, weights with the latent statistics, image geometry, metadata."""
    atomic_torch_save(
        {
            "format": AUTOENCODER_FORMAT,
            "autoencoder": asdict(autoencoder.config),
            "state_dict": {k: v.detach().cpu() for k, v in autoencoder.state_dict().items()},
            "pad": pad,
            "image_resolution": image_resolution,
            "metadata": metadata,
        },
        path,
    )


def load_autoencoder(path: Path, field: str = "autoencoder") -> AutoencoderFile:
    """Read a file :func:`save_autoencoder` wrote, as data (``weights_only``), trusting nothing in it: the
    config's keys and ranges, every tensor's name and shape, finite weights, a positive latent std, a
    sane padding and size. Every problem is one :class:`CheckpointError` naming ``field`` and the file."""
    if not path.is_file():
        raise CheckpointError(f"autoencoder file not found: {path}", field)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not an autoencoder file"
        raise CheckpointError(f"{path}: not a readable weights-only .pt file ({type(exc).__name__})", field) from None
    if not isinstance(payload, dict) or payload.get("format") != AUTOENCODER_FORMAT:
        raise CheckpointError(
            f"{path}: not a LowDiff autoencoder file (no {AUTOENCODER_FORMAT!r} tag; `lowdiff train-autoencoder` "
            "writes one)",
            field,
        )
    try:
        config = autoencoder_config_from_dict(payload.get("autoencoder"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid autoencoder config ({exc})", field) from None
    autoencoder = KLAutoencoder(config)
    weights = payload.get("state_dict")
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{path}: holds no weights (state_dict)", field)
    try:
        check_weights(path, weights, autoencoder.state_dict(), "its autoencoder config")
    except CheckpointError as exc:
        raise exc.for_field(field) from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: tensor {bad[0]!r} is not finite", field)
    if not bool((weights["latent_std"] > 0).all()):
        raise CheckpointError(f"{path}: the latent statistics' std must be positive", field)
    pad, side = payload.get("pad"), payload.get("image_resolution")
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad <= MAX_PAD:
        raise CheckpointError(f"{path}: pad must be an integer in [0, {MAX_PAD}], got {pad!r}", field)
    down = config.downsampling
    if not isinstance(side, int) or isinstance(side, bool) or not down <= side <= MAX_IMAGE_RESOLUTION or side % down:
        raise CheckpointError(
            f"{path}: image_resolution must be a multiple of {down} in [{down}, {MAX_IMAGE_RESOLUTION}], got {side!r}",
            field,
        )
    metadata = payload.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a dict, got {type(metadata).__name__}", field)
    autoencoder.load_state_dict(weights)
    return AutoencoderFile(autoencoder.eval(), pad, side, dict(metadata), file_sha256(path), path)


def encode_dataset(
    source: AutoencoderFile, images: torch.Tensor, batch: int = 256, log: TextIO | None = None
) -> torch.Tensor:
    """Images prepared as the autoencoder was trained on them → normalised latents (posterior means,
    (z − mean) / std · multiplier): what ``lowdiff train`` on a latent config reads."""
    means = posterior_means(source.autoencoder, images, batch, log, "encoding")
    with torch.no_grad():
        return source.autoencoder.normalize(means).float().contiguous()


def with_overrides(recipe: AutoencoderRecipe, **changes: Any) -> AutoencoderRecipe:
    """``recipe`` with the given (non-None) fields changed: what the command's flags do."""
    return replace(recipe, **{k: v for k, v in changes.items() if v is not None})
