"""Prometheus metrics of one service instance (its own registry, so tests can run several apps).

Naming follows Prometheus conventions: ``lowdiff_`` prefix, base units (seconds), ``_total`` on
counters. Throughput is not a gauge here: a windowed rate computed in one pod cannot be summed
across pods, so dashboards and alerts take ``rate(lowdiff_images_generated_total[1m])``. Batch
latency is labelled by a power-of-two batch-size bucket rather than the exact size, so that the
label set stays small whatever ``max_batch`` is.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

# Latency buckets (seconds): a tiny model answers in milliseconds, a 64-image CPU batch in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_size_bucket(size: int) -> str:
    """'1', '2', '3-4', '5-8', … : the power-of-two range that holds ``size``."""
    if size <= 2:
        return str(size)
    upper = 1 << (size - 1).bit_length()
    return f"{upper // 2 + 1}-{upper}"


class ServiceMetrics:
    def __init__(self) -> None:
        # `_created` series double the exposition and no dashboard uses them (process-wide switch).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lowdiff_requests_total", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "lowdiff_request_duration_seconds",
            "HTTP request latency, from the first byte read to the response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lowdiff_queue_wait_seconds",
            "Time an image waited in the queue before its batch started.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lowdiff_batch_size_images", "Images per engine batch.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "lowdiff_batch_duration_seconds",
            "Engine time for one batch through the whole cascade, by batch-size bucket.",
            ["batch_size_bucket"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "lowdiff_stage_duration_seconds",
            "Engine time for one cascade stage of one batch, by stage resolution.",
            ["resolution"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_batches = Counter(
            "lowdiff_stage_batches_total",
            "Stage-level scheduler: engine calls of one stage, by the stage's resolution (the scheduler's choices).",
            ["resolution"],
            registry=r,
        )
        self.stage_batch_size = Histogram(
            "lowdiff_stage_batch_size_images",
            "Stage-level scheduler: images per engine call of one stage, by resolution.",
            ["resolution"],
            buckets=(*BATCH_SIZE_BUCKETS, 512),
            registry=r,
        )
        self.stage_wait = Histogram(
            "lowdiff_stage_wait_seconds",
            "Stage-level scheduler: time an image waited for a stage (from arrival, or from the end of its "
            "previous stage) before the call that ran it started, by resolution.",
            ["resolution"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_waiting = Gauge(
            "lowdiff_stage_waiting_images",
            "Stage-level scheduler: live images waiting for each stage, by resolution.",
            ["resolution"],
            registry=r,
        )
        self.stage_images_abandoned = Counter(
            "lowdiff_stage_images_abandoned_total",
            "Stage-level scheduler: started images whose remaining stages were skipped because their request "
            "went away (disconnect, deadline, failure), by the stage they were waiting for.",
            ["resolution"],
            registry=r,
        )
        self.stage_lane_busy = Gauge(
            "lowdiff_stage_lane_busy",
            "Stage-level scheduler: 1 while an engine lane runs a call, by lane (all; with --stage-overlap "
            "lower: the stages before the last, last: the last stage).",
            ["lane"],
            registry=r,
        )
        self.stage_lane_busy_seconds = Counter(
            "lowdiff_stage_lane_busy_seconds_total",
            "Stage-level scheduler: seconds each engine lane spent running calls, by lane (all, lower, last).",
            ["lane"],
            registry=r,
        )
        self.stage_lanes_overlap_seconds = Counter(
            "lowdiff_stage_lanes_overlap_seconds_total",
            "Stage-level scheduler with --stage-overlap: seconds both lanes ran a call at once.",
            registry=r,
        )
        self.stage_overlap_held = Counter(
            "lowdiff_stage_overlap_held_total",
            "Stage-level scheduler with --stage-overlap: times the lower lane began to wait for the last lane "
            "instead of running beside it, because fewer than --overlap-backlog images waited unstarted.",
            registry=r,
        )
        self.first_preview = Histogram(
            "lowdiff_time_to_first_preview_seconds",
            "POST /generate/stream: time from a request's arrival to its first preview.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batches = Counter("lowdiff_batches_total", "Engine batches run, by outcome.", ["outcome"], registry=r)
        self.images = Counter(
            "lowdiff_images_generated_total",
            "Images the engine generated (including any whose request went away meanwhile).",
            registry=r,
        )
        self.images_dropped = Counter(
            "lowdiff_images_dropped_total",
            "Queued images dropped before they started, by reason (deadline, disconnect, failed, shutdown).",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge("lowdiff_requests_in_flight", "POST /generate requests being served.", registry=r)
        self.ready = Gauge("lowdiff_ready", "1 when the engine is loaded and warmed up and not draining.", registry=r)
        self.info = Info("lowdiff_model", "The served model and engine.", registry=r)
        self._queue_depth: Callable[[], int] = lambda: 0
        self.queue = Gauge("lowdiff_queue_depth_images", "Images queued and not yet started.", registry=r)
        self.queue.set_function(self.queue_depth)
        for reason in ("deadline", "disconnect", "failed", "shutdown"):
            self.images_dropped.labels(reason)  # export zeros so that rate() works from the start
        for outcome in ("ok", "error"):
            self.batches.labels(outcome)

    def bind_queue(self, depth: Callable[[], int]) -> None:
        self._queue_depth = depth

    def queue_depth(self) -> int:
        return int(self._queue_depth())

    def record_images(self, count: int) -> None:
        self.images.inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
