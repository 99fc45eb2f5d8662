"""``lowdiff serve``: the HTTP service. Flags come from the service's one settings table."""

from __future__ import annotations

import argparse
from typing import Any

from lowdiff.service.settings import add_serve_arguments


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP service (POST /generate, /v1/models, /healthz, /readyz, /metrics, /docs)",
        description="Serve LowDiff over HTTP. Every flag can also be set by the LOWDIFF_* variable shown; "
        "LOWDIFF_API_KEY, if set, requires 'Authorization: Bearer <key>' on /generate and /v1/models.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lowdiff.service.server import serve
    from lowdiff.service.settings import resolve_settings

    exit_code = serve(resolve_settings(args))
    if exit_code:
        raise SystemExit(exit_code)
