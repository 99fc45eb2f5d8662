"""Fixtures shared by the whole suite: tiny models, a controllable fake engine, a live loopback server, polling.

Helpers are fixtures, never imported modules: a test asks for ``tiny_config``, ``fake_engine``,
``live_server`` … by name. The factories are session-scoped (they hold no state), so module-scoped
fixtures can use them too; each call makes a fresh object.
"""

from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from lowdiff.autoencoder import AutoencoderConfig
from lowdiff.configs import ModelConfig, get_config
from lowdiff.dit import DiTConfig
from lowdiff.engines import EngineInfo
from lowdiff.model import LowDiffModel
from lowdiff.network import NetworkConfig
from lowdiff.schedule import CascadeSchedule, FlowStageSchedule, StageSchedule

torch.set_num_threads(2)

# fashion32's cascade shape with few steps: the tiny model then answers in tens of milliseconds.
SHORT_SCHEDULE = CascadeSchedule(
    (
        StageSchedule(8, 4, truncate_at=2),
        StageSchedule(16, 4, truncate_at=2, final_step="euler", sigma_min=0.01, sigma_max=50.0),
        StageSchedule(32, 3, sigma_min=0.01, sigma_max=50.0),
    )
)


# ---------------------------------------------------------------------------- tiny models
def make_tiny_config(resolutions: tuple[int, ...] = (8, 16, 32), label_dim: int = 10, channels: int = 1) -> ModelConfig:
    """fashion32's schedule on a network small enough for fast tests."""
    base = get_config("fashion32")
    schedule = base.schedule
    if resolutions != base.resolutions:
        schedule = (
            get_config("edm-fashion32").schedule
            if len(resolutions) == 1
            else get_config("cifar10-cond-2stage").schedule
        )
    net = NetworkConfig(
        img_resolution=32,
        img_channels=channels,
        label_dim=label_dim,
        resolutions=resolutions,
        model_channels=8,
        channel_mult=(1, 1, 2),
        num_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
        augment_dim=0,
    )
    return ModelConfig(name="tiny", network=net, schedule=schedule, preconditioning="edm", pad=2)


def make_tiny_model(seed: int = 0) -> LowDiffModel:
    torch.manual_seed(seed)
    model = LowDiffModel(make_tiny_config())
    # Zero-initialised output layers make every denoiser near-identity; perturb them so that tests
    # exercise a network whose output depends on its input.
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def make_tiny_fast_model(seed: int = 0) -> LowDiffModel:
    """The perturbed tiny model on SHORT_SCHEDULE (few steps per stage)."""
    return make_tiny_model(seed).with_schedule(SHORT_SCHEDULE)


def make_tiny_latent_config(
    resolutions: tuple[int, ...] = (4, 8), guidance_scale: float = 1.0, channels: int = 4
) -> ModelConfig:
    """A DiT of the B/1 recipe shrunk to width 32, depth 2, 2 heads, on 8×8×``channels`` latents, 10
    classes, with short flow stages (6 + 4 Euler steps, or 8 for a single stage), and a tiny KL
    autoencoder (width 32, one downsampling, attention at the latent level) whose decoder makes 16×16 RGB."""
    net = DiTConfig(
        img_resolution=resolutions[-1], img_channels=channels, label_dim=10, resolutions=resolutions,
        hidden_size=32, depth=2, num_heads=2,
    )  # fmt: skip
    guide = {"guidance_scale": guidance_scale, "guidance_start": 0.1, "shift": 0.5}
    if len(resolutions) == 1:
        stages: tuple[FlowStageSchedule, ...] = (FlowStageSchedule(resolutions[0], 8, **guide),)
    else:
        stages = (FlowStageSchedule(resolutions[0], 8, truncate_at=6, **guide),)
        stages += tuple(FlowStageSchedule(r, 4, truncate_at=2, **guide) for r in resolutions[1:-1])
        stages += (FlowStageSchedule(resolutions[-1], 4, **guide),)
    autoencoder = AutoencoderConfig(
        ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=channels,
        encoder_attn_levels=(), decoder_attn_levels=(1,),
    )  # fmt: skip
    return ModelConfig(
        name="tiny-latent", network=net, schedule=CascadeSchedule(stages), preconditioning="flow",
        autoencoder=autoencoder,
    )  # fmt: skip


