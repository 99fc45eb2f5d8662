"""The scheduler simulator: single-request latencies equal the cost model's sums, the schedulers that
must coincide do, and larger low-resolution batches buy throughput only where evaluations have a floor."""

from __future__ import annotations

import math

import pytest

from lowdiff.bench.simulate import (
    Cascade,
    CascadeScheduler,
    ContinuousScheduler,
    LinearCost,
    StagedScheduler,
    percentile,
    poisson_trace,
    saturated_throughput,
    simulate,
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
