"""The scheduler simulator: single-request latencies equal the cost model's sums, the schedulers that
must coincide do, and larger low-resolution batches buy throughput only where evaluations have a floor."""

from __future__ import annotations

import math
import threading

import pytest

from lowdiff.bench.simulate import (
    Cascade,
    CascadeScheduler,
    ContinuousScheduler,
    LinearCost,
    OverlapStagedScheduler,
    StagedScheduler,
    percentile,
    poisson_trace,
    saturated_throughput,
    simulate,
    slowdown_for,
    table_cost,
)

RES = (8, 16, 32)
NFE = (3, 2, 4)
COST = LinearCost({8: 1e-3, 16: 2e-3, 32: 3e-3}, {8: 1e-4, 16: 4e-4, 32: 1.6e-3})
CASCADE = Cascade(RES, NFE, COST)
BIG = {8: 512, 16: 256, 32: 64}
SAME = {8: 64, 16: 64, 32: 64}


def test_one_request_alone_costs_the_cascade_plus_the_fill_delay():
    delay = 0.01
    trace = [(1.0, 3)]
    expected = CASCADE.cascade_seconds(3) + delay
    for sched in (
        CascadeScheduler(CASCADE, 64, delay),
        StagedScheduler(CASCADE, BIG, delay, "later"),
        StagedScheduler(CASCADE, BIG, delay, "merge"),
        ContinuousScheduler(CASCADE, BIG, delay, "later"),
    ):
        stats = simulate(sched, trace, warmup_fraction=0.0)
        assert stats.p50_s == pytest.approx(expected), sched.name


def test_staged_later_first_with_equal_limits_is_the_cascade_batcher():
    """On a serial engine, later-first stage batching with the cascade's batch everywhere runs the same
    cohorts in the same order: the latencies must be identical, request by request."""
    trace = poisson_trace(0.8 * CASCADE.capacity(64) / 4, 3000, [1, 4, 7], seed=3)
    a = simulate(CascadeScheduler(CASCADE, 64, 0.005), trace)
    b = simulate(StagedScheduler(CASCADE, SAME, 0.005, "later"), trace)
    assert (a.p50_s, a.p99_s, a.mean_s) == pytest.approx((b.p50_s, b.p99_s, b.mean_s))


def test_bigger_low_resolution_batches_pay_off_only_with_a_floor():
    with_floor = saturated_throughput(StagedScheduler(CASCADE, BIG, 0.0), 2048)
    cascade = saturated_throughput(CascadeScheduler(CASCADE, 64, 0.0), 2048)
    expected = CASCADE.capacity(64)
    assert cascade == pytest.approx(expected, rel=1e-9)
    assert with_floor > 1.01 * cascade
    linear = Cascade(RES, NFE, LinearCost({8: 0.0, 16: 0.0, 32: 0.0}, COST.per_image))
    flat_staged = saturated_throughput(StagedScheduler(linear, BIG, 0.0), 2048)
    flat_cascade = saturated_throughput(CascadeScheduler(linear, 64, 0.0), 2048)
    assert flat_staged == pytest.approx(flat_cascade, rel=1e-9)


def test_per_evaluation_runs_every_evaluation_of_every_image():
    calls: list[tuple[int | None, int]] = []
    trace = poisson_trace(50.0, 40, [1, 2], seed=5)
    simulate(
        ContinuousScheduler(CASCADE, BIG, 0.0, "oldest"),
        trace,
        on_call=lambda t, c: calls.append((c.stage, len(c.images))),
    )
    images = sum(n for _, n in trace)
    for k, nfe in enumerate(NFE):
        assert sum(n for stage, n in calls if stage == k) == images * nfe


def test_overload_throughput_is_capped_by_capacity():
    capacity = CASCADE.capacity(64)
    trace = poisson_trace(1.5 * capacity, 4000, [1], seed=7)
    stats = simulate(CascadeScheduler(CASCADE, 64, 0.0), trace)
    assert stats.throughput <= capacity * 1.001
    assert stats.throughput > 0.95 * capacity
    assert stats.busy == pytest.approx(1.0, abs=0.01)


def test_table_cost_reads_a_cost_table():
    table = {
        "schema": "lowdiff-cost-table/1",
        "configs": {
            "m": {
                "nfe": {"8": 1},
                "engines": {
                    "torch:fp32": {"resolutions": {"8": [{"batch": 1, "seconds": 0.01}, {"batch": 4, "seconds": 0.04}]}}
                },
            }
        },
    }
    cost = table_cost(table, "m", "torch:fp32")
    assert cost(8, 2) == pytest.approx(0.02)  # log-log between the points
    assert cost(8, 8) == pytest.approx(0.08)  # proportional above the largest


def test_percentile_is_nearest_rank():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert math.isclose(percentile([5.0], 99), 5.0)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        StagedScheduler(CASCADE, BIG, 0.0, "fastest")


# ---------------------------------------------------------------------------- overlapped lanes
def _lane_work(cascade: Cascade, batch: int) -> tuple[float, float]:
    """(lower stages, last stage) seconds for one batch of ``batch`` images alone."""
    last = len(cascade.resolutions) - 1
    return sum(cascade.stage_seconds(k, batch) for k in range(last)), cascade.stage_seconds(last, batch)


