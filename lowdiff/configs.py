"""Built-in model configurations: network shape, preconditioning and the cascade schedule.

The paper's schedules (Tables 2, 3, 6, 7, 11, 12). σ ranges follow appendix C: the first (unconditional)
stage uses EDM's 0.002…80; conditioned stages use the narrower 0.01…50. Where the paper gives
only a stage's NFE, N and t are chosen to reproduce it (see :mod:`lowdiff.schedule`) and to hand
off at a moderate noise level (σ_t ≈ 0.4–2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from lowdiff.autoencoder import AutoencoderConfig
from lowdiff.dit import DiTConfig
from lowdiff.errors import ConfigError
from lowdiff.network import NetworkConfig
from lowdiff.precond import Preconditioning
from lowdiff.schedule import CascadeSchedule, FlowStageSchedule, StageSchedule

NARROW = {"sigma_min": 0.01, "sigma_max": 50.0}  # appendix C, conditioned stages

LossWeighting = Literal["pixels", "equal"]


@dataclass(frozen=True)
class TrainingRecipe:
    """How a config is trained; `lowdiff train` takes its defaults from here (flags override them).

    The defaults are EDM's CIFAR-10 recipe (train.py/training_loop.py), which the paper keeps for its
    models (§4.1: "all training hyperparameters … are retained"). ``loss_weighting`` says how the
    per-resolution losses of the cascade add up: ``"pixels"`` reduces each as EDM does (sum over the
    image's pixels, mean over the batch), so resolutions weigh in proportion to their pixel counts
    (192 : 768 : 3072 for CIFAR's 8/16/32) — what training every stage with "the same loss as the
    baseline" gives; ``"equal"`` takes each resolution's mean over pixels (1 : 1 : 1), the recipe the
    embedded fashion32 was trained with. ``grad_clip`` 0 = none (EDM clips nothing; non-finite steps
    are skipped instead). ``augment_p`` is EDM's augmentation probability (0 = off; needs a network
    with ``augment_dim`` for the non-leaking augment labels).
    """

    batch_size: int = 512
    lr: float = 1e-3
    lr_rampup_kimg: float = 10_000.0
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float = 0.05
    grad_clip: float = 0.0
    loss_weighting: LossWeighting = "pixels"
    augment_p: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_weighting not in ("pixels", "equal"):
            raise ConfigError(f"expected 'pixels' or 'equal', got {self.loss_weighting!r}", "loss_weighting")
        if not 0.0 <= self.augment_p <= 1.0:
            raise ConfigError(f"augmentation probability must be in [0, 1], got {self.augment_p}", "augment_p")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be ≥ 1, got {self.batch_size}", "batch_size")
        for name in ("lr", "lr_rampup_kimg", "ema_halflife_kimg", "ema_rampup_ratio", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"must be ≥ 0, got {getattr(self, name)}", name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# EDM's CIFAR-10 recipe (batch 512, lr 1e-3, EMA half-life 500 kimg with ramp 0.05, lr ramp 10 Mimg,
# no clipping, augmentation p = 0.12) and its FFHQ-64 one (batch 256, lr 2e-4, p = 0.15: EDM's README).
EDM_CIFAR_RECIPE = TrainingRecipe(augment_p=0.12)
EDM_FFHQ_RECIPE = TrainingRecipe(batch_size=256, lr=2e-4, augment_p=0.15)
# The small CPU recipe the embedded fashion32 (and edm-fashion32) were trained with, and what a
# checkpoint written before configs carried a recipe was trained with: batch 64, lr ramp 10 kimg,
# EMA half-life 20 kimg (ramp 0.1), clipping at 1, each resolution's loss a mean over pixels.
SMALL_CPU_RECIPE = TrainingRecipe(
    batch_size=64,
    lr=1e-3,
    lr_rampup_kimg=10.0,
    ema_halflife_kimg=20.0,
    ema_rampup_ratio=0.1,
    grad_clip=1.0,
    loss_weighting="equal",
    augment_p=0.0,
)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    network: NetworkConfig | DiTConfig
    schedule: CascadeSchedule
    # EDMPrecond, as the paper's models (§4.1: "SongUNet and EDMPrecond … under the VP setting" — in
    # EDM, "VP" names the DDPM++ architecture; its released cifar10-32x32-cond-vp is EDMPrecond).
    preconditioning: Preconditioning = "edm"
    pad: int = 0  # pixels of black border added to each side of the dataset's images
    description: str = ""
    class_names: tuple[str, ...] = ()  # one per class label (empty: the labels are only numbers)
    training: TrainingRecipe = field(default_factory=TrainingRecipe)
    # A latent model's autoencoder (architecture, latent multiplier): its decoder is the pipeline's
    # last stage, so a latent model always has one and a pixel model never.
    autoencoder: AutoencoderConfig | None = None

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"{len(self.class_names)} class names for {self.num_classes} classes", "class_names")
        is_flow = self.preconditioning == "flow"
        if is_flow != isinstance(self.network, DiTConfig) or is_flow != self.schedule.flow:
            raise ConfigError(
                f"{self.name}: a DiT network, 'flow' preconditioning and flow stages go together, and only together",
                "preconditioning",
            )
        if is_flow != (self.autoencoder is not None):
            raise ConfigError(
                f"{self.name}: a latent model needs its autoencoder (the decode stage), a pixel model has none",
                "autoencoder",
            )
        if self.autoencoder is not None and self.autoencoder.z_channels != self.network.img_channels:
            raise ConfigError(
                f"{self.name}: the autoencoder's {self.autoencoder.z_channels} latent channels ≠ the network's "
                f"{self.network.img_channels}",
                "autoencoder",
            )
        if self.training.augment_p > 0 and self.network.augment_dim == 0:
            raise ConfigError(
                f"augmentation (p = {self.training.augment_p}) needs a network with augment labels; "
                f"{self.name}'s has augment_dim 0",
                "augment_p",
            )

    def with_training(self, **changes: Any) -> ModelConfig:
        """This config with some training-recipe fields changed (what `lowdiff train`'s flags do)."""
        return replace(self, training=replace(self.training, **changes))

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.network.resolutions

    @property
    def latent(self) -> bool:
        """A latent (DiT, rectified-flow) model: it generates autoencoder latents, not pixels."""
        return isinstance(self.network, DiTConfig)

    @property
    def image_resolution(self) -> int:
        """The side of the images the model's pipeline returns (decoded, for a latent model)."""
        if self.autoencoder is None:
            return self.network.img_resolution
        return self.autoencoder.image_resolution(self.network.img_resolution)

    @property
    def image_channels(self) -> int:
        return self.network.img_channels if self.autoencoder is None else self.autoencoder.out_channels

    @property
    def null_label(self) -> int | None:
        """The class index guidance uses for its unconditional half (a conditional latent model's)."""
        return self.num_classes if self.latent and self.conditional else None

    @property
    def conditional(self) -> bool:
        return self.network.label_dim > 0

    @property
    def num_classes(self) -> int:
        return self.network.label_dim


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _cifar_net(label_dim: int, resolutions: tuple[int, ...]) -> NetworkConfig:
    return NetworkConfig(
        img_resolution=32,
        img_channels=3,
        label_dim=label_dim,
        resolutions=resolutions,
        channel_mult=(2, 2, 2),
        dropout=0.13,
    )


def _ffhq_net(resolutions: tuple[int, ...]) -> NetworkConfig:
    return NetworkConfig(
        img_resolution=64,
        img_channels=3,
        label_dim=0,
        resolutions=resolutions,
        channel_mult=(1, 2, 2, 2),
        dropout=0.05,
    )


def _fashion_net(resolutions: tuple[int, ...]) -> NetworkConfig:
    # Sized for 2 CPU cores: one image through the whole 3-stage cascade in well under 1 s, and
    # training at ~50 images/s there. Attention sits at 8×8, where it is cheap.
    return NetworkConfig(
        img_resolution=32,
        img_channels=1,
        label_dim=10,
        resolutions=resolutions,
        model_channels=32,
        channel_mult=(1, 1, 2),
        num_blocks=2,
        attn_resolutions=(8,),
        dropout=0.1,
        augment_dim=0,
    )


EDM_35 = CascadeSchedule((StageSchedule(32, 18),))
EDM_79 = CascadeSchedule((StageSchedule(64, 40),))
# CIFAR-10 3-stage, NFE 18/13/17 (Table 2).
CIFAR_3STAGE = CascadeSchedule(
    (
        StageSchedule(8, 18, truncate_at=9, final_step="heun"),
        StageSchedule(16, 12, truncate_at=7, final_step="euler", **NARROW),
        StageSchedule(32, 9, **NARROW),
    )
)
# CIFAR-10 2-stage 16-32, NFE 19/17 (Tables 6 and 11: N_low = 35 NFE, truncation at 19).
CIFAR_2STAGE = CascadeSchedule(
    (
        StageSchedule(16, 18, truncate_at=10, final_step="euler"),
        StageSchedule(32, 9, **NARROW),
    )
)
# FFHQ-64 4-stage, NFE 22/23/23/39 (Table 3).
FFHQ_4STAGE = CascadeSchedule(
    (
        StageSchedule(8, 18, truncate_at=11, final_step="heun"),
        StageSchedule(16, 18, truncate_at=12, final_step="euler", **NARROW),
        StageSchedule(32, 18, truncate_at=12, final_step="euler", **NARROW),
        StageSchedule(64, 20, **NARROW),
    )
)
# FFHQ-64 2-stage 32-64, NFE 49/39 (Tables 7 and 12: N_low = 79 NFE, truncation at 49).
FFHQ_2STAGE = CascadeSchedule(
    (
        StageSchedule(32, 40, truncate_at=25, final_step="euler"),
        StageSchedule(64, 20, **NARROW),
    )
)


# LightningDiT's sampling settings (configs/lightningdit_xl_vavae_f16d32.yaml): timestep shift 0.3,
# guidance interval from t = 0.11, guidance scale 10 (its value for the 64-epoch models; the paper's
# B/1 runs 42–64 epochs and states no scale), guidance on channels 0–2 (its forward_with_cfg).
LIGHTNINGDIT_SAMPLING = {"shift": 0.3, "guidance_scale": 10.0, "guidance_start": 0.11, "guidance_channels": 3}
# Table 4: baseline NFE 100 at 16×16; LowDiff 45 at 8×8 + 50 at 16×16. The 8×8 grid (60 steps, hand-off
# after 45 at t ≈ 0.47, σ-equivalent (1 − t)/t ≈ 1.1 for unit-variance latents, the moderate hand-off
# level of the pixel configs) is our choice: the paper gives only the NFE.
DIT_BASELINE_100 = CascadeSchedule((FlowStageSchedule(16, 100, **LIGHTNINGDIT_SAMPLING),))
DIT_CASCADE_45_50 = CascadeSchedule(
    (
        FlowStageSchedule(8, 60, truncate_at=45, **LIGHTNINGDIT_SAMPLING),
        FlowStageSchedule(16, 50, **LIGHTNINGDIT_SAMPLING),
    )
)
# LightningDiT's training recipe (its train.py and config): AdamW lr 2e-4 (β2 0.95, no warm-up), global
# batch 1024, EMA decay 0.9999 per step (half-life ln 0.5 / ln 0.9999 ≈ 6,931 steps ≈ 7,098 kimg at
# 1024 images a step, no ramp), no clipping, each resolution's flow loss a mean over latent elements.
LIGHTNINGDIT_RECIPE = TrainingRecipe(
    batch_size=1024,
    lr=2e-4,
    lr_rampup_kimg=0.0,
    ema_halflife_kimg=7098.0,
    ema_rampup_ratio=0.0,
    grad_clip=0.0,
    loss_weighting="equal",
    augment_p=0.0,
)


def _dit_b1(resolutions: tuple[int, ...]) -> DiTConfig:
    # LightningDiT-B/1 on VA-VAE f16d32 latents: 256×256 images → 16×16×32, patch 1 (256 tokens).
    return DiTConfig(img_resolution=16, img_channels=32, label_dim=1000, resolutions=resolutions)


# VA-VAE f16d32 (LightningDiT's tokenizer: LDM's KL autoencoder, 16× downsampling, 32 latent channels,
# attention at the lowest level only); its latent multiplier is 1 (LightningDiT's config).
VAVAE_F16D32 = AutoencoderConfig()


# fashion32-latent: the latent system at a size a CPU trains (issue 18). Fashion-MNIST padded to 32×32×1
# goes through a small KL autoencoder with 4× downsampling to 8×8×4 latents: 256 numbers for 1,024
# pixels. f4 rather than f8 because 4×4 latents of a 28-pixel garment keep too little of its texture
# (collars, stripes, logos), and 4 channels as LDM's KL-f4/f8 models. Width 32 (GroupNorm(32) needs
# multiples of 32), one residual block per level, attention only in the 8×8 middle (64 tokens): 0.95 M
# parameters, 0.11 GFLOP to encode and 0.31 to decode an image (the decoder costs about two 8×8 DiT
# evaluations); 1.8 CPU-s per training step of 64 images on one thread, 0.6 CPU-s to encode 256 images.
FASHION_AE_F4C4 = AutoencoderConfig(
    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, in_channels=1, out_channels=1,
    encoder_attn_levels=(), decoder_attn_levels=(),
)  # fmt: skip
# Sampling. Shift 1 (a uniform grid), not LightningDiT's 0.3: SD3's rule scales the shift with the
# square root of the latent's size, and 8×8×4 = 256 values is 32× fewer than 16×16×32, which brings
# LightningDiT's setting to about 1 (≈ 1.7 by the rule; 1 is the cautious end). Guidance mild, 1.5 from
# t = 0.1 on every channel: a small, briefly trained class-conditional model gains class fidelity from
# some guidance, while the scale 10 of LightningDiT's 64-epoch models saturates small models' samples;
# all channels because LightningDiT's channels 0–2 are a leftover of DiT's 4-channel code, not a choice.
# The baseline runs 32 Euler steps at 8×8. The cascade mirrors Table 4's 100 → 45 + 50: the 4×4 stage
# runs 16 of a 32-step grid and hands off at t = 0.5 (σ-equivalent (1 − t)/t = 1, the moderate hand-off
# level of the pixel configs), the 8×8 stage runs 16 steps. A 4×4 evaluation has a quarter of the
# tokens, so the cascade costs ≈ 16/4 + 16 = 20 8×8-evaluations against the baseline's 32 (1.6×, as
# the paper's 1.65×; `lowdiff models` counts the GFLOP).
FASHION_LATENT_SAMPLING = {"shift": 1.0, "guidance_scale": 1.5, "guidance_start": 0.1, "guidance_channels": None}
FASHION_LATENT_BASELINE_32 = CascadeSchedule((FlowStageSchedule(8, 32, **FASHION_LATENT_SAMPLING),))
FASHION_LATENT_CASCADE_16_16 = CascadeSchedule(
    (
        FlowStageSchedule(4, 32, truncate_at=16, **FASHION_LATENT_SAMPLING),
        FlowStageSchedule(8, 16, **FASHION_LATENT_SAMPLING),
    )
)
# The small recipe for a ~200 kimg CPU run: batch 64 (as fashion32), lr 5e-4 (transformers want less than
# fashion32's U-Net at 1e-3; LightningDiT runs 2e-4 at batch 1024) after a 2 kimg warm-up, EMA half-life
# 10 kimg (ramp 0.1) so that the EMA averages the last ~5 % of the run, clipping at 1, each stage's loss a
# mean over latent elements (the flow loss always is).
FASHION_LATENT_RECIPE = TrainingRecipe(
    batch_size=64,
    lr=5e-4,
    lr_rampup_kimg=2.0,
    ema_halflife_kimg=10.0,
    ema_rampup_ratio=0.1,
    grad_clip=1.0,
    loss_weighting="equal",
    augment_p=0.0,
)


def _fashion_dit(resolutions: tuple[int, ...]) -> DiTConfig:
    # LightningDiT's block at width 128, depth 6, 4 heads of 32 (1.9 M parameters; fashion32's U-Net has
    # 1.2 M), patch 1: 64 tokens at 8×8, 16 at 4×4. Measured per training step of 64 latents on one free
    # thread of the 2-core machine (wall = CPU time): 1.15 s for the cascade (both stages' losses), 0.86 s
    # for the baseline, so 200 kimg (3,125 steps) is 60 and 45 minutes on one thread, an estimated 35–40
    # and 25–30 on two (a 1.6–1.7× thread speed-up, not measured: the machine was busy). Width 192 cost
    # about 1.8× as much per step, past the budget; width 96 would leave the DiT smaller than fashion32's U-Net.
    return DiTConfig(
        img_resolution=8, img_channels=4, label_dim=10, resolutions=resolutions, hidden_size=128, depth=6, num_heads=4
    )


def _builtin() -> dict[str, ModelConfig]:
    # Long on purpose: one flat table of every built-in config is easier to read than a generator.
    configs = [
        ModelConfig(
            "edm-cifar10-cond",
            _cifar_net(10, (32,)),
            EDM_35,
            description="EDM DDPM++ baseline, class-conditional CIFAR-10, NFE 35",
            class_names=CIFAR10_CLASSES,
            training=EDM_CIFAR_RECIPE,
        ),
        ModelConfig(
            "edm-cifar10-uncond",
            _cifar_net(0, (32,)),
            EDM_35,
            description="EDM DDPM++ baseline, unconditional CIFAR-10, NFE 35",
            training=EDM_CIFAR_RECIPE,
        ),
        ModelConfig(
            "cifar10-cond",
            _cifar_net(10, (8, 16, 32)),
            CIFAR_3STAGE,
            description="LowDiff 8-16-32, class-conditional CIFAR-10",
            class_names=CIFAR10_CLASSES,
            training=EDM_CIFAR_RECIPE,
        ),
        ModelConfig(
            "cifar10-uncond",
            _cifar_net(0, (8, 16, 32)),
            CIFAR_3STAGE,
            description="LowDiff 8-16-32, unconditional CIFAR-10",
            training=EDM_CIFAR_RECIPE,
        ),
        ModelConfig(
            "cifar10-cond-2stage",
            _cifar_net(10, (16, 32)),
            CIFAR_2STAGE,
            description="LowDiff 16-32, class-conditional CIFAR-10",
            class_names=CIFAR10_CLASSES,
            training=EDM_CIFAR_RECIPE,
        ),
        ModelConfig(
            "edm-ffhq64",
            _ffhq_net((64,)),
            EDM_79,
            description="EDM DDPM++ baseline, FFHQ 64×64, NFE 79",
            training=EDM_FFHQ_RECIPE,
        ),
        ModelConfig(
            "ffhq64",
            _ffhq_net((8, 16, 32, 64)),
            FFHQ_4STAGE,
            description="LowDiff 8-16-32-64, FFHQ 64×64",
            training=EDM_FFHQ_RECIPE,
        ),
        ModelConfig(
            "ffhq64-2stage",
            _ffhq_net((32, 64)),
            FFHQ_2STAGE,
            description="LowDiff 32-64, FFHQ 64×64",
            training=EDM_FFHQ_RECIPE,
        ),
        ModelConfig(
            "fashion32",
            _fashion_net((8, 16, 32)),
            CIFAR_3STAGE,
            preconditioning="edm",
            pad=2,
            description="small default: Fashion-MNIST padded to 32×32, LowDiff 8-16-32",
            class_names=FASHION_MNIST_CLASSES,
            training=SMALL_CPU_RECIPE,
        ),
        ModelConfig(
            "fashion32-2stage",
            _fashion_net((16, 32)),
            CIFAR_2STAGE,
            preconditioning="edm",
            pad=2,
            description="fashion32 as LowDiff 16-32 (not trained; for the 2-stage comparison)",
            class_names=FASHION_MNIST_CLASSES,
            training=SMALL_CPU_RECIPE,
        ),
        ModelConfig(
            "edm-fashion32",
            _fashion_net((32,)),
            EDM_35,
            preconditioning="edm",
            pad=2,
            description="single-resolution baseline of fashion32, NFE 35",
            class_names=FASHION_MNIST_CLASSES,
            training=SMALL_CPU_RECIPE,
        ),
        ModelConfig(
            "lightningdit-b1-imagenet256",
            _dit_b1((16,)),
            DIT_BASELINE_100,
            preconditioning="flow",
            description="LightningDiT-B/1 baseline, ImageNet 256×256 in VA-VAE latents (16×16×32), Euler NFE 100",
            training=LIGHTNINGDIT_RECIPE,
            autoencoder=VAVAE_F16D32,
        ),
        ModelConfig(
            "lowdiff-dit-b1-imagenet256",
            _dit_b1((8, 16)),
            DIT_CASCADE_45_50,
            preconditioning="flow",
            description="LowDiff on LightningDiT-B/1, latents 8×8 → 16×16, Euler NFE 45 + 50",
            training=LIGHTNINGDIT_RECIPE,
            autoencoder=VAVAE_F16D32,
        ),
        ModelConfig(
            "fashion32-latent",
            _fashion_dit((4, 8)),
            FASHION_LATENT_CASCADE_16_16,
            preconditioning="flow",
            pad=2,
            description="small latent LowDiff: Fashion-MNIST 32×32 in 8×8×4 KL latents, 4×4 → 8×8, Euler NFE 16 + 16",
            class_names=FASHION_MNIST_CLASSES,
            training=FASHION_LATENT_RECIPE,
            autoencoder=FASHION_AE_F4C4,
        ),
        ModelConfig(
            "fashion32-latent-baseline",
            _fashion_dit((8,)),
            FASHION_LATENT_BASELINE_32,
            preconditioning="flow",
            pad=2,
            description="single-stage baseline of fashion32-latent: 8×8×4 latents, Euler NFE 32",
            class_names=FASHION_MNIST_CLASSES,
            training=FASHION_LATENT_RECIPE,
            autoencoder=FASHION_AE_F4C4,
        ),
    ]
    return {c.name: c for c in configs}


BUILTIN_CONFIGS: dict[str, ModelConfig] = _builtin()


def get_config(name: str) -> ModelConfig:
    try:
        return BUILTIN_CONFIGS[name]
    except KeyError:
        known = ", ".join(BUILTIN_CONFIGS)
        raise ConfigError(f"unknown config {name!r}; known configs: {known}", "config") from None
