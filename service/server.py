"""Run the app under uvicorn with a graceful SIGTERM drain.

Drain, as orchestrators expect it: on SIGTERM (or Ctrl-C) readiness turns 503 and new requests
get 503 while requests already accepted finish; when none is left, or after ``--grace-s``, the
server closes its socket and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import torch
import uvicorn

from service.app import Service, create_app
from service.loading import load_model
from service.logs import configure_logging
from service.settings import ServeSettings, SettingsError

log = logging.getLogger("lowdiff.service")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose signal handler drains instead of closing the socket at once."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.exit_code = 0
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: that one re-raises the signal after shutdown, so the process would
        # die of SIGTERM instead of exiting 0.
        if self._drain_deadline is not None:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            self.force_exit = True
            self.should_exit = True
            return
        if not self.started:
            self.should_exit = True
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
        if time.monotonic() > self._drain_deadline:
            log.error("grace period over with %d request(s) in flight; exiting", self.service.in_flight)
            return True
        return False


def serve(settings: ServeSettings) -> int:
    """Run until drained; 0 after a clean drain, 1 if the engine failed to load."""
    from lowdiff.cli import CLIError

    try:
        # Load the weights before binding, so that a bad --checkpoint is a usage error (status 2).
        model = load_model(settings)
    except SettingsError as exc:
        raise CLIError(str(exc)) from None
    configure_logging(settings.log_level)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    app = create_app(settings, model=model)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # our middleware logs every request with its id
        timeout_graceful_shutdown=5,  # after the drain only responses still being written are left
        lifespan="on",
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    return server.exit_code
