"""argparse value types shared by the commands: each rejects a bad value with one line naming the flag."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from lowdiff.requests import MAX_SEED

# Every command's help shows defaults.
HelpFormatter = argparse.ArgumentDefaultsHelpFormatter


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seed(text: str) -> int:
    value = nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be < 2^32, got {value}")
    return value


def add_quiet(parser: Any) -> None:
    """``--quiet`` on a long command: no progress (results, warnings and errors still print)."""
    parser.add_argument(
        "--quiet", action="store_true", help="no progress output (a bar on a terminal, a line every 10 s in logs)"
    )


def progress_stream(args: argparse.Namespace) -> TextIO | None:
    """Where a command's :class:`lowdiff.progress.Progress` writes: stderr, or nowhere with ``--quiet``."""
    return None if getattr(args, "quiet", False) else sys.stderr


THREADS_HELP = "torch CPU threads (default: the CPUs idle when the command starts, at least 1; see lowdiff/threads.py)"


def add_threads(parser: Any) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's intra-op threads from ``--threads`` or :func:`lowdiff.threads.default_threads`."""
    import torch

    from lowdiff.threads import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    return threads
