"""The stage-level scheduler (``--scheduler staged``): pixels depend only on (class, seed) whatever shares a
stage call, images that join while others are mid-cascade included; a fixed-cost engine shows where it
answers earlier than whole-cascade batching; cancelled work stops at the next stage boundary."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lowdiff.engines import load_engine
from lowdiff.errors import SettingsError
from lowdiff.service.app import create_app
from lowdiff.service.batcher import Batcher
from lowdiff.service.metrics import ServiceMetrics
from lowdiff.service.settings import ServeSettings, parse_stage_limits
from lowdiff.service.staged import StagedBatcher, default_stage_limits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RES = (8, 16, 32)


class Recording:
    """A real engine whose stage calls are recorded and whose first stage call can be held."""

    def __init__(self, engine):
        self.engine = engine
        self.entries: list[list[int]] = []  # seeds of every stage-0 call
        self.stages: list[tuple[int, int]] = []  # (stage, images) of every call
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def stage_noise(self, seeds: Sequence[int]) -> list[torch.Tensor]:
        self.entries.append(list(seeds))
        return self.engine.stage_noise(seeds)

    def run_stage(self, index, noise, class_labels, condition, sigma_cond, on_stage=None):
        self.stages.append((index, noise.shape[0]))
        self.started.set()
        assert self.hold.wait(60)
        return self.engine.run_stage(index, noise, class_labels, condition, sigma_cond, on_stage)


async def _wait(event: threading.Event) -> None:
    for _ in range(3000):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


def test_pixels_depend_only_on_class_and_seed_even_joining_mid_flight(tiny_fast_model) -> None:
    engine = Recording(load_engine(tiny_fast_model(), "torch"))
    a_seeds, a_labels = [100, 101, 102], [1, 2, 3]
    b_seeds, b_labels = [200, 201], [4, 5]

    async def scenario():
        batcher = StagedBatcher(
            engine, ThreadPoolExecutor(1), ServiceMetrics(), RES, {8: 4, 16: 4, 32: 2}, 0.0, max_queue=64
        )
        batcher.start()
        engine.hold.clear()
        a = batcher.submit(a_seeds, a_labels, deadline=time.monotonic() + 300)
        await _wait(engine.started)  # A's first stage call is running: B arrives mid-cascade
        b = batcher.submit(b_seeds, b_labels, deadline=time.monotonic() + 300)
        engine.hold.set()
        out = await a.future, await b.future
        await batcher.close()
        return out

    images_a, images_b = asyncio.run(scenario())
    # A's third image and B's first entered the cascade in one call: B joined while A was mid-flight.
    assert any(set(call) & set(a_seeds) and set(call) & set(b_seeds) for call in engine.entries), engine.entries
    assert engine.entries[0] == a_seeds[:2]
    for seeds, labels, images in ((a_seeds, a_labels, images_a), (b_seeds, b_labels, images_b)):
        assert len(images) == len(seeds)
        for seed, label, image in zip(seeds, labels, images):
            alone = engine.engine.generate([seed], [label])[0]  # the whole-cascade path, batch of one
            assert torch.equal(image, alone), (seed, (image.int() - alone.int()).abs().max())
    assert not torch.equal(images_a[0], images_a[1])  # not vacuous


class FixedCostEngine:
    """Each evaluation costs one tick whatever the batch size (a GPU's fixed per-evaluation cost, in the
    limit); records the clock when the images of each class label are done."""

    nfe = (2, 2, 2)

    def __init__(self) -> None:
        self.clock = 0
        self.done_at: dict[int, int] = {}
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def _tick(self, evaluations: int) -> None:
        self.started.set()
        assert self.hold.wait(60)
        self.clock += evaluations

    def _finish(self, labels: Sequence[int]) -> None:
        for label in labels:
            self.done_at[label] = self.clock

    def generate(self, seeds, class_labels=None, on_stage=None) -> torch.Tensor:
        self._tick(sum(self.nfe))
        self._finish(class_labels)
        return torch.zeros(len(seeds), 1, 32, 32, dtype=torch.uint8)

    def stage_noise(self, seeds):
        return [torch.zeros(len(seeds), 1, r, r) for r in RES]

    def run_stage(self, index, noise, class_labels, condition, sigma_cond, on_stage=None):
        self._tick(self.nfe[index])
        if index == len(RES) - 1:
            self._finish(class_labels)
        return noise.double(), (None if index == len(RES) - 1 else 1.0)

    def denoised_preview(self, index, x, class_labels, condition, sigma_cond):
        return torch.zeros(x.shape[0], 1, 32, 32, dtype=torch.float64)


def _arrives_mid_cascade(make_batcher) -> dict[int, int]:
    """192 images of class 1, then (while their first call runs) one image of class 7."""
    engine = FixedCostEngine()

    async def scenario():
        batcher = make_batcher(engine)
        batcher.start()
        engine.hold.clear()
        a = batcher.submit(list(range(192)), [1] * 192, deadline=time.monotonic() + 60)
        await _wait(engine.started)
        b = batcher.submit([999], [7], deadline=time.monotonic() + 60)
        engine.hold.set()
        await a.future
        await b.future
        await batcher.close()

    asyncio.run(scenario())
    return engine.done_at


def test_a_request_arriving_mid_cascade_is_answered_earlier_than_whole_cascade_batching() -> None:
    """Whole-cascade batches of 64 run 3 × 6 ticks before the late image's own 6; the staged scheduler runs
    the backlog's two low-resolution stages in one call each (2 + 2), its 32×32 stage in three (6)."""
    cascade = _arrives_mid_cascade(lambda e: Batcher(e, ThreadPoolExecutor(1), ServiceMetrics(), 64, 0.0, 1024))
    staged = _arrives_mid_cascade(
        lambda e: StagedBatcher(
            e, ThreadPoolExecutor(1), ServiceMetrics(), RES, default_stage_limits(RES, 64), 0.0, 1024
        )
    )
    assert cascade == {1: 18, 7: 24}
    assert staged == {1: 10, 7: 16}


