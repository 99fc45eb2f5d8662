"""A LowDiff model as users hold it: config + preconditioned network, checkpoint I/O, reference generation.

:func:`load_model` is the one loader (a checkpoint, a built-in config with random weights, or the
embedded default); :class:`TorchStage` is the one reference stage function (eager PyTorch), which
the ``torch`` engine runs on any device and precision and every other engine is compared with.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lowdiff.autoencoder import AutoencoderConfig, LatentDecoder
from lowdiff.configs import BUILTIN_CONFIGS, SMALL_CPU_RECIPE, ModelConfig, TrainingRecipe, get_config
from lowdiff.dit import DiTConfig
from lowdiff.edm_import import import_snapshot
from lowdiff.errors import CheckpointError, ConfigError
from lowdiff.hashing import file_sha256
from lowdiff.network import NetworkConfig
from lowdiff.precond import PRECONDITIONINGS, Denoiser
from lowdiff.requests import check_class_labels, labels_tensor
from lowdiff.sampler import FunctionStage, StageRunner, generate_images
from lowdiff.schedule import CascadeSchedule

CHECKPOINT_FORMAT = "lowdiff-checkpoint-v1"
AUTOENCODER_WEIGHTS = "autoencoder_state_dict"  # a latent model's decoder (+ latent statistics), beside its DiT
SAFETENSORS_AUTOENCODER_PREFIX = "autoencoder."  # the decoder's tensors in a .safetensors checkpoint
SAFETENSORS_SUFFIX = ".safetensors"
EDM_SNAPSHOT_SUFFIX = ".pkl"
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

DEFAULT_CHECKPOINT_NAME = "fashion32.pt"
# Models whose trained weights ship inside the package (lowdiff/weights/): a name here may stand for a
# checkpoint path anywhere one is taken (``--checkpoint fashion32-latent``, ``lowdiff.load("edm-fashion32")``).
EMBEDDED_MODELS = {
    "fashion32": DEFAULT_CHECKPOINT_NAME,
    "edm-fashion32": "edm-fashion32.pt",
    "fashion32-latent": "fashion32-latent.pt",
    "fashion32-latent-baseline": "fashion32-latent-baseline.pt",
}


def embedded_checkpoint_path(name: str) -> Path:
    """The packaged file of an embedded model (a name in :data:`EMBEDDED_MODELS`)."""
    return Path(str(resources.files("lowdiff") / "weights" / EMBEDDED_MODELS[name]))


def default_checkpoint_path() -> Path:
    return embedded_checkpoint_path("fashion32")


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """A checkpoint argument as a path: ``None`` → the embedded default; an existing file → itself; the
    name of an embedded model (:data:`EMBEDDED_MODELS`) that is not a file here → its packaged weights."""
    if checkpoint is None:
        return default_checkpoint_path()
    path = Path(checkpoint)
    if not path.exists() and str(checkpoint) in EMBEDDED_MODELS:
        return embedded_checkpoint_path(str(checkpoint))
    return path


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    net = asdict(config.network)
    net.pop("extra", None)
    if isinstance(config.network, DiTConfig):
        net["architecture"] = DiTConfig.architecture  # U-Net dicts stay as they were (no key)
    return {
        "name": config.name,
        "network": net,
        "schedule": config.schedule.to_dict(),
        "preconditioning": config.preconditioning,
        "pad": config.pad,
        "description": config.description,
        "class_names": list(config.class_names),
        "training": config.training.to_dict(),
    } | ({} if config.autoencoder is None else {"autoencoder": asdict(config.autoencoder)})


# Bounds on a network read from a file (a checkpoint, a config file): wide enough for any DDPM++ a
# user trains, narrow enough that a hostile file cannot make the loader allocate terabytes.
NETWORK_INT_BOUNDS = {
    "img_resolution": (1, 4096), "img_channels": (1, 64), "label_dim": (0, 1_000_000),
    "model_channels": (1, 4096), "channel_mult_emb": (1, 64), "num_blocks": (1, 64), "augment_dim": (0, 64),
}  # fmt: skip
NETWORK_TUPLE_KEYS = ("resolutions", "channel_mult", "attn_resolutions")


# Bounds on a DiT read from a file: LightningDiT's largest (1.6B: width 1792, depth 28, 28 heads) fits
# with room; a hostile file cannot ask for more than ~10 G parameters' worth of layers.
DIT_INT_BOUNDS = {
    "img_resolution": (1, 512), "img_channels": (1, 256), "label_dim": (0, 100_000),
    "hidden_size": (4, 8192), "depth": (1, 128), "num_heads": (1, 128), "patch_size": (1, 16),
}  # fmt: skip
DIT_KEYS = {*DIT_INT_BOUNDS, "resolutions", "mlp_ratio", "label_dropout", "architecture"}


# Bounds on an autoencoder read from a file: VA-VAE (ch 128, 5 levels, 32 latent channels) fits with room;
# widths are multiples of 32 because every norm is GroupNorm(32).
AUTOENCODER_INT_BOUNDS = {
    "ch": (32, 1024), "num_res_blocks": (1, 8), "z_channels": (1, 256), "in_channels": (1, 16), "out_channels": (1, 16),
}  # fmt: skip
AUTOENCODER_MAX_LEVELS = 8


def autoencoder_config_from_dict(data: Any) -> AutoencoderConfig:
    """An :class:`AutoencoderConfig` from untrusted data: keys, types and ranges checked (ValueError)."""
    if not isinstance(data, dict):
        raise ValueError(f"autoencoder must be a dict, got {type(data).__name__}")
    unknown = set(data) - set(AutoencoderConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown autoencoder key(s) {sorted(unknown)}")
    ae = dict(data)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, (low, high) in AUTOENCODER_INT_BOUNDS.items():
        if key in ae and not (is_int(ae[key]) and low <= ae[key] <= high):
            raise ValueError(f"autoencoder.{key} must be an integer in [{low}, {high}], got {ae[key]!r}")
    if ae.get("ch", 128) % 32:
        raise ValueError(f"autoencoder.ch must be a multiple of 32 (GroupNorm(32)), got {ae['ch']!r}")
    mult = ae.get("ch_mult", AutoencoderConfig.ch_mult)
    if not isinstance(mult, list | tuple) or not 2 <= len(mult) <= AUTOENCODER_MAX_LEVELS:
        raise ValueError(f"autoencoder.ch_mult must be a list of 2 to {AUTOENCODER_MAX_LEVELS} integers, got {mult!r}")
    if not all(is_int(v) and 1 <= v <= 16 for v in mult):
        raise ValueError(f"autoencoder.ch_mult must hold integers in [1, 16], got {mult!r}")
    ae["ch_mult"] = tuple(mult)
    for key in ("encoder_attn_levels", "decoder_attn_levels"):
        levels = ae.get(key, ())
        if not isinstance(levels, list | tuple) or not all(is_int(v) and 0 <= v < len(mult) for v in levels):
            raise ValueError(f"autoencoder.{key} must list levels in [0, {len(mult) - 1}], got {levels!r}")
        ae[key] = tuple(levels)
    ae["latent_multiplier"] = _number(ae, "latent_multiplier", 1e-6, 1e6, 1.0)
    return AutoencoderConfig(**ae)


def _number(net: dict, key: str, low: float, high: float, default: float) -> float:
    value = net.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"network.{key} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _dit_from_dict(data: dict) -> DiTConfig:
    """A :class:`DiTConfig` from untrusted data: keys, types and ranges checked (ValueError)."""
    unknown = set(data) - DIT_KEYS
    if unknown:
        raise ValueError(f"unknown DiT network key(s) {sorted(unknown)}")
    missing = {"img_resolution", "img_channels", "label_dim", "resolutions"} - set(data)
    if missing:
        raise ValueError(f"DiT network lacks {sorted(missing)}")
    net = {k: v for k, v in data.items() if k != "architecture"}
    for key, (low, high) in DIT_INT_BOUNDS.items():
        value = net.get(key)
        if key in net and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ValueError(f"network.{key} must be an integer in [{low}, {high}], got {value!r}")
    res = net["resolutions"]
    if not isinstance(res, list | tuple) or not 1 <= len(res) <= 8:
        raise ValueError(f"network.resolutions must be a list of 1 to 8 integers, got {res!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 512 for v in res):
        raise ValueError(f"network.resolutions must hold integers in [1, 512], got {res!r}")
    net["resolutions"] = tuple(res)
    net["mlp_ratio"] = _number(net, "mlp_ratio", 0.25, 16.0, 4.0)
    net["label_dropout"] = _number(net, "label_dropout", 0.0, 0.99, 0.1)
    network = DiTConfig(**net)
    network.check()
    return network


def _network_from_dict(data: Any) -> NetworkConfig | DiTConfig:
    """A :class:`NetworkConfig` from untrusted data: every field's type and range checked (ValueError)."""
    if not isinstance(data, dict):
        raise ValueError(f"network must be a dict, got {type(data).__name__}")
    if "architecture" in data:
        if data["architecture"] != DiTConfig.architecture:
            raise ValueError(f"network.architecture must be {DiTConfig.architecture!r}, got {data['architecture']!r}")
        return _dit_from_dict(data)
    net = dict(data)
    for key, (low, high) in NETWORK_INT_BOUNDS.items():
        value = net.get(key)
        if key in net and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ValueError(f"network.{key} must be an integer in [{low}, {high}], got {value!r}")
    for key in NETWORK_TUPLE_KEYS:
        value = net.get(key)
        if key in net:
            if not isinstance(value, list | tuple) or len(value) > 16:
                raise ValueError(f"network.{key} must be a list of at most 16 integers, got {value!r}")
            if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in value):
                raise ValueError(f"network.{key} must hold integers in [1, 4096], got {value!r}")
            net[key] = tuple(value)
    dropout = net.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"network.dropout must be a number in [0, 1), got {dropout!r}")
    network = NetworkConfig(**net)
    if not network.resolutions or not network.channel_mult:
        raise ValueError("network.resolutions and network.channel_mult must not be empty")
    if network.resolutions[-1] != network.img_resolution or list(network.resolutions) != sorted(network.resolutions):
        raise ValueError(f"network.resolutions must rise to img_resolution, got {list(network.resolutions)}")
    for r in network.resolutions:
        network.level_of(r)  # each stage resolution is one of the network's levels
    return network


