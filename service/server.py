"""Run the app under uvicorn with a graceful SIGTERM drain.

Drain, as orchestrators expect it: on SIGTERM (or Ctrl-C) readiness turns 503 and new requests
get 503 while requests already accepted finish; when none is left, or after ``--grace-s``, the
server closes its socket and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from types import FrameType

import torch
import uvicorn

from lowdiff.engines import check_engine_options
from lowdiff.model import load_model
from lowdiff.service.app import create_app
from lowdiff.service.logs import configure_logging
from lowdiff.service.settings import ServeSettings
from lowdiff.service.state import Service
from lowdiff.threads import default_threads

log = logging.getLogger("lowdiff.service")

# After grace: the longest wait for the 503s of aborted requests before the sockets close.
ABORT_FLUSH_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose signal handler drains instead of closing the socket at once."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.exit_code = 0
        self._drain_deadline: float | None = None
        self._aborted_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: that one re-raises the signal after shutdown, so the process would
        # die of SIGTERM instead of exiting 0.
        if not self.started:
            self.should_exit = True
            return
        if self._drain_deadline is not None:
            # A second signal shortens the drain the same way the end of grace does: requests still
            # open are answered 503 + Retry-After (never cut off, never 500), then the process exits.
            log.warning("second %s: ending the drain now", signal.Signals(sig).name)
            self._drain_deadline = time.monotonic()
            return
        self._drain_deadline = time.monotonic() + self.service.settings.grace_s
        self.service.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.service.state == "failed":
            self.exit_code = 1
            return True
        if self._drain_deadline is None:
            return False
        if self.service.idle():
            log.info("drained: no request in flight; exiting")
            return True
        now = time.monotonic()
        if now >= self._drain_deadline and self._aborted_at is None:
            log.error("grace period over with %d request(s) in flight: answering them 503", self.service.in_flight)
            self.service.abort_in_flight()
            self._aborted_at = now
        # After the abort, close once every open request has its 503 (or after ABORT_FLUSH_S).
        return self._aborted_at is not None and (self.service.idle() or now - self._aborted_at > ABORT_FLUSH_S)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_open(settings: ServeSettings) -> None:
    """A warning in the log when anyone who can reach a non-loopback address may generate."""
    if settings.api_key is None and not is_loopback(settings.host):
        log.warning(
            "serving without an API key on %s: anyone who can reach this address can generate "
            "(set LOWDIFF_API_KEY to require 'Authorization: Bearer <key>')",
            settings.host,
        )


def serve(settings: ServeSettings) -> int:
    """Run until drained; 0 after a clean drain, 1 if the engine failed to load for an internal reason.

    What the user gave is checked before the port opens (the weights are loaded, the engine options
    checked) and raises :class:`lowdiff.errors.LowDiffError`; so does an engine that fails in the
    loading thread because of what the user gave (an unusable device, a tampered engine folder):
    the server stops and the error is raised here, for the CLI to print as one line (status 2)."""
    check_engine_options(settings.engine, settings.engine_dir, settings.device)
    model = load_model(settings.checkpoint, settings.config)
    configure_logging(settings.log_level)
    warn_if_open(settings)
    torch.set_num_threads(settings.threads or default_threads())
    app = create_app(settings, model=model)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # our middleware logs every request with its id
        timeout_graceful_shutdown=1,  # after the drain only responses still being written are left
        # Past it: 503 at once, not a held descriptor. uvicorn refuses when the open connections,
        # the one asking included, reach its limit: +1 serves exactly --max-connections of them.
        limit_concurrency=settings.max_connections + 1,
        lifespan="on",
    )
    service: Service = app.state.service
    server = DrainingServer(config, service)
    server.run()
    if service.error is not None:
        raise service.error
    if service.engine_busy():
        # A batch is still running in the engine thread (its requests were answered 503). The
        # interpreter would wait for it at exit; the drain's promise is to exit within grace.
        log.warning("exiting with an engine batch still running")
        logging.shutdown()
        os._exit(server.exit_code)
    return server.exit_code