def abandoned(metrics: ServiceMetrics, metric_value, resolution: str) -> float:
    return metric_value(
        metrics.exposition().decode(), "lowdiff_stage_images_abandoned_total", {"resolution": resolution}
    )


def test_cancelled_request_skips_its_remaining_stages(tiny_fast_model, metric_value) -> None:
    engine = Recording(load_engine(tiny_fast_model(), "torch"))
    metrics = ServiceMetrics()

    async def scenario():
        batcher = StagedBatcher(engine, ThreadPoolExecutor(1), metrics, RES, {8: 4, 16: 4, 32: 4}, 0.0, 64)
        batcher.start()
        engine.hold.clear()
        ticket = batcher.submit([5, 6], [0, 0], deadline=time.monotonic() + 300)
        await _wait(engine.started)
        batcher.cancel(ticket, "disconnect")
        engine.hold.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if abandoned(metrics, metric_value, "16") >= 2:
                break
        await batcher.close()

    asyncio.run(scenario())
    assert engine.stages == [(0, 2)]  # stage 16 and 32 never ran
    assert abandoned(metrics, metric_value, "16") == 2


def test_a_cascade_batch_run_for_a_stream_drops_a_cancelled_requests_images_at_the_next_stage(
    tiny_fast_model, metric_value
) -> None:
    """--scheduler cascade: a batch holding a stream's images runs one stage per call (for its previews); a
    request that goes away meanwhile loses its images at the next stage, its batch neighbours' pixels are
    the whole-cascade path's."""
    torch_engine = load_engine(tiny_fast_model(), "torch")
    engine = Recording(torch_engine)
    metrics = ServiceMetrics()

    async def scenario():
        batcher = Batcher(engine, ThreadPoolExecutor(1), metrics, 4, 0.0, 64, RES)
        batcher.start()
        engine.hold.clear()
        streamed = batcher.submit([5, 6], [0, 0], deadline=time.monotonic() + 300, stream=True)
        plain = batcher.submit([7], [3], deadline=time.monotonic() + 300)
        await _wait(engine.started)
        batcher.cancel(streamed, "disconnect")
        engine.hold.set()
        images = await plain.future
        await batcher.close()
        return streamed, images

    streamed, images = asyncio.run(scenario())
    assert streamed.previews
    assert engine.stages == [(0, 3), (1, 1), (2, 1)]  # one batch; the cancelled images stopped after stage 8
    assert abandoned(metrics, metric_value, "16") == 2
    assert torch.equal(images[0], torch_engine.generate([7], [3])[0])


