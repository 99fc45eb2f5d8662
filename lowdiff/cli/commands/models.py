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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lowdiff.counting import describe_all

    table = describe_all(args.names or None)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'config':22} {'params':>12}  stages (resolution: NFE, GFLOP/eval)")
    for name, info in table.items():
        stages = ", ".join(f"{s['resolution']}: {s['nfe']}, {s['gflops_per_image']:.3f}" for s in info["stages"])
        print(f"{name:22} {info['params']:>12,}  {stages}")
