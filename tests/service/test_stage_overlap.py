"""``--stage-overlap``: the staged scheduler's last stage in its own lane (engine thread; CUDA stream on a GPU).

On the CPU these check the scheduling, not speed: a lower-stage call runs while a last-stage call does,
pixels are those of overlap off (and of the whole cascade alone), cancellation and deadlines still stop
work at the next stage boundary, the lower lane stops running ahead (so backpressure still counts what
has not started), and the settings refuse what cannot overlap with one line naming the flag."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lowdiff.engines import ENGINE_KINDS, STAGE_OVERLAP_ENGINES, EngineInfo, load_engine
from lowdiff.errors import SettingsError
from lowdiff.service.app import create_app
from lowdiff.service.metrics import ServiceMetrics
from lowdiff.service.settings import STAGE_OVERLAP_REFUSED, ServeSettings, add_serve_arguments, resolve_settings
from lowdiff.service.staged import StagedBatcher
from lowdiff.service.state import Service

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RES = (8, 16, 32)
SMALL = {8: 2, 16: 2, 32: 2}


class SleepEngine:
    """Every stage call sleeps ``seconds`` (the GIL released, as a GPU engine waits for its stream) and
    records (stage, thread, start, end); ``hold`` (cleared) holds calls of stage ``held_stage``."""

    def __init__(self, seconds: float = 0.05, held_stage: int | None = None) -> None:
        self.seconds = seconds
        self.calls: list[tuple[int, str, float, float]] = []
        self.held_stage = held_stage
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def stage_noise(self, seeds: Sequence[int]) -> list[torch.Tensor]:
        return [torch.zeros(len(seeds), 1, r, r) for r in RES]

    def run_stage(self, index, noise, class_labels, condition, sigma_cond, on_stage=None):
        start = time.monotonic()
        if index == self.held_stage:
            self.started.set()
            assert self.hold.wait(60)
        time.sleep(self.seconds)
        self.calls.append((index, threading.current_thread().name, start, time.monotonic()))
        return noise.double(), (None if index == len(RES) - 1 else 1.0)

    def denoised_preview(self, index, x, class_labels, condition, sigma_cond):
        return torch.zeros(x.shape[0], 1, 32, 32, dtype=torch.float64)


def staged(
    engine, metrics: ServiceMetrics, overlap: bool, limits=SMALL, max_queue: int = 64, backlog: int | None = None
) -> StagedBatcher:
    executor = ThreadPoolExecutor(1)
    return StagedBatcher(
        engine, executor, metrics, RES, limits, 0.0, max_queue, overlap=overlap, overlap_backlog=backlog
    )


async def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        await asyncio.sleep(0.01)


def _overlapping(calls: list[tuple[int, str, float, float]]) -> list[tuple[int, int]]:
    """(lower stage, last stage) pairs of calls that ran at the same time."""
    last = len(RES) - 1
    tops = [c for c in calls if c[0] == last]
    lows = [c for c in calls if c[0] < last]
    return [(lo[0], top[0]) for top in tops for lo in lows if lo[2] < top[3] and top[2] < lo[3]]


def _run_burst(overlap: bool, metric_value) -> tuple[SleepEngine, float]:
    engine = SleepEngine(0.05)
    metrics = ServiceMetrics()

    async def scenario():
        batcher = staged(engine, metrics, overlap)
        batcher.start()
        tickets = [batcher.submit([s], [0], deadline=time.monotonic() + 120) for s in range(8)]
        for ticket in tickets:
            await ticket.future
        await batcher.close()

    asyncio.run(scenario())
    text = metrics.exposition().decode()
    return engine, metric_value(text, "lowdiff_stage_lanes_overlap_seconds_total")


def test_a_lower_stage_call_runs_while_a_last_stage_call_does(metric_value) -> None:
    engine, overlap_s = _run_burst(True, metric_value)
    assert _overlapping(engine.calls), engine.calls
    last = len(RES) - 1
    threads = {stage: {c[1] for c in engine.calls if c[0] == stage} for stage in range(len(RES))}
    assert threads[last].isdisjoint(threads[0] | threads[1])  # the last stage has its own engine thread
    assert overlap_s > 0
    assert sorted(c[0] for c in engine.calls).count(last) == 4  # 8 images, last-stage limit 2

    serial, serial_overlap_s = _run_burst(False, metric_value)
    assert not _overlapping(serial.calls) and serial_overlap_s == 0


@pytest.mark.parametrize("backlog", [None, 0])
def test_without_a_backlog_the_lower_lane_waits_for_the_last(backlog, metric_value) -> None:
    """Default --overlap-backlog (2 × the last stage's limit = 4 here): two newcomers arriving while a
    last-stage call runs wait for it (the serial order); with 0 their first stage runs beside it."""
    engine = SleepEngine(0.02, held_stage=len(RES) - 1)
    metrics = ServiceMetrics()

    async def scenario():
        batcher = staged(engine, metrics, True, backlog=backlog)
        batcher.start()
        engine.hold.clear()
        first = batcher.submit([1, 2], [0, 0], deadline=time.monotonic() + 120)
        await _until(engine.started.is_set)  # the first cohort's last stage runs (held)
        later = batcher.submit([3, 4], [0, 0], deadline=time.monotonic() + 120)
        await asyncio.sleep(0.4)
        during = [c[0] for c in engine.calls]
        engine.hold.set()
        await first.future
        await later.future
        await batcher.close()
        return during

    during = asyncio.run(scenario())
    held = metric_value(metrics.exposition().decode(), "lowdiff_stage_overlap_held_total")
    if backlog is None:
        assert during == [0, 1]  # only the first cohort's lower stages ran while its last stage was held
        assert held >= 1
        assert not _overlapping(engine.calls)
    else:
        assert during == [0, 1, 0, 1]  # the newcomers' lower stages ran beside the held last stage
        assert held == 0


def test_the_held_lower_lane_wakes_when_the_images_it_waits_for_go_away() -> None:
    """The lower lane holds while an image waits for the last lane; that image passes its deadline there and
    is dropped without a last-stage call: the lower lane must look again and serve the next request (it
    once slept until another request arrived)."""
    engine = SleepEngine(0.1)
    metrics = ServiceMetrics()

    async def scenario():
        batcher = staged(engine, metrics, True)
        batcher.start()
        now = time.monotonic()
        late = batcher.submit([1], [0], deadline=now + 0.15)  # past its deadline before its last stage
        await asyncio.sleep(0.05)
        later = batcher.submit([2], [0], deadline=now + 60)
        try:
            await asyncio.wait_for(asyncio.shield(later.future), 10)
        finally:
            await batcher.close()
        return late

    late = asyncio.run(scenario())
    assert late.cancelled == "deadline"
    assert [c[0] for c in engine.calls].count(2) == 1  # only the second request's last stage ran


def test_pixels_are_those_of_overlap_off_and_of_the_cascade_alone(tiny_fast_model) -> None:
    engine = load_engine(tiny_fast_model(), "torch")
    seeds, labels = [10, 11, 12, 13, 14, 15, 16], [0, 1, 2, 3, 4, 5, 6]

    def generate(overlap: bool) -> list[torch.Tensor]:
        async def scenario():
            batcher = staged(engine, ServiceMetrics(), overlap)
            batcher.start()
            # one request per image, so that images of different requests share stage calls
            tickets = [batcher.submit([s], [c], deadline=time.monotonic() + 300) for s, c in zip(seeds, labels)]
            out = [(await t.future)[0] for t in tickets]
            await batcher.close()
            return out

        return asyncio.run(scenario())

    on, off = generate(True), generate(False)
    alone = [engine.generate([s], [c])[0] for s, c in zip(seeds, labels)]
    for seed, a, b, c in zip(seeds, on, off, alone):
        assert torch.equal(a, b) and torch.equal(a, c), seed
    assert not torch.equal(on[0], on[1])  # not vacuous


def _abandoned(metrics: ServiceMetrics, metric_value, resolution: str) -> float:
    text = metrics.exposition().decode()
    return metric_value(text, "lowdiff_stage_images_abandoned_total", {"resolution": resolution})


def test_a_cancelled_request_skips_its_remaining_stages(metric_value) -> None:
    engine = SleepEngine(0.0, held_stage=0)
    metrics = ServiceMetrics()

    async def scenario():
        batcher = staged(engine, metrics, True)
        batcher.start()
        engine.hold.clear()
        ticket = batcher.submit([5, 6], [0, 0], deadline=time.monotonic() + 300)
        await _until(engine.started.is_set)
        batcher.cancel(ticket, "disconnect")
        engine.hold.set()
        await _until(lambda: _abandoned(metrics, metric_value, "16") >= 2)
        other = batcher.submit([7], [0], deadline=time.monotonic() + 300)
        await other.future
        await batcher.close()

    asyncio.run(scenario())
    assert [(c[0]) for c in engine.calls] == [0, 0, 1, 2]  # the cancelled pair never ran stage 16 or 32


def test_a_request_past_its_deadline_stops_at_the_next_stage(metric_value) -> None:
    engine = SleepEngine(0.0, held_stage=0)
    metrics = ServiceMetrics()

    async def scenario():
        batcher = staged(engine, metrics, True)
        batcher.start()
        engine.hold.clear()
        late = batcher.submit([7], [0], deadline=time.monotonic() + 0.2)
        await _until(engine.started.is_set)
        await asyncio.sleep(0.3)  # its first stage outlives its deadline
        engine.hold.set()
        on_time = batcher.submit([8], [0], deadline=time.monotonic() + 300)
        await on_time.future
        await batcher.close()
        return late

    late = asyncio.run(scenario())
    assert late.cancelled == "deadline"
    assert [c[0] for c in engine.calls] == [0, 0, 1, 2]
    assert _abandoned(metrics, metric_value, "16") == 1


def test_the_lower_lane_stops_running_ahead_so_backpressure_counts_unstarted_images() -> None:
    """Limits 1/1/1: the lower lane runs at most 1 + 2·1 started images ahead of the last lane; while the
    last stage is held, the rest stay unstarted (queued) until the last lane takes or requests go away."""
    engine = SleepEngine(0.0, held_stage=2)
    ones = {8: 1, 16: 1, 32: 1}

    async def scenario():
        batcher = staged(engine, ServiceMetrics(), True, limits=ones)
        assert batcher.ahead_limit == 3
        batcher.start()
        engine.hold.clear()
        tickets = [batcher.submit([s], [0], deadline=time.monotonic() + 300) for s in range(10)]
        await _until(lambda: engine.started.is_set() and batcher.ahead() == 3)
        await asyncio.sleep(0.2)  # the lower lane had time to run further, had it been allowed to
        assert batcher.ahead() == 3 and batcher.queue_depth == 10 - 1 - 3  # one in the last stage
        assert batcher.running
        for ticket in tickets[1:4]:  # the three waiting for the last stage go away: room for three more
            batcher.cancel(ticket, "disconnect")
        await _until(lambda: batcher.queue_depth == 10 - 1 - 3 - 3)
        engine.hold.set()
        for ticket in tickets[:1] + tickets[4:]:
            await ticket.future
        await batcher.close()
        return batcher

    batcher = asyncio.run(scenario())
    assert not batcher.running
    assert [c[0] for c in engine.calls].count(2) == 7


# ---------------------------------------------------------------------------- settings
def test_overlap_on_needs_the_staged_scheduler_and_an_engine_that_can_overlap() -> None:
    assert set(STAGE_OVERLAP_ENGINES) | set(STAGE_OVERLAP_REFUSED) == set(ENGINE_KINDS)
    assert not set(STAGE_OVERLAP_ENGINES) & set(STAGE_OVERLAP_REFUSED)
    ServeSettings(scheduler="staged", stage_overlap="on").validate()
    ServeSettings(stage_overlap="auto").validate()  # auto with the cascade scheduler: simply off
    for bad, words in (
        ({"stage_overlap": "on"}, "needs --scheduler staged"),
        ({"scheduler": "staged", "stage_overlap": "on", "engine": "onnxruntime"}, "engine 'onnxruntime'"),
        ({"scheduler": "staged", "stage_overlap": "on", "engine": "compile"}, "engine 'compile'"),
        ({"scheduler": "staged", "stage_overlap": "on", "engine": "tensorrt"}, "engine 'tensorrt'"),
    ):
        with pytest.raises(SettingsError) as err:
            ServeSettings(**bad).validate()
        assert err.value.field == "stage_overlap"
        assert err.value.message.startswith("--stage-overlap: ") and words in err.value.message
        assert "\n" not in err.value.one_line()


def test_overlap_flag_and_variable_are_named_in_errors() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = resolve_settings(parser.parse_args(["--scheduler", "staged", "--stage-overlap", "on"]), {})
    assert settings.stage_overlap == "on"
    with pytest.raises(SettingsError, match=r"^--stage-overlap: expected one of off, on, auto, got 'yes'$"):
        resolve_settings(parser.parse_args(["--stage-overlap", "yes"]), {})
    with pytest.raises(SettingsError, match=r"^LOWDIFF_STAGE_OVERLAP: 'on' needs --scheduler staged"):
        resolve_settings(parser.parse_args([]), {"LOWDIFF_STAGE_OVERLAP": "on"})


def _info(engine: str, device: str, resolutions: tuple[int, ...] = RES) -> EngineInfo:
    return EngineInfo(
        model="m", engine=engine, device=device, precision="fp32", resolutions=resolutions,
        nfe_per_stage=(1,) * len(resolutions), schedule={}, conditional=True, num_classes=10, image_channels=1,
        image_resolution=resolutions[-1], checkpoint_sha256=None, engine_dir=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "engine", "device", "resolutions", "expected"),
    [
        ("auto", "torch", "cuda", RES, True),
        ("auto", "cudagraph", "cuda:0", RES, True),
        ("auto", "torch", "cpu", RES, False),  # not expected to help on a CPU
        ("auto", "onnxruntime", "cuda", RES, False),
        ("auto", "torch", "cuda", (32,), False),
        ("off", "torch", "cuda", RES, False),
        ("on", "torch", "cpu", RES, True),
        ("on", "onnxruntime", "cpu", RES, "engine 'onnxruntime' cannot overlap stages"),
        ("on", "some-plugin", "cuda", RES, "engine 'some-plugin' cannot overlap stages"),
        ("on", "torch", "cpu", (32,), "one stage"),
    ],
)
def test_what_auto_and_on_resolve_to(setting, engine, device, resolutions, expected) -> None:
    service = Service(ServeSettings(scheduler="staged", stage_overlap=setting))
    service.executor.shutdown()
    service.engine_info = _info(engine, device, resolutions)
    if isinstance(expected, bool):
        assert service._stage_overlap() is expected
        return
    with pytest.raises(SettingsError, match=expected) as err:
        service._stage_overlap()
    assert err.value.field == "stage_overlap" and err.value.message.startswith("--stage-overlap: ")


def test_a_server_with_overlap_answers_and_shows_its_lanes(tiny_fast_model, live_server, metric_value) -> None:
    settings = ServeSettings(scheduler="staged", stage_overlap="on", max_batch=2)
    with live_server(create_app(settings, model=tiny_fast_model())) as srv, srv.wait_ready(120).client() as c:
        assert c.get("/v1/models").json()["stage_overlap"] is True
        r = c.post("/generate", json={"class_label": 3, "seed": 4, "num_images": 3})
        assert r.status_code == 200, r.text
        text = c.get("/metrics").text
    for lane in ("lower", "last"):
        assert metric_value(text, "lowdiff_stage_lane_busy_seconds_total", {"lane": lane}) > 0
        assert metric_value(text, "lowdiff_stage_lane_busy", {"lane": lane}) == 0
    assert metric_value(text, "lowdiff_stage_batches_total", {"resolution": "32"}) >= 2
