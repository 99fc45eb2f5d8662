"""Helpers for the service tests: a controllable fake engine, a live loopback server, polling."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import torch
import uvicorn

from lowdiff.engines import EngineInfo
from lowdiff.model import LowDiffModel
from lowdiff.schedule import CascadeSchedule, StageSchedule
from tests.conftest import tiny_config

# fashion32's cascade shape with few steps: the tiny model then answers in tens of milliseconds.
SHORT_SCHEDULE = CascadeSchedule(
    (
        StageSchedule(8, 4, truncate_at=2),
        StageSchedule(16, 4, truncate_at=2, final_step="euler", sigma_min=0.01, sigma_max=50.0),
        StageSchedule(32, 3, sigma_min=0.01, sigma_max=50.0),
    )
)


def tiny_fast_model(seed: int = 0) -> LowDiffModel:
    torch.manual_seed(seed)
    model = LowDiffModel(tiny_config())
    with torch.no_grad():  # non-trivial outputs, as in conftest.tiny_model
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.with_schedule(SHORT_SCHEDULE)


class FakeEngine:
    """Instant, deterministic per-(class, seed) images; can hold batches, fail, or hold warm-up."""

    def __init__(self, conditional: bool = True, num_classes: int = 10, resolutions: Sequence[int] = (8, 16, 32)):
        self.conditional = conditional
        self.num_classes = num_classes
        self.resolutions = tuple(resolutions)
        self.gate = threading.Event()  # batches wait on it
        self.gate.set()
        self.warmup_gate = threading.Event()
        self.warmup_gate.set()
        self.fail_seeds: set[int] = set()
        self.batches: list[list[int]] = []  # seeds of every batch run (warm-up excluded)
        self.warmed_up = False

    def generate(
        self,
        seeds: Sequence[int],
        class_labels: Sequence[int] | None = None,
        on_stage: Callable[[int, float], None] | None = None,
    ) -> torch.Tensor:
        self.batches.append(list(seeds))
        if not self.gate.wait(timeout=60):
            raise RuntimeError("test gate never opened")
        if self.fail_seeds & set(seeds):
            raise RuntimeError("injected engine failure")
        for r in self.resolutions:
            if on_stage is not None:
                on_stage(r, 0.001)
        labels = class_labels if class_labels is not None else [0] * len(seeds)
        images = [
            torch.randint(0, 256, (1, 32, 32), generator=torch.Generator().manual_seed(int(s) * 1000 + int(c)))
            for s, c in zip(seeds, labels)
        ]
        return torch.stack(images).to(torch.uint8)

    def warmup(self, batch_size: int = 1) -> None:
        if not self.warmup_gate.wait(timeout=60):
            raise RuntimeError("warm-up gate never opened")
        self.warmed_up = True

    def info(self) -> EngineInfo:
        return EngineInfo(
            model="fake",
            engine="fake",
            device="cpu",
            precision="fp32",
            resolutions=self.resolutions,
            nfe_per_stage=(1,) * len(self.resolutions),
            schedule={},
            conditional=self.conditional,
            num_classes=self.num_classes if self.conditional else 0,
            image_channels=1,
            image_resolution=32,
            checkpoint_sha256=None,
            engine_dir=None,
        )

    def ran(self, seed: int) -> bool:
        return any(seed in batch for batch in self.batches)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


class LiveServer:
    """The app under a real uvicorn server on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, app: Any):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def service(self) -> Any:
        return self.app.state.service

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30)
        return self

    def wait_ready(self, timeout: float = 60.0) -> LiveServer:
        wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout=timeout)
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value from a Prometheus exposition (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0
