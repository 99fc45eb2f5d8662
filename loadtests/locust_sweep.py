"""Locust side of the concurrency sweeps (``loadtests/saturation.py``, ``loadtests/service_overhead.py``).

``SweepUser`` is a closed-loop ``FastHttpUser``: it sends its next ``POST /generate`` (``Accept: image/png``,
random class label and seed) as soon as the last one is answered; a response counts only with status 200
and a PNG body (the signature is checked, not decoded: the client must stay cheap at thousands of
requests/s; ``locustfile.py`` decodes every image).

``UserLevels`` (a ``LoadTestShape``) steps through the user counts of ``--sweep-users``. Each level runs
``--sweep-ramp-s`` (users start and settle, not measured), then a measured window of ``--sweep-window-s``
(rounded to whole seconds, starting on one), then, with worker processes, a short wait until the workers
have reported the window's last requests.
Per level it writes one row of ``<--csv prefix>_levels.csv``, from Locust's own stats of ``POST /generate``:

* ``Request Count`` / ``Failure Count`` / ``Requests/s`` / ``Failures/s``: requests *completed* within the
  window's seconds (``Window Start`` <= unix time < ``Window End``; Locust counts requests per second of
  completion, so this is exact however late the workers report); images/s = (Requests/s - Failures/s) x
  ``Images/Request``;
* ``50%`` ... ``100%``, ``Average Response Time`` (ms): the responses that reached the master's stats
  during the window, i.e. the window shifted by up to one report interval (Locust's rounding: 10 ms
  steps above 100 ms, 100 ms steps above 1 s).

Locust's usual ``--csv`` files cover the whole run (all levels). Any number of ``--processes``:

    locust -f loadtests/locust_sweep.py --headless --processes 2 --host http://127.0.0.1:8000 \\
        --sweep-users 16,64,256 --sweep-ramp-s 3 --sweep-window-s 10 --csv out/locust --only-summary
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from typing import Any

import gevent
import gevent.lock
import locust.runners
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.runners import LocalRunner
from locust.stats import calculate_response_time_percentile, diff_response_time_dicts

MAX_SEED = 2**32 - 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REQUEST_NAME = "/generate [png]"
PERCENTILES = (0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
LEVEL_COLUMNS = [
    "User Count", "Images/Request", "Window Start", "Window End", "Window Seconds", "Request Count",
    "Failure Count", "Requests/s", "Failures/s", "Latency Sample Count", "Average Response Time",
    *(f"{100 * p:g}%" for p in PERCENTILES),
]  # fmt: skip

# Workers send their stats to the master every WORKER_REPORT_INTERVAL seconds (3 by default). Requests/s
# does not depend on it (see above), but the latency sample of a window starts when the window starts on
# the master, so a report lag of up to 3 s would pull ramp-time requests into it; 1 s keeps it inside
# the ramp's settled part at a negligible cost (one small message per worker and second).
locust.runners.WORKER_REPORT_INTERVAL = 1.0
logger = logging.getLogger("lowdiff.sweep")
_model_info_lock = gevent.lock.Semaphore()


@events.init_command_line_parser.add_listener
def _sweep_arguments(parser: Any) -> None:
    parser.add_argument("--sweep-users", default="1,16,64,256", help="comma-separated user counts, one level each")
    parser.add_argument("--sweep-ramp-s", type=float, default=3.0, help="unmeasured start of each level (>= 3)")
    parser.add_argument("--sweep-window-s", type=float, default=10.0, help="measured part of each level")
    parser.add_argument("--images-per-request", type=int, default=1, help="num_images of each request")


class SweepUser(FastHttpUser):
    wait_time = constant(0)  # closed loop
    network_timeout = 900.0  # a saturated CPU server answers in seconds to minutes, not a failure
    connection_timeout = 60.0
    model_info: dict[str, Any] | None = None  # GET /v1/models once per process, not once per user

    def on_start(self) -> None:
        key = os.environ.get("LOWDIFF_API_KEY")
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.headers = {**auth, "Accept": "image/png"}
        with _model_info_lock:
            if SweepUser.model_info is None:
                SweepUser.model_info = self.client.get("/v1/models", name="/v1/models", headers=auth).json()
        info = SweepUser.model_info
        self.num_classes = int(info.get("num_classes") or 0) if info.get("conditional", True) else 0
        self.images = int(self.environment.parsed_options.images_per_request)

    @task
    def generate(self) -> None:
        body = {"seed": random.randint(0, MAX_SEED - self.images + 1), "num_images": self.images}
        if self.num_classes:
            body["class_label"] = random.randrange(self.num_classes)
        with self.client.post(
            "/generate", json=body, headers=self.headers, name=REQUEST_NAME, catch_response=True
        ) as r:
            if r.status_code != 200:
                # status only: bodies carry request ids, which would make every failure its own row
                r.failure(f"status {r.status_code}" + (f" ({type(r.error).__name__})" if r.error else ""))
            elif not (r.content or b"").startswith(PNG_SIGNATURE):
                r.failure("200 without a PNG body")


def _latencies(entry: Any, old_times: dict[int, int], old_count: int, old_total: float) -> dict[str, Any]:
    """Average and percentiles (ms) of the responses that reached the stats since the given snapshot."""
    times = diff_response_time_dicts(dict(entry.response_times), old_times)
    count = entry.num_requests - entry.num_none_requests - old_count
    row: dict[str, Any] = {
        "Latency Sample Count": count,
        "Average Response Time": round((entry.total_response_time - old_total) / count, 1) if count else "N/A",
    }
    for p in PERCENTILES:
        row[f"{100 * p:g}%"] = calculate_response_time_percentile(times, count, p) if count else "N/A"
    return row


def _window_row(entry: Any, latencies: dict[str, Any], users: int, images: int, t0: int, t1: int) -> dict[str, Any]:
    seconds = range(t0, t1)  # the window's whole seconds, [t0, t1)
    requests = sum(entry.num_reqs_per_sec.get(s, 0) for s in seconds)
    failures = sum(entry.num_fail_per_sec.get(s, 0) for s in seconds)
    return {
        "User Count": users,
        "Images/Request": images,
        "Window Start": t0,
        "Window End": t1,
        "Window Seconds": len(seconds),
        "Request Count": requests,
        "Failure Count": failures,
        "Requests/s": round(requests / len(seconds), 3),
        "Failures/s": round(failures / len(seconds), 3),
        **latencies,
    }


class UserLevels(LoadTestShape):
    """One level per ``--sweep-users`` entry: ramp, measured window, report lag; then stop."""

    def __init__(self) -> None:
        super().__init__()
        self.level: tuple[int, float] | None = None
        self.timeline: gevent.Greenlet | None = None
        self.finished = False

    def tick(self) -> tuple[int, float] | None:
        if self.timeline is None:  # the first tick, on the master (or the only process)
            options = self.runner.environment.parsed_options
            levels = [int(u) for u in options.sweep_users.split(",")]
            self.level = (levels[0], float(max(levels[0], 1)))
            self.timeline = gevent.spawn(self._run, levels, options)
        if self.finished:
            return None
        return self.level

    def _run(self, levels: list[int], options: Any) -> None:
        try:
            self._levels(levels, options)
        except Exception:  # a broken sweep must not pass for a short one
            logger.exception("sweep failed")
            self.runner.environment.process_exit_code = 3
        self.finished = True

    def _levels(self, levels: list[int], options: Any) -> None:
        distributed = not isinstance(self.runner, LocalRunner)
        settle = locust.runners.WORKER_REPORT_INTERVAL + 1.0 if distributed else 0.0
        path = f"{options.csv_prefix}_levels.csv" if options.csv_prefix else None
        if path:
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=LEVEL_COLUMNS).writeheader()
        for users in levels:
            # the next tick (<= 1 s) starts them, all within ~1 s (Locust warns above 100 users/s per worker;
            # these users do nothing at start but one GET per process, and 256 start in ~0.3 s)
            self.level = (users, float(max(users, 1)))
            gevent.sleep(options.sweep_ramp_s)
            # the window: whole seconds, as Locust counts requests per second of completion
            t0 = math.ceil(time.time())
            t1 = t0 + max(round(options.sweep_window_s), 1)
            gevent.sleep(max(t0 - time.time(), 0))
            entry = self.runner.stats.get(REQUEST_NAME, "POST")
            before = (dict(entry.response_times), entry.num_requests - entry.num_none_requests,
                      entry.total_response_time)  # fmt: skip
            gevent.sleep(max(t1 - time.time(), 0))
            latencies = _latencies(entry, *before)
            gevent.sleep(settle)  # the workers' reports of the window's last requests arrive
            row = _window_row(entry, latencies, users, options.images_per_request, t0, t1)
            logger.info("level %s", row)
            if path:
                with open(path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=LEVEL_COLUMNS).writerow(row)