def config_from_dict(data: Any) -> ModelConfig:
    """Rebuild a config from :func:`config_to_dict`'s output; anything else is a :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a dict, got {type(data).__name__}", "config")
    missing = {"name", "network", "schedule", "preconditioning"} - set(data)
    if missing:
        raise ConfigError(f"missing key(s) {sorted(missing)}", "config")
    known = {"name", "network", "schedule", "preconditioning", "pad", "description", "class_names", "training"}
    known.add("autoencoder")
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}", "config")
    try:
        network = _network_from_dict(data["network"])
        schedule = CascadeSchedule.from_dict(data["schedule"])
        autoencoder = None if data.get("autoencoder") is None else autoencoder_config_from_dict(data["autoencoder"])
    except (TypeError, KeyError, ValueError, ConfigError) as exc:
        raise ConfigError(f"invalid network, schedule or autoencoder ({type(exc).__name__}: {exc})", "config") from None
    if data["preconditioning"] not in PRECONDITIONINGS:
        raise ConfigError(f"unknown preconditioning {data['preconditioning']!r}", "config")
    if schedule.resolutions != network.resolutions:
        raise ConfigError(f"schedule resolutions {schedule.resolutions} ≠ network's {network.resolutions}", "config")
    names = data.get("class_names")
    if names is None:  # checkpoints written before configs carried names: the built-in config's, if it fits
        builtin = BUILTIN_CONFIGS.get(str(data["name"]))
        names = builtin.class_names if builtin is not None and builtin.network == network else ()
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError("class_names must be a list of non-empty strings", "config")
    try:
        return ModelConfig(
            name=str(data["name"]),
            network=network,
            schedule=schedule,
            preconditioning=data["preconditioning"],
            pad=int(data.get("pad", 0)),
            description=str(data.get("description", "")),
            class_names=tuple(names),
            training=_training_from_dict(data.get("training")),
            autoencoder=autoencoder,
        )
    except ConfigError as exc:
        raise ConfigError(f"{exc.field}: {exc.message}", "config") from None


def _training_from_dict(data: Any) -> TrainingRecipe:
    """A config's training recipe; a checkpoint written before configs carried one was trained with
    the small CPU recipe (mean-over-pixels losses, clipping at 1, …), so that is what it continues with."""
    if data is None:
        return SMALL_CPU_RECIPE
    if not isinstance(data, dict):
        raise ConfigError(f"training must be a dict, got {type(data).__name__}", "training")
    unknown = set(data) - set(TrainingRecipe.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown training key(s) {sorted(unknown)}", "training")
    try:
        return TrainingRecipe(**data)
    except TypeError as exc:
        raise ConfigError(f"invalid training recipe ({exc})", "training") from None


MERGED_CONFIG_KEYS = ("network", "training")  # a config file's "base" overrides merge into these key by key


def load_config(spec: str | Path) -> ModelConfig:
    """A built-in config by name, or a JSON file: a whole config (``lowdiff models --dump NAME``) or
    ``{"base": NAME, …}`` — the built-in config with the file's keys laid over it (``network`` and
    ``training`` merged key by key, any other key replaced). Validated by :func:`config_from_dict`;
    every problem is a :class:`ConfigError` naming ``config`` and the file."""
    text = str(spec)
    if not text.endswith(".json"):
        return get_config(text)
    path = Path(text)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})", "config") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})", "config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}", "config")
    if "base" in data:
        base_name = data.pop("base")
        if not isinstance(base_name, str) or base_name not in BUILTIN_CONFIGS:
            known = ", ".join(BUILTIN_CONFIGS)
            raise ConfigError(f"{path}: base must be a built-in config ({known}), got {base_name!r}", "config")
        merged = config_to_dict(BUILTIN_CONFIGS[base_name])
        for key, value in data.items():
            if key in MERGED_CONFIG_KEYS and isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        if "class_names" not in data and merged["network"]["label_dim"] != BUILTIN_CONFIGS[base_name].num_classes:
            merged["class_names"] = []  # the base's names belong to the base's classes, not these
        data = merged
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", "config") from None


class TorchStage:
    """The reference stage function: D(x; σ) by the PyTorch denoiser, on ``device``, fp32 or autocast.

    Inputs may live on the host (they are moved to ``device``); the result is fp32 on ``device``.
    """

    def __init__(
        self, denoiser: Denoiser, resolution: int, device: torch.device | None = None, precision: str = "fp32"
    ):
        if precision not in PRECISIONS:
            raise ConfigError(f"expected one of {', '.join(PRECISIONS)}, got {precision!r}", "precision")
        self.denoiser = denoiser
        self.resolution = resolution
        self.device = device or torch.device("cpu")
        self.autocast_dtype = PRECISIONS[precision]

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device, non_blocking=True)

        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=enabled):
            out = self.denoiser(to(x), to(sigma), to(class_labels), self.resolution, to(condition), to(sigma_cond))
        return out.float()


class TorchDecode:
    """The reference decode stage: a latent model's :class:`LatentDecoder` in eager PyTorch on ``device``
    (fp32 or autocast). Takes the cascade's float64 latents on the host, returns float64 images in about
    [−1, 1] on the host, and says which resolution it produces (its key in per-stage timings)."""

    def __init__(self, decoder: LatentDecoder, latent_resolution: int, device: torch.device | None = None,
                 precision: str = "fp32"):  # fmt: skip
        if precision not in PRECISIONS:
            raise ConfigError(f"expected one of {', '.join(PRECISIONS)}, got {precision!r}", "precision")
        self.decoder = decoder
        self.device = device or torch.device("cpu")
        self.autocast_dtype = PRECISIONS[precision]
        self.resolution = decoder.config.image_resolution(latent_resolution)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=enabled):
            out = self.decoder(latents.to(self.device, torch.float32))
        return out.float().cpu().to(torch.float64)


class LowDiffModel:
    def __init__(self, config: ModelConfig, denoiser: Denoiser | None = None, decoder: LatentDecoder | None = None):
        self.config = config
        if denoiser is None:
            denoiser = Denoiser.build(config.network, config.preconditioning)
        self.denoiser = denoiser.eval()
        if decoder is None and config.autoencoder is not None:
            decoder = LatentDecoder(config.autoencoder)
        if (decoder is None) != (config.autoencoder is None):
            raise ConfigError(f"{config.name}: a decoder goes with a latent config and only with one", "autoencoder")
        self.decoder = None if decoder is None else decoder.eval()
        self.metadata: dict[str, Any] = {}

    @classmethod
    def from_config(cls, name: str) -> LowDiffModel:
        """A built-in config with random weights."""
        return load_model(config=name)

    @property
    def schedule(self) -> CascadeSchedule:
        return self.config.schedule

    def with_schedule(self, schedule: CascadeSchedule) -> LowDiffModel:
        if schedule.resolutions != self.config.resolutions:
            raise ConfigError(
                f"resolutions {schedule.resolutions} differ from the model's {self.config.resolutions}", "schedule"
            )
        other = LowDiffModel(replace(self.config, schedule=schedule), self.denoiser, self.decoder)
        other.metadata = self.metadata
        return other

    def reference_runners(self) -> dict[int, StageRunner]:
        """Eager PyTorch on the CPU, fp32: the reference every engine is compared with."""
        null = self.config.null_label
        return {r: FunctionStage(TorchStage(self.denoiser, r), null_label=null) for r in self.config.resolutions}

    def reference_decoder(self) -> TorchDecode | None:
        """The decode stage in eager PyTorch on the CPU (None for a pixel model)."""
        return None if self.decoder is None else TorchDecode(self.decoder, self.config.resolutions[-1])

    @torch.no_grad()
    def generate(self, seeds: Sequence[int], class_labels: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 images [B, C, R, R] by the reference runners (training grids, evaluation, tests).

        Serving goes through :class:`lowdiff.engines.CascadeEngine`, which runs the same
        :func:`~lowdiff.sampler.generate_images` with its own runners."""
        labels = labels_tensor(check_class_labels(self.config, class_labels, len(seeds)))
        channels = self.config.network.img_channels
        return generate_images(
            self.schedule, self.reference_runners(), seeds, labels, channels, decode=self.reference_decoder()
        )

    # --- checkpoints ---
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.config),
            "state_dict": self.denoiser.net.state_dict(),
            "metadata": self.metadata,
        }
        if self.decoder is not None:
            payload[AUTOENCODER_WEIGHTS] = self.decoder.state_dict()
        if extra:
            payload.update(extra)
        path = Path(path)
        if path.suffix == SAFETENSORS_SUFFIX:
            atomic_write(path, safetensors_bytes(payload))
        else:
            atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path | None = None) -> LowDiffModel:
        """Load a checkpoint (EMA weights); no path = the embedded default model."""
        return load_model(path)


