"""Built-in model configurations: network shape, preconditioning and the cascade schedule.

The paper's schedules (Tables 2, 3, 6, 7, 11, 12). σ ranges follow appendix C: the first (unconditional)
stage uses EDM's 0.002…80; conditioned stages use the narrower 0.01…50. Where the paper gives
only a stage's NFE, N and t are chosen to reproduce it (see :mod:`lowdiff.schedule`) and to hand
off at a moderate noise level (σ_t ≈ 0.4–2).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowdiff.errors import ConfigError
from lowdiff.network import NetworkConfig
from lowdiff.precond import Preconditioning
from lowdiff.schedule import CascadeSchedule, StageSchedule

NARROW = {"sigma_min": 0.01, "sigma_max": 50.0}  # appendix C, conditioned stages


@dataclass(frozen=True)
class ModelConfig:
    name: str
    network: NetworkConfig
    schedule: CascadeSchedule
    preconditioning: Preconditioning = "vp"
    pad: int = 0  # pixels of black border added to each side of the dataset's images
    description: str = ""
    class_names: tuple[str, ...] = ()  # one per class label (empty: the labels are only numbers)

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"{len(self.class_names)} class names for {self.num_classes} classes", "class_names")

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.network.resolutions

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


def _builtin() -> dict[str, ModelConfig]:
    # Long on purpose: one flat table of every built-in config is easier to read than a generator.
    configs = [
        ModelConfig(
            "edm-cifar10-cond",
            _cifar_net(10, (32,)),
            EDM_35,
            description="EDM DDPM++ baseline, class-conditional CIFAR-10, NFE 35",
            class_names=CIFAR10_CLASSES,
        ),
        ModelConfig(
            "edm-cifar10-uncond",
            _cifar_net(0, (32,)),
            EDM_35,
            description="EDM DDPM++ baseline, unconditional CIFAR-10, NFE 35",
        ),
        ModelConfig(
            "cifar10-cond",
            _cifar_net(10, (8, 16, 32)),
            CIFAR_3STAGE,
            description="LowDiff 8-16-32, class-conditional CIFAR-10",
            class_names=CIFAR10_CLASSES,
        ),
        ModelConfig(
            "cifar10-uncond",
            _cifar_net(0, (8, 16, 32)),
            CIFAR_3STAGE,
            description="LowDiff 8-16-32, unconditional CIFAR-10",
        ),
        ModelConfig(
            "cifar10-cond-2stage",
            _cifar_net(10, (16, 32)),
            CIFAR_2STAGE,
            description="LowDiff 16-32, class-conditional CIFAR-10",
            class_names=CIFAR10_CLASSES,
        ),
        ModelConfig("edm-ffhq64", _ffhq_net((64,)), EDM_79, description="EDM DDPM++ baseline, FFHQ 64×64, NFE 79"),
        ModelConfig("ffhq64", _ffhq_net((8, 16, 32, 64)), FFHQ_4STAGE, description="LowDiff 8-16-32-64, FFHQ 64×64"),
        ModelConfig("ffhq64-2stage", _ffhq_net((32, 64)), FFHQ_2STAGE, description="LowDiff 32-64, FFHQ 64×64"),
        ModelConfig(
            "fashion32",
            _fashion_net((8, 16, 32)),
            CIFAR_3STAGE,
            preconditioning="edm",
            pad=2,
            description="small default: Fashion-MNIST padded to 32×32, LowDiff 8-16-32",
            class_names=FASHION_MNIST_CLASSES,
        ),
        ModelConfig(
            "fashion32-2stage",
            _fashion_net((16, 32)),
            CIFAR_2STAGE,
            preconditioning="edm",
            pad=2,
            description="fashion32 as LowDiff 16-32 (not trained; for the 2-stage comparison)",
            class_names=FASHION_MNIST_CLASSES,
        ),
        ModelConfig(
            "edm-fashion32",
            _fashion_net((32,)),
            EDM_35,
            preconditioning="edm",
            pad=2,
            description="single-resolution baseline of fashion32, NFE 35",
            class_names=FASHION_MNIST_CLASSES,
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
