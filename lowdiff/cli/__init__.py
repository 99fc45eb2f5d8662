"""The ``lowdiff`` command line: the root parser registers each command of :mod:`lowdiff.cli.commands`.

This is the top layer and the CLI's error boundary: any :class:`lowdiff.errors.LowDiffError` a
command raises (bad flag, missing file, unusable engine, wrong checkpoint contents, …) is printed as
one line naming the flag, ``lowdiff CMD: error: --flag: what is wrong``, with exit status 2; never
a traceback. Nothing imports this package but ``lowdiff.__main__`` and the console script.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lowdiff.cli.commands import COMMANDS
from lowdiff.errors import LowDiffError

EXIT_USAGE = 2


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lowdiff-serve")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowdiff", description="LowDiff: cascaded low-resolution diffusion.")
    parser.add_argument("--version", action="version", version=f"lowdiff-serve {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LowDiffError as exc:
        print(f"lowdiff {args.command}: error: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0
