"""``lowdiff import-lightningdit``: a released LightningDiT + VA-VAE pair as one LowDiff latent checkpoint.

The DiT alone cannot make images: its latents mean something only to the autoencoder it was trained
on, normalised by that autoencoder's statistics. So the command takes all three files at once and
writes a checkpoint that carries the decoder and statistics beside the DiT, which every command then
runs as it runs any latent model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowdiff.cli.args import HelpFormatter


def register(sub: Any) -> None:
    p = sub.add_parser(
        "import-lightningdit",
        help="convert a LightningDiT checkpoint + VA-VAE + latent statistics into a LowDiff checkpoint",
        formatter_class=HelpFormatter,
        description=(
            "Reads a LightningDiT checkpoint, a VA-VAE (LDM KL autoencoder) checkpoint and LightningDiT's "
            "latents_stats.pt as weights only (no pickled code runs), checks every tensor's name and shape, and "
            "writes a latent checkpoint that `lowdiff sample`, `lowdiff serve` and lowdiff.load run: the DiT, "
            "the decoder and the statistics. Sizes are read off the tensors; the schedule is "
            "lightningdit-b1-imagenet256's (Euler NFE 100, shift 0.3, guidance 10 from t = 0.11), or with "
            "--cascade lowdiff-dit-b1-imagenet256's two stages (half, then full latent side) with the top stage "
            "computing the baseline and the lower stage untrained (train it with `lowdiff train --init-from`)."
        ),
    )
    p.add_argument("--dit", type=Path, required=True, help='LightningDiT checkpoint: {"ema": …} or a bare state dict')
    p.add_argument("--vae", type=Path, required=True, help='VA-VAE checkpoint: {"state_dict": …} or a bare state dict')
    p.add_argument("--stats", type=Path, required=True, help='latents_stats.pt: {"mean", "std"} per latent channel')
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write: .pt, or .safetensors")
    p.add_argument(
        "--cascade",
        action="store_true",
        help="write the LowDiff cascade initialised from the baseline, not the baseline",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lowdiff.errors import ConfigError, SettingsError
    from lowdiff.latent_import import import_lightningdit_pair
    from lowdiff.model import SAFETENSORS_SUFFIX, LowDiffModel, config_from_dict, config_to_dict

    if args.out.suffix not in (".pt", SAFETENSORS_SUFFIX):
        raise SettingsError(f"expected a .pt or {SAFETENSORS_SUFFIX} file name, got {args.out.name!r}", "out")
    imported = import_lightningdit_pair(args.dit, args.vae, args.stats, cascade=args.cascade)
    try:  # what loading will check: a shape the loaders accept but checkpoints do not is refused now, not later
        config_from_dict(config_to_dict(imported.config))
    except ConfigError as exc:
        field = "vae" if "autoencoder." in exc.message else "dit"
        raise ConfigError(f"the imported model cannot be stored: {exc.message}", field) from None
    model = LowDiffModel(imported.config, decoder=imported.decoder)
    model.denoiser.net.load_state_dict(imported.state_dict)
    model.metadata = imported.metadata
    model.save(args.out)
    config = imported.config
    stages = " + ".join(f"{s.resolution}×{s.resolution} NFE {s.nfe}" for s in config.schedule.stages)
    side = config.image_resolution
    print(
        f"{args.out}  ({config.name}: latents {stages}, decoded to {side}×{side}×{config.image_channels}, "
        f"{config.num_classes} classes)"
    )
