"""Released latent-diffusion formats, read as data: LightningDiT checkpoints and VA-VAE autoencoders.

Both arrive as PyTorch pickles from outside, so they are read with ``torch.load(weights_only=True)``
(tensors and plain containers only, never code), every tensor's name and shape is checked against the
architecture before anything is loaded, and every problem is one :class:`CheckpointError` line naming
the file and the first offending key.

* **LightningDiT** (``train.py`` writes ``{"model", "ema", "opt", …}``; inference reads ``"ema"`` or a
  bare state dict): the shape of a :class:`~lowdiff.dit.DiTConfig` is read off the tensors (width from
  the patch embedding, depth from the block count, classes from the label table, heads from the rotary
  tables that LightningDiT saves as buffers) and the names mapped onto :class:`~lowdiff.dit.UnifiedDiT`
  (``x_embedder`` → ``inputs.R``, ``pos_embed`` → ``pos_embed.R``, ``final_layer`` → ``outputs.R``).
  Only the variant of the released configs is accepted (SwiGLU, RMSNorm, RoPE, no q/k norm, adaLN
  with shift, patch size any): another variant has other tensors and is refused by name.
* **Cascade from a baseline** (:func:`init_cascade_from_baseline`): the blocks, embedders and the
  top resolution's final layer and position table are copied; the top patch embedding gets the
  baseline's weights on its latent channels and zeros on the condition channels; the lower stages'
  layers and the resolution embedding keep their fresh initialisation (the resolution embedding is
  zero). So the cascade's top stage computes the baseline's function, for any condition, until trained.
* **VA-VAE** (an LDM ``{"state_dict": …}`` or a bare state dict; training-only entries such as
  ``loss.*`` and ``foundation_model.*`` are skipped, as the reference loader skips them): the
  :class:`~lowdiff.autoencoder.AutoencoderConfig` is read off the tensors, and LightningDiT's
  ``latents_stats.pt`` (``{"mean", "std"}``, [1, C, 1, 1]) gives the per-channel normalisation.
* **The pair as a LowDiff model** (:func:`import_lightningdit_pair`, behind ``lowdiff
  import-lightningdit``): the DiT, the VA-VAE's decoder and the statistics together, under the built-in
  latent config's schedule and recipe with the sizes read off the files, as the baseline or as the
  LowDiff cascade initialised from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lowdiff.autoencoder import AutoencoderConfig, KLAutoencoder, LatentDecoder
from lowdiff.configs import ModelConfig, get_config
from lowdiff.dit import DiTConfig, UnifiedDiT, rope_tables
from lowdiff.errors import CheckpointError, ConfigError
from lowdiff.hashing import file_sha256
from lowdiff.schedule import CascadeSchedule

AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
MAX_BLOCKS = 128  # more blocks than any released DiT: a bound on what a file can make us build


@dataclass
class ImportedDiT:
    network: DiTConfig
    state_dict: dict[str, torch.Tensor]  # UnifiedDiT names
    metadata: dict[str, Any] = field(default_factory=dict)


def _load(path: Path, field_name: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"not found: {path}", field_name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a weights file"
        raise CheckpointError(
            f"{path}: not a readable weights-only PyTorch file ({type(exc).__name__})", field_name
        ) from None


def _tensors(path: Path, data: Any, field_name: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path}: expected a state dict (name → tensor)", field_name)
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a named tensor", field_name)
    return data


def _need(path: Path, sd: dict[str, torch.Tensor], key: str, ndim: int, field_name: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{path}: missing tensor {key!r} (not the released layout?)", field_name)
    if sd[key].ndim != ndim:
        raise CheckpointError(f"{path}: {key!r} has {sd[key].ndim} dimensions, expected {ndim}", field_name)
    return sd[key]


def _check_against(
    path: Path, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, field_name: str
) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if got[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise CheckpointError(f"{path}: tensors do not fit {what}: {', '.join(parts)}", field_name)
    nonfinite = next((k for k, v in got.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if nonfinite is not None:
        raise CheckpointError(f"{path}: {nonfinite!r} holds NaN or infinity", field_name)


# ------------------------------------------------------------------------------------------ LightningDiT


def lightningdit_state_dict(path: Path, payload: Any, field_name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The EMA weights of a LightningDiT checkpoint (``{"ema": …}``) or a bare state dict."""
    if isinstance(payload, dict) and "ema" in payload:
        payload = payload["ema"]
    return _tensors(path, payload, field_name)