def load_model(checkpoint: str | Path | None = None, config: str | None = None) -> LowDiffModel:
    """The one loader: ``checkpoint`` (EMA weights if it has them), else ``config`` (a built-in name or a
    JSON file, :func:`load_config`) with random weights, else the embedded default. Errors are
    :class:`CheckpointError` (field ``checkpoint``) or :class:`ConfigError` (field ``config``), one line each."""
    if checkpoint is not None and config is not None:
        raise ConfigError("give either a checkpoint or a config (random weights), not both", "config")
    if config is not None:
        return LowDiffModel(load_config(config))
    path = resolve_checkpoint(checkpoint)
    payload = read_checkpoint(path)
    try:
        model_config = config_from_dict(payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its config is invalid: {exc.message}", "checkpoint") from None
    model = LowDiffModel(model_config)
    weights = payload.get("ema_state_dict", payload.get("state_dict"))
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{path}: holds no weights (state_dict)", "checkpoint")
    check_weights(path, weights, model.denoiser.net.state_dict(), f"config {model_config.name!r}")
    model.denoiser.net.load_state_dict(weights)
    if model.decoder is not None:
        decoder_weights = payload.get(AUTOENCODER_WEIGHTS)
        if not isinstance(decoder_weights, dict) or not decoder_weights:
            raise CheckpointError(
                f"{path}: a latent model's checkpoint must hold its decoder ({AUTOENCODER_WEIGHTS})", "checkpoint"
            )
        check_weights(path, decoder_weights, model.decoder.state_dict(), f"the autoencoder of {model_config.name!r}")
        std = decoder_weights["latent_std"]
        if not bool(torch.isfinite(std).all()) or not bool((std > 0).all()):
            raise CheckpointError(f"{path}: the latent statistics' std must be finite and positive", "checkpoint")
        model.decoder.load_state_dict(decoder_weights)
    elif AUTOENCODER_WEIGHTS in payload:
        raise CheckpointError(f"{path}: a pixel model's checkpoint holds autoencoder weights", "checkpoint")
    metadata = payload.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a dict, got {type(metadata).__name__}", "checkpoint")
    model.metadata = dict(metadata)
    model.metadata["checkpoint_sha256"] = file_sha256(path)
    model.metadata["checkpoint_path"] = str(path)
    return model


def check_weights(path: Path, weights: dict, expected: dict[str, torch.Tensor], what: str) -> None:
    """Every expected tensor present with its shape, nothing else: a :class:`CheckpointError` naming
    the first offenders of each kind otherwise."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(str(k) for k in set(weights) - set(expected))
    wrong = sorted(
        k
        for k in set(expected) & set(weights)
        if not isinstance(weights[k], torch.Tensor) or weights[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise CheckpointError(f"{path}: weights do not fit {what}: {', '.join(parts)}", "checkpoint")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's payload (``weights_only`` unpickling: tensors and plain data, never code).

    By extension: ``.safetensors`` (weights, with the config and metadata as JSON in its header) and
    ``.pkl`` (an EDM network snapshot, read as data by :mod:`lowdiff.edm_import` and mapped onto a
    single-stage LowDiff model) give the same payload as a ``.pt`` checkpoint."""
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (embedded models: {', '.join(EMBEDDED_MODELS)})", "checkpoint"
        )
    if path.suffix == EDM_SNAPSHOT_SUFFIX:
        imported = import_snapshot(path)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(imported.config),
            "state_dict": imported.state_dict,
            "metadata": imported.metadata,
        }
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(
            f"{path}: not a readable LowDiff checkpoint ({type(exc).__name__})", "checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a LowDiff checkpoint (missing format tag)", "checkpoint")
    return payload


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    atomic_write(path, lambda f: torch.save(payload, f))