def test_overlap_alone_costs_the_cascade_and_runs_every_stage_once_per_image():
    delay = 0.01
    stats = simulate(OverlapStagedScheduler(CASCADE, BIG, delay, 1.5), [(1.0, 3)], warmup_fraction=0.0)
    assert stats.p50_s == pytest.approx(CASCADE.cascade_seconds(3) + delay)
    calls: list[tuple[int | None, int]] = []
    trace = poisson_trace(2 * CASCADE.capacity(64), 500, [1, 5], seed=2)
    simulate(
        OverlapStagedScheduler(CASCADE, BIG, 0.0, 1.2),
        trace,
        on_call=lambda t, c: calls.append((c.stage, len(c.images))),
    )
    images = sum(n for _, n in trace)
    for k in range(len(RES)):
        assert sum(n for stage, n in calls if stage == k) == images


def test_overlap_gain_follows_the_contention_slowdown():
    """s = 2 (two calls at once as slow as one after the other) on costs without a floor gives exactly the
    cascade's throughput (no lane is ever idle while work is left, and total work does not depend on the
    batch); s = 1 beats it but not the last stage alone; the gain falls as s grows."""
    flat = Cascade(RES, NFE, LinearCost({8: 0.0, 16: 0.0, 32: 0.0}, COST.per_image))
    cascade = saturated_throughput(CascadeScheduler(flat, 64, 0.0), 2048)
    assert saturated_throughput(OverlapStagedScheduler(flat, SAME, 0.0, 2.0), 2048) == pytest.approx(cascade)
    lower, last = _lane_work(CASCADE, 64)
    base = saturated_throughput(CascadeScheduler(CASCADE, 64, 0.0), 2048)
    ratios = [saturated_throughput(OverlapStagedScheduler(CASCADE, SAME, 0.0, s), 2048) / base for s in (1, 1.3, 1.6)]
    assert ratios[0] <= (lower + last) / last + 1e-9  # never faster than the last stage alone
    assert ratios[0] > 0.95 * (lower + last) / last and ratios[0] > ratios[1] > ratios[2]
    s = slowdown_for(1.15, CASCADE, SAME, 64, images=2048)
    assert s is not None and 1.0 < s < 1.6
    assert slowdown_for(3.0, CASCADE, SAME, 64, images=512) is None


def test_the_lower_lane_runs_at_most_its_limit_ahead():
    sched = OverlapStagedScheduler(CASCADE, BIG, 0.0, 1.0)
    assert sched.ahead_limit == 512 + 2 * 64
    entries: list[int] = []

    def check(t: float, call) -> None:
        if call.stage == 0:  # the images it starts and those already started, not yet taken by the last lane
            entries.append(len(call.images) + sum(len(q) for q in sched.queues[1:]))

    simulate(sched, [(0.0, 1)] * 3000, warmup_fraction=0.0, on_call=check)
    assert entries and max(entries) <= sched.ahead_limit
    with pytest.raises(ValueError):
        OverlapStagedScheduler(CASCADE, BIG, 0.0, 0.5)


def test_gated_overlap_is_the_serial_order_without_a_backlog_and_overlaps_with_one():
    """A gate larger than any queue the trace builds: the lower lane never starts beside the last one, so
    latencies are the serial staged scheduler's, request by request, whatever the contention. Saturated
    (a backlog from the start) the gate changes nothing: the same throughput as overlap without a gate."""
    trace = poisson_trace(0.5 * CASCADE.capacity(64) / 4, 2000, [1, 4, 7], seed=4)
    serial = simulate(StagedScheduler(CASCADE, BIG, 0.005, "backlog"), trace)
    for s in (1.0, 1.7, 2.0):
        calls: list[tuple[float, int | None, float]] = []
        gated = simulate(
            OverlapStagedScheduler(CASCADE, BIG, 0.005, s, gate=10_000),
            trace,
            on_call=lambda t, c, calls=calls: calls.append((t, c.stage, c.seconds)),
        )
        assert (gated.p50_s, gated.p99_s, gated.mean_s) == pytest.approx((serial.p50_s, serial.p99_s, serial.mean_s))
        ends = [t + seconds for t, _, seconds in calls]
        assert all(t >= max(ends[:i], default=0.0) - 1e-12 for i, (t, _, _) in enumerate(calls))  # one at a time
    ungated = saturated_throughput(OverlapStagedScheduler(CASCADE, BIG, 0.0, 1.5), 2048)
    assert saturated_throughput(OverlapStagedScheduler(CASCADE, BIG, 0.0, 1.5, gate=128), 2048) == pytest.approx(
        ungated, rel=0.02
    )
    assert ungated > 1.05 * saturated_throughput(StagedScheduler(CASCADE, BIG, 0.0, "backlog"), 2048)


def test_overlapped_calls_end_late_in_a_long_trace():
    """Far into a trace (``now`` ≈ 10⁷ s) a call's remaining work can round to a value whose end equals
    ``now``; the event loop must still end it (it once spun forever there, in the CPU-table sweep)."""
    trace = [(1e7 + 0.004 * i, 1 + i % 3) for i in range(400)]
    result: dict[str, object] = {}

    def run() -> None:
        result["stats"] = simulate(OverlapStagedScheduler(CASCADE, BIG, 0.001, 1.7), trace, warmup_fraction=0.0)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert "stats" in result, "the simulation did not finish"
    assert result["stats"].requests == len(trace)