def is_lightningdit(payload: Any) -> bool:
    """Whether an unpickled payload looks like LightningDiT's (its EMA or bare state dict)."""
    sd = payload.get("ema", payload) if isinstance(payload, dict) else None
    return isinstance(sd, dict) and "x_embedder.proj.weight" in sd and "final_layer.linear.weight" in sd


def lightningdit_config(path: Path, sd: dict[str, torch.Tensor], field_name: str = "checkpoint") -> DiTConfig:
    """The DiT shape a LightningDiT state dict holds; refuses variants other than the released one."""
    for marker, what in (("blocks.0.attn.q_norm.weight", "q/k norm"), ("blocks.0.mlp.fc1.weight", "a GELU MLP")):
        if marker in sd:
            raise CheckpointError(
                f"{path}: a LightningDiT with {what} ({marker}); only the released variant loads", field_name
            )
    embed = _need(path, sd, "x_embedder.proj.weight", 4, field_name)
    hidden, channels, patch = int(embed.shape[0]), int(embed.shape[1]), int(embed.shape[2])
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
        if depth > MAX_BLOCKS:
            raise CheckpointError(f"{path}: more than {MAX_BLOCKS} blocks", field_name)
    if depth == 0:
        raise CheckpointError(
            f"{path}: no RMSNorm blocks (blocks.0.norm1.weight); not LightningDiT's released variant", field_name
        )
    tokens = int(_need(path, sd, "pos_embed", 3, field_name).shape[1])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{path}: pos_embed has {tokens} tokens, not a square grid", field_name)
    rope = _need(path, sd, "feat_rope.freqs_cos", 2, field_name)
    head_dim = int(rope.shape[1])
    if head_dim == 0 or hidden % head_dim:
        raise CheckpointError(f"{path}: rotary tables of width {head_dim} do not divide the width {hidden}", field_name)
    labels = int(_need(path, sd, "y_embedder.embedding_table.weight", 2, field_name).shape[0]) - 1
    mlp_hidden = int(_need(path, sd, "blocks.0.mlp.w3.weight", 2, field_name).shape[1])
    ratio = next((r for r in (4.0, mlp_hidden * 1.5 / hidden) if int(2 / 3 * int(hidden * r)) == mlp_hidden), None)
    if ratio is None:
        raise CheckpointError(f"{path}: SwiGLU width {mlp_hidden} fits no MLP ratio for width {hidden}", field_name)
    try:
        config = DiTConfig(
            img_resolution=grid * patch, img_channels=channels, label_dim=labels, resolutions=(grid * patch,),
            hidden_size=hidden, depth=depth, num_heads=hidden // head_dim, mlp_ratio=ratio, patch_size=patch,
        )  # fmt: skip
        config.check()
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a valid LightningDiT shape ({exc})", field_name) from None
    return config