def make_tiny_latent_model(seed: int = 0, **kwargs: Any) -> LowDiffModel:
    """The tiny latent model with every weight perturbed (LightningDiT zero-initialises adaLN and the
    output layers, which would make the velocity identically zero)."""
    torch.manual_seed(seed)
    model = LowDiffModel(make_tiny_latent_config(**kwargs))
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_latent_config() -> Callable[..., ModelConfig]:
    """``tiny_latent_config(resolutions=(4, 8), guidance_scale=1.0, channels=4)`` → a tiny DiT's ModelConfig."""
    return make_tiny_latent_config


@pytest.fixture(scope="session")
def tiny_latent_model() -> Callable[..., LowDiffModel]:
    """``tiny_latent_model(seed=0, **config_kwargs)`` → the tiny DiT model, perturbed weights."""
    return make_tiny_latent_model


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., ModelConfig]:
    """``tiny_config(resolutions=(8, 16, 32), label_dim=10, channels=1)`` → a tiny network's ModelConfig."""
    return make_tiny_config


@pytest.fixture
def tiny_model() -> LowDiffModel:
    """The tiny network (seed 0), perturbed so that its output depends on its input."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_fast_model() -> Callable[..., LowDiffModel]:
    """``tiny_fast_model(seed=0)`` → the perturbed tiny model on a short schedule (tens of ms per image)."""
    return make_tiny_fast_model


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module: tiny models gain nothing from two, and on a busy 2-core machine
    OpenMP's two-thread barriers can make eager PyTorch many times slower.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- the CLI in-process
def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in-process (a fresh interpreter costs seconds of imports on a busy CI machine)."""
    from lowdiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def lowdiff_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``lowdiff_cli("bench", "--config", …)`` → CompletedProcess(args, returncode, stdout, stderr), run in-process."""
    return run_cli


# ---------------------------------------------------------------------------- a fake engine
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


@pytest.fixture(scope="session")
def fake_engine() -> type[FakeEngine]:
    """``fake_engine(conditional=True, num_classes=10, resolutions=(8, 16, 32))`` → a new FakeEngine:
    ``.gate`` / ``.warmup_gate`` (threading.Event, set) hold batches / warm-up while cleared,
    ``.fail_seeds`` makes batches fail, ``.batches`` and ``.ran(seed)`` say what ran."""
    return FakeEngine


# ---------------------------------------------------------------------------- polling, ports, metrics
def poll_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., None]:
    """``wait_until(predicate, timeout=30.0, interval=0.02)``: poll until true, else fail the test."""
    return poll_until


def pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()`` → a TCP port on 127.0.0.1 that was free a moment ago."""
    return pick_free_port


def sample_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value from a Prometheus exposition (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


@pytest.fixture(scope="session")
def metric_value() -> Callable[..., float]:
    """``metric_value(exposition_text, name, labels=None)`` → one sample's value (0 if absent)."""
    return sample_value


# ---------------------------------------------------------------------------- a live server
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
        poll_until(lambda: self.server.started, timeout=30)
        return self

    def wait_ready(self, timeout: float = 60.0) -> LiveServer:
        poll_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout=timeout)
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="session")
def live_server() -> type[LiveServer]:
    """``with live_server(app) as srv:`` the app under uvicorn on 127.0.0.1 in a thread; ``srv.url``,
    ``srv.service`` (app.state.service), ``srv.wait_ready(timeout)`` (→ srv), ``srv.client(**httpx_kwargs)``."""
    return LiveServer
