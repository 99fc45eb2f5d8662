"""``lowdiff models``: the built-in configs with parameter counts, NFE and GFLOP per stage."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lowdiff.cli.args import HelpFormatter


def register(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help="list built-in configs with parameter counts, NFE and GFLOP per stage",
        formatter_class=HelpFormatter,
    )
    p.add_argument("names", nargs="*", help="configs to show (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--dump",
        metavar="NAME",
        default=None,
        help="print one config whole, as JSON that `train --config FILE.json` takes (a start for your own)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lowdiff.counting import describe_all

    if args.dump is not None:
        from lowdiff.model import config_to_dict, load_config

        print(json.dumps(config_to_dict(load_config(args.dump)), indent=2))
        return

    table = describe_all(args.names or None)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    width = max(len("config"), *(len(name) for name in table))
    header = (
        f"{'config':{width}} {'parameters':>11} {'precond':>7} {'classes':>7} {'GFLOP/image':>11}  "
        "stages: resolution × NFE"
    )
    print(header)
    print("-" * len(header))
    for name, info in table.items():
        stages = "  ".join(f"{s['resolution']}²×{s['nfe']}" for s in info["stages"])
        print(
            f"{name:{width}} {info['params']:>11,} {info['preconditioning']:>7} {info['num_classes'] or '-':>7} "
            f"{info['gflops_per_image']:>11.2f}  {stages}"
        )
    print("\nGFLOP/image = Σ over stages of NFE × GFLOP per evaluation (`--json` has each stage's figure).")