def atomic_write(path: Path, write: bytes | Callable[[BinaryIO], Any]) -> None:
    """:func:`atomic_torch_save` for any writer (or bytes): temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- safetensors: the weights as tensors, everything else as JSON strings in the header ---


def safetensors_bytes(payload: dict[str, Any]) -> bytes:
    """A checkpoint payload as a ``.safetensors`` file: ``state_dict`` as the tensors, the format tag,
    config and metadata as JSON header strings (safetensors keeps only str → str metadata), so tools of
    the diffusers world read the weights and LowDiff reads the model back from the file alone."""
    from safetensors.torch import save

    kept = ("format", "config", "state_dict", "metadata", AUTOENCODER_WEIGHTS)
    extra = {k: v for k, v in payload.items() if k not in kept}
    if extra:
        raise CheckpointError(f"a .safetensors checkpoint holds weights only, not {sorted(extra)}", "out")
    tensors = {k: v.detach().cpu().contiguous() for k, v in payload["state_dict"].items()}
    for k, v in payload.get(AUTOENCODER_WEIGHTS, {}).items():
        tensors[SAFETENSORS_AUTOENCODER_PREFIX + k] = v.detach().cpu().contiguous()
    header = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(payload["config"]),
        "metadata": json.dumps(payload.get("metadata", {}), default=str),
    }
    return save(tensors, metadata=header)


def read_safetensors(path: Path) -> dict[str, Any]:
    """The payload :func:`read_checkpoint` gives, from a ``.safetensors`` file written by :func:`safetensors_bytes`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        config = json.loads(header["config"]) if header.get("format") == CHECKPOINT_FORMAT else None
        metadata = json.loads(header.get("metadata", "{}"))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({type(exc).__name__})", "checkpoint"
        ) from None
    if config is None:
        raise CheckpointError(
            f"{path}: not a LowDiff checkpoint (no {CHECKPOINT_FORMAT} config in its header)", "checkpoint"
        )
    prefix = SAFETENSORS_AUTOENCODER_PREFIX
    decoder = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "state_dict": tensors, "metadata": metadata}
    return payload | ({AUTOENCODER_WEIGHTS: decoder} if decoder else {})