def _lightningdit_to_unified(sd: dict[str, torch.Tensor], resolution: int) -> dict[str, torch.Tensor]:
    renames = {"x_embedder.": f"inputs.{resolution}.", "final_layer.": f"outputs.{resolution}."}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("feat_rope."):
            continue  # derived buffers; checked against ours by the caller
        if key == "pos_embed":
            out[f"pos_embed.{resolution}"] = value
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def import_lightningdit(path: str | Path, payload: Any | None = None, field_name: str = "checkpoint") -> ImportedDiT:
    """A LightningDiT checkpoint as a single-stage :class:`UnifiedDiT` state dict and its config."""
    path = Path(path)
    payload = _load(path, field_name) if payload is None else payload
    sd = lightningdit_state_dict(path, payload, field_name)
    network = lightningdit_config(path, sd, field_name)
    with torch.device("meta"):
        expected = UnifiedDiT(network).state_dict()
    mapped = _lightningdit_to_unified(sd, network.img_resolution)
    _check_against(
        path, mapped, expected, f"LightningDiT of width {network.hidden_size}, depth {network.depth}", field_name
    )
    cos, sin = rope_tables(network.head_dim, network.grid(network.img_resolution))
    for name, table in (("feat_rope.freqs_cos", cos), ("feat_rope.freqs_sin", sin)):
        if name in sd and (sd[name].shape != table.shape or not torch.allclose(sd[name].float(), table, atol=1e-5)):
            raise CheckpointError(f"{path}: {name} is not the 2-D rotary table of this shape", field_name)
    metadata = {"imported_from": "lightningdit", "source_tensors": len(sd)}
    return ImportedDiT(network, mapped, metadata)


def cascade_network(baseline: DiTConfig, resolutions: tuple[int, ...]) -> DiTConfig:
    """The baseline's DiT with more (lower) stage resolutions ending at the baseline's."""
    return replace(baseline, resolutions=resolutions)


def init_cascade_from_baseline(
    cascade: UnifiedDiT, baseline_sd: dict[str, torch.Tensor], field_name: str = "init_from"
) -> dict[str, list[str]]:
    """Copy a single-stage DiT's weights (UnifiedDiT names) into a cascade DiT in place; returns which
    tensors were copied, widened and kept fresh. The cascade's top resolution must be the baseline's."""
    c = cascade.config
    top = c.resolutions[-1]
    target = cascade.state_dict()
    report: dict[str, list[str]] = {"copied": [], "widened": [], "fresh": []}
    source_res = sorted(int(k.split(".")[1]) for k in baseline_sd if k.startswith("pos_embed."))
    if source_res != [top]:
        raise CheckpointError(
            f"the baseline is a single-stage DiT at {source_res}; the cascade's top stage is {top}: they must be one",
            field_name,
        )
    with torch.no_grad():
        for key, value in target.items():
            source = baseline_sd.get(key)
            if source is None:
                report["fresh"].append(key)
                continue
            if key == f"inputs.{top}.proj.weight" and len(c.resolutions) > 1:
                if (
                    source.shape[0] != value.shape[0]
                    or 2 * source.shape[1] != value.shape[1]
                    or source.shape[2:] != value.shape[2:]
                ):
                    raise CheckpointError(
                        f"{key}: baseline shape {tuple(source.shape)} does not fit {tuple(value.shape)}", field_name
                    )
                value.zero_()
                value[:, : source.shape[1]] = source  # condition channels start at zero: no effect yet
                report["widened"].append(key)
                continue
            if source.shape != value.shape:
                raise CheckpointError(
                    f"{key}: baseline shape {tuple(source.shape)} does not fit {tuple(value.shape)}", field_name
                )
            value.copy_(source)
            report["copied"].append(key)
    unused = sorted(set(baseline_sd) - set(target))
    if unused:
        raise CheckpointError(f"baseline tensor {unused[0]!r} has no place in the cascade", field_name)
    return report


