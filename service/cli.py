"""``lowdiff serve`` on the command line; kept free of heavy imports so that ``lowdiff --help`` is quick."""

from __future__ import annotations

import argparse
from typing import Any

from service.settings import SettingsError, add_serve_arguments, resolve_settings


def add_serve_parser(sub: Any) -> None:
    """Register ``serve`` on the ``lowdiff`` sub-command parser."""
    p = sub.add_parser(
        "serve",
        help="run the HTTP service (POST /generate, /v1/models, /healthz, /readyz, /metrics, /docs)",
        description="Serve LowDiff over HTTP. Every flag can also be set by the LOWDIFF_* variable shown; "
        "LOWDIFF_API_KEY, if set, requires 'Authorization: Bearer <key>' on /generate and /v1/models.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from lowdiff.cli import CLIError

    try:
        settings = resolve_settings(args)
    except SettingsError as exc:
        raise CLIError(str(exc)) from None
    from service.server import serve

    exit_code = serve(settings)
    if exit_code:
        raise SystemExit(exit_code)