def test_a_request_past_its_deadline_stops_at_the_next_stage(tiny_fast_model, metric_value) -> None:
    engine = Recording(load_engine(tiny_fast_model(), "torch"))
    metrics = ServiceMetrics()

    async def scenario():
        batcher = StagedBatcher(engine, ThreadPoolExecutor(1), metrics, RES, {8: 4, 16: 4, 32: 4}, 0.0, 64)
        batcher.start()
        engine.hold.clear()
        late = batcher.submit([7], [0], deadline=time.monotonic() + 0.2)
        await _wait(engine.started)
        await asyncio.sleep(0.3)  # its first stage outlives its deadline
        engine.hold.set()
        on_time = batcher.submit([8], [0], deadline=time.monotonic() + 300)
        await on_time.future
        await batcher.close()
        return late

    late = asyncio.run(scenario())
    assert late.cancelled == "deadline"
    assert engine.stages == [(0, 1), (0, 1), (1, 1), (2, 1)]  # the late image never ran stage 16 or 32
    assert abandoned(metrics, metric_value, "16") == 1


def test_stage_limits_parse_and_defaults() -> None:
    assert parse_stage_limits("8=512, 16=256,32=64") == {8: 512, 16: 256, 32: 64}
    for bad in ("8", "8=0", "x=3", "8=2,,=4", ""):
        with pytest.raises(SettingsError) as err:
            parse_stage_limits(bad)
        assert err.value.field == "max_batch_per_stage"
    assert default_stage_limits(RES, 64) == {8: 512, 16: 256, 32: 64}
    assert default_stage_limits(RES, 4) == {8: 64, 16: 16, 32: 4}
    with pytest.raises(SettingsError):
        ServeSettings(max_batch_per_stage="16=-1").validate()


def test_the_staged_limits_reach_the_engine_loader(tiny_fast_model, monkeypatch) -> None:
    """The cudagraph engine sizes its buckets per stage from them; the whole-cascade batcher's are --max-batch."""
    import lowdiff.engines
    from lowdiff.service.state import Service

    seen: list[object] = []
    monkeypatch.setattr(lowdiff.engines, "load_engine", lambda *a, stage_limits=None, **k: seen.append(stage_limits))
    model = tiny_fast_model()
    Service(ServeSettings(scheduler="staged", max_batch=4, max_batch_per_stage="8=8"), model=model)._load_engine()
    Service(ServeSettings(scheduler="cascade", max_batch=4), model=model)._load_engine()
    assert seen == [{8: 8, 16: 16, 32: 4}, {8: 4, 16: 4, 32: 4}]


def test_staged_server_answers_and_reports_per_stage_metrics(tiny_fast_model, live_server, metric_value) -> None:
    settings = ServeSettings(scheduler="staged", max_batch=4, max_batch_per_stage="8=8")
    with live_server(create_app(settings, model=tiny_fast_model())) as srv, srv.wait_ready(120).client() as c:
        info = c.get("/v1/models").json()
        assert info["scheduler"] == "staged"
        assert info["max_batch_per_stage"] == {"8": 8, "16": 16, "32": 4}
        r = c.post("/generate", json={"class_label": 3, "seed": 4, "num_images": 2})
        assert r.status_code == 200, r.text
        text = c.get("/metrics").text
    for res in ("8", "16", "32"):
        assert metric_value(text, "lowdiff_stage_batches_total", {"resolution": res}) >= 1
        assert metric_value(text, "lowdiff_stage_batch_size_images_sum", {"resolution": res}) >= 2
    assert metric_value(text, "lowdiff_images_generated_total") >= 2


def test_unknown_stage_resolution_or_engine_without_stages_fails_the_load(tiny_fast_model, fake_engine, live_server):
    bad = ServeSettings(scheduler="staged", max_batch_per_stage="64=2")
    with live_server(create_app(bad, model=tiny_fast_model())) as srv:
        for _ in range(600):
            if srv.service.state == "failed":
                break
            time.sleep(0.05)
        assert srv.service.state == "failed"
        assert srv.service.error.field == "max_batch_per_stage"
    with live_server(create_app(ServeSettings(scheduler="staged"), engine=fake_engine())) as srv:
        for _ in range(600):
            if srv.service.state == "failed":
                break
            time.sleep(0.05)
        assert srv.service.error.field == "scheduler"