# ------------------------------------------------------------------------------------------------- VA-VAE


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def autoencoder_config(path: Path, sd: dict[str, torch.Tensor], field_name: str = "autoencoder") -> AutoencoderConfig:
    """The KL autoencoder's shape, read off an LDM-layout state dict."""
    conv_in = _need(path, sd, "encoder.conv_in.weight", 4, field_name)
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = _count(sd, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    blocks = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")
    if not 1 <= levels <= 8 or not 1 <= blocks <= 8 or ch < 1:
        raise CheckpointError(
            f"{path}: {levels} encoder levels of {blocks} blocks is not an LDM autoencoder", field_name
        )
    mult = []
    for i in range(levels):
        width = int(_need(path, sd, f"encoder.down.{i}.block.0.conv1.weight", 4, field_name).shape[0])
        if width % ch:
            raise CheckpointError(f"{path}: level {i} width {width} is not a multiple of {ch}", field_name)
        mult.append(width // ch)
    z = int(_need(path, sd, "post_quant_conv.weight", 4, field_name).shape[0])
    out = int(_need(path, sd, "decoder.conv_out.weight", 4, field_name).shape[0])
    return AutoencoderConfig(
        ch=ch, ch_mult=tuple(mult), num_res_blocks=blocks, z_channels=z, in_channels=in_channels, out_channels=out,
        encoder_attn_levels=tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd),
        decoder_attn_levels=tuple(i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in sd),
    )  # fmt: skip


def load_vavae(path: str | Path, stats: str | Path | None = None, multiplier: float = 1.0) -> KLAutoencoder:
    """A VA-VAE (or any LDM KL autoencoder) checkpoint as a :class:`KLAutoencoder`, with the latent
    statistics of ``stats`` (LightningDiT's ``latents_stats.pt``) if given. Errors: field
    ``autoencoder`` for the weights, ``latent_stats`` for the statistics."""
    path = Path(path)
    payload = _load(path, "autoencoder")
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    sd = _tensors(path, payload, "autoencoder")
    kept = {k: v for k, v in sd.items() if k.startswith(AUTOENCODER_PREFIXES)}
    config = autoencoder_config(path, kept)
    try:  # shapes read off an untrusted file can still be ones the layers refuse (GroupNorm needs ch % 32 == 0)
        with torch.device("meta"):
            expected = {k: v for k, v in KLAutoencoder(config).state_dict().items() if not k.startswith("latent_")}
    except (ConfigError, ValueError, RuntimeError, TypeError) as exc:
        message = exc.message if isinstance(exc, ConfigError) else str(exc)
        raise CheckpointError(f"{path}: not an autoencoder LowDiff can build ({message})", "autoencoder") from None
    _check_against(path, kept, expected, f"an LDM KL autoencoder {config}", "autoencoder")
    model = KLAutoencoder(config)
    model.load_state_dict(kept, strict=False)
    if stats is not None:
        mean, std = read_latent_stats(Path(stats), config.z_channels)
        model.latent_mean.copy_(mean)
        model.latent_std.copy_(std)
    model.latent_multiplier = float(multiplier)
    return model.eval()


def read_latent_stats(path: Path, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``{"mean", "std"}`` per latent channel ([1, C, 1, 1] or [C]); std must be positive and finite."""
    data = _load(path, "latent_stats")
    if not isinstance(data, dict) or not {"mean", "std"} <= set(data):
        raise CheckpointError(f"{path}: expected a dict with 'mean' and 'std'", "latent_stats")
    out = []
    for key in ("mean", "std"):
        value = data[key]
        if (
            not isinstance(value, torch.Tensor)
            or value.numel() != channels
            or value.shape not in ((channels,), (1, channels, 1, 1))
        ):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"{path}: {key} must be [1, {channels}, 1, 1] for {channels} latent channels, got {shape}",
                "latent_stats",
            )
        value = value.float().reshape(1, channels, 1, 1)
        if not bool(torch.isfinite(value).all()) or (key == "std" and not bool((value > 0).all())):
            raise CheckpointError(
                f"{path}: {key} must be finite{' and positive' if key == 'std' else ''}", "latent_stats"
            )
        out.append(value)
    return out[0], out[1]


# ------------------------------------------------------------------------------------ the pair as a model

BASELINE_CONFIG = "lightningdit-b1-imagenet256"  # whose schedule and recipe an imported baseline takes
CASCADE_CONFIG = "lowdiff-dit-b1-imagenet256"  # … and an imported cascade
CASCADE_SEED = 0  # the fresh lower-stage layers of an imported cascade: the same files give the same model


@dataclass
class ImportedLatentModel:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # the (cascade) UnifiedDiT's, UnifiedDiT names
    decoder: LatentDecoder  # the VA-VAE's decoder with the latent statistics
    metadata: dict[str, Any] = field(default_factory=dict)


def _shaped_like(base: ModelConfig, network: DiTConfig, autoencoder: AutoencoderConfig, sources: str) -> ModelConfig:
    """``base`` (a built-in latent config) with the imported sizes: its stages moved onto the network's
    resolutions, guidance kept to the channels that exist. The built-in name is kept only when the
    sizes are the built-in's, so that a tiny or XL import never claims to be B/1."""
    channels, side = network.img_channels, network.img_resolution

    def guided(n: int | None) -> int | None:
        return None if n is None else min(n, channels)

    stages = tuple(
        replace(s, resolution=r, guidance_channels=guided(s.guidance_channels))
        for s, r in zip(base.schedule.stages, network.resolutions, strict=True)
    )
    same = network == base.network and autoencoder == base.autoencoder
    shape = f"width {network.hidden_size}, depth {network.depth}, {side}×{side}×{channels}"
    kind = "a LowDiff cascade of LightningDiT" if len(network.resolutions) > 1 else "LightningDiT"
    described = base.description if same else f"{kind} ({shape}) on {base.name}'s schedule and recipe"
    name = base.name if same else f"{base.name.split('-b1-')[0]}-w{network.hidden_size}-d{network.depth}-imported"
    return replace(
        base, name=name, network=network, schedule=CascadeSchedule(stages), autoencoder=autoencoder,
        class_names=base.class_names if same else (), description=f"{described}; imported from {sources}",
    )  # fmt: skip


def import_lightningdit_pair(
    dit: str | Path, vae: str | Path, stats: str | Path, cascade: bool = False
) -> ImportedLatentModel:
    """A LightningDiT checkpoint, a VA-VAE checkpoint and its ``latents_stats.pt`` as one latent model.

    The baseline computes the released model's function exactly (its weights, LightningDiT's sampling
    settings); ``cascade`` gives :data:`CASCADE_CONFIG`'s two stages (half, then full latent side) with
    the top stage computing the baseline (:func:`init_cascade_from_baseline`) and the lower stage
    untrained, a starting point for ``lowdiff train --init-from``. Errors are one :class:`CheckpointError`
    whose field is the file's role (``dit``, ``vae``, ``stats``), or ``cascade`` when the latent side
    has no lower stage."""
    dit, vae, stats = Path(dit), Path(vae), Path(stats)
    imported = import_lightningdit(dit, field_name="dit")
    try:
        autoencoder = load_vavae(vae, stats)
    except CheckpointError as exc:
        raise exc.for_field({"latent_stats": "stats"}.get(exc.field or "", "vae")) from None
    network = imported.network
    if autoencoder.config.z_channels != network.img_channels:
        raise CheckpointError(
            f"{vae}: {autoencoder.config.z_channels} latent channels, but the DiT ({dit.name}) works on "
            f"{network.img_channels}",
            "vae",
        )
    decoder = LatentDecoder.from_autoencoder(autoencoder)
    state_dict = imported.state_dict
    top = network.img_resolution
    if cascade:
        low = top // 2
        if top % 2 or low < network.patch_size or low % network.patch_size:
            raise CheckpointError(
                f"a {top}×{top} latent with patch size {network.patch_size} has no {low}×{low} stage below it",
                "cascade",
            )
        network = cascade_network(network, (low, top))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CASCADE_SEED)
            net = UnifiedDiT(network)
        init_cascade_from_baseline(net, state_dict, "dit")
        state_dict = net.state_dict()
    sources = f"{dit.name} + {vae.name} + {stats.name}"
    base = get_config(CASCADE_CONFIG if cascade else BASELINE_CONFIG)
    try:
        config = _shaped_like(base, network, decoder.config, sources)
    except ConfigError as exc:
        raise CheckpointError(f"{dit}: the pair makes no valid latent config ({exc.message})", "dit") from None
    metadata: dict[str, Any] = {
        "imported_from": "lightningdit",
        "cascade": cascade,
        **{f"{role}_file": path.name for role, path in (("dit", dit), ("vae", vae), ("stats", stats))},
        **{f"{role}_sha256": file_sha256(path) for role, path in (("dit", dit), ("vae", vae), ("stats", stats))},
    }
    return ImportedLatentModel(config, state_dict, decoder, metadata)
