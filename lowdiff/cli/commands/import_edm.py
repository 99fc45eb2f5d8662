"""``lowdiff import-edm``: an EDM network snapshot (``network-snapshot-*.pkl``) as a LowDiff checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowdiff.cli.args import HelpFormatter, positive_int


def register(sub: Any) -> None:
    p = sub.add_parser(
        "import-edm",
        help="convert an EDM network snapshot (.pkl) into a LowDiff checkpoint (.pt or .safetensors)",
        formatter_class=HelpFormatter,
        description=(
            "Reads NVlabs/edm's network-snapshot-*.pkl as data (its pickled code is never run), maps its "
            "DDPM++ SongUNet (EDMPrecond or VPPrecond) onto LowDiff's network and writes a single-stage "
            "checkpoint sampled as EDM's generate.py samples: Heun, σ 0.002…80 (clamped to the network's "
            "range), ρ = 7. Other networks (DhariwalUNet, NCSN++, VEPrecond, modified SongUNets) are refused "
            "with the part that cannot be mapped. --checkpoint of every command also accepts the .pkl itself."
        ),
    )
    p.add_argument("snapshot", type=Path, help="EDM's network-snapshot-*.pkl")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write: .pt, or .safetensors")
    p.add_argument("--num-steps", type=positive_int, default=18, help="Heun steps of the schedule (EDM's default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lowdiff.edm_import import EDMImportError, import_snapshot
    from lowdiff.errors import SettingsError
    from lowdiff.model import SAFETENSORS_SUFFIX, LowDiffModel

    if args.out.suffix not in (".pt", SAFETENSORS_SUFFIX):
        raise SettingsError(f"expected a .pt or {SAFETENSORS_SUFFIX} file name, got {args.out.name!r}", "out")
    try:
        imported = import_snapshot(args.snapshot, num_steps=args.num_steps)
    except EDMImportError as exc:
        raise exc.for_field("snapshot") from None
    model = LowDiffModel(imported.config)
    model.denoiser.net.load_state_dict(imported.state_dict)
    model.metadata = imported.metadata
    model.save(args.out)
    net, stage = imported.config.network, imported.config.schedule.stages[0]
    labels = f"{net.label_dim} classes" if net.label_dim else "unconditional"
    print(
        f"{args.out}  ({imported.metadata['edm_precond']} → {imported.config.preconditioning}, "
        f"{net.img_resolution}×{net.img_resolution}×{net.img_channels}, {labels}, "
        f"{stage.num_steps} steps σ {stage.sigma_min:g}…{stage.sigma_max:g})"
    )
