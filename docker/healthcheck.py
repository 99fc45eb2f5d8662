#!/usr/bin/env python3
"""Container health check: exit 0 when GET /healthz on the local server answers 200.

Used by the images' HEALTHCHECK (slim images have no curl). The port comes from LOWDIFF_PORT,
as for `lowdiff serve`.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("LOWDIFF_PORT") or "8000"
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"healthcheck: {exc}", file=sys.stderr)
    sys.exit(1)
