"""Stage-level batching (``lowdiff serve --scheduler staged``): a queue per cascade stage.

Where :class:`~lowdiff.service.batcher.Batcher` runs a batch through the whole cascade, this batcher
runs one *stage* per engine call: up to ``limits[r]`` images waiting at stage r, of any requests, run
that stage's evaluations together and move on to the next stage's queue, carrying their hand-off state
(every stage's starting noise, drawn by :meth:`CascadeEngine.stage_noise` when they enter the cascade;
the previous stage's output; the σ it was handed on at). An image's pixels therefore depend only on
its (class, seed), as with whole-cascade batches: the same noise, the same per-stage work
(:meth:`CascadeEngine.run_stage`), only its batch neighbours differ.

Which stage runs next (measured with ``benchmarks/scheduler/run.py``, see its README): the latest stage
with waiting images, so that started work finishes first (it is also shortest-remaining-work first, which
is what a serial engine's mean latency wants; nothing starves, because later queues are fed only by
earlier ones). A lower stage takes at most as many images as the last stage's limit, unless more than
twice that many wait: then it takes up to its own limit — small tensors are cheap per image in big
batches, and a backlog that the next last-stage call cannot clear anyway loses nothing by it. The wait
for a batch to fill (``max_delay``) applies, as in the cascade batcher, only when nothing else is waiting.

One hand-over per cohort, not per stage: a call continues into the next stage in the engine thread
while that is what the scheduler would choose anyway (:meth:`StagedBatcher._run_from`); returning to
the event loop between stages cost 7–8 % of p50 latency at 25–95 % load on a busy 2-core machine
(``benchmarks/scheduler/sleep_engine.py``), 3–6 % remain.

Kept from the cascade batcher: tickets, backpressure (``max_queue`` counts images not yet started),
deadlines (checked whenever an image is taken, at every stage), cancellation (a cancelled or failed
request's images are dropped at the next stage boundary, so a disconnect stops their remaining work),
the engine thread, Retry-After. Streaming tickets get a preview at every hand-off: D(x; σ) of the
stage's output, one extra evaluation for those images only.

Overlap (``--stage-overlap``, :class:`Lane`): two lanes, each its own engine thread and, on CUDA, its own
``torch.cuda.Stream`` — the *last* lane runs the last (full-resolution) stage, the *lower* lane the stages
before it, so a low-resolution call runs while a 32×32 call does. Why: on an H100 the 8×8 stage of
cifar10-cond took 0.042 s of a 0.64 s batch-64 cascade for 0.3 % of its FLOPs (benchmarks/gpu/): its small
kernels leave most SMs idle, which a second stream can fill. Each lane keeps the rules above for its own
stages (later first, the take limits, the fill delay for the lower lane's entries); the stage call runs
under ``torch.cuda.stream(lane.stream)`` and that stream is synchronised before the results go back to
the event loop, so what one lane hands the other is finished host memory. The lower lane runs at most
``limits[0] + 2 · limits[last]`` started images ahead of the last lane (:meth:`StagedBatcher.ahead`): one
full first-stage call on top of two last-stage calls, so that a faster lower lane never leaves the last
lane waiting, while images past that point stay unstarted and keep counting for backpressure
(``max_queue``) as they do without overlap. Pixels still depend only on (class, seed): the same noise and
per-stage work, in whichever thread. On a CPU both lanes share the same cores; it runs (tests use it)
but is not expected to help there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lowdiff.service.batcher import Batcher, EngineFailure, ImageJob, StageEngine, Ticket
from lowdiff.service.metrics import ServiceMetrics

log = logging.getLogger("lowdiff.service.staged")

DEFAULT_LIMIT_CAP = 512


def default_stage_limits(resolutions: Sequence[int], max_batch: int, cap: int = DEFAULT_LIMIT_CAP) -> dict[int, int]:
    """As many pixels per call as ``max_batch`` images at the output resolution (×4 per halving), capped:
    a low-resolution call then costs about what a last-stage call costs, and its fixed per-evaluation
    cost is spread over more images. The last stage keeps ``max_batch``."""
    top = resolutions[-1]
    return {r: max(max_batch, min(cap, max_batch * (top // r) ** 2)) if r != top else max_batch for r in resolutions}


@dataclass(eq=False)
class Lane:
    """One engine thread of the stage scheduler: ``all`` stages without overlap; with it ``last`` (the last
    stage) or ``lower`` (the stages before it). ``stream`` is its CUDA stream (None: the thread's current
    stream, as without overlap)."""

    name: str
    executor: Executor
    first: int  # the stages this lane runs: first … last_stage
    last_stage: int
    stream: Any = None
    busy: bool = False
    busy_since: float = 0.0


class StagedBatcher(Batcher):
    def __init__(
        self,
        engine: StageEngine,
        executor: Executor,
        metrics: ServiceMetrics,
        resolutions: Sequence[int],
        limits: Mapping[int, int],
        max_delay_s: float,
        max_queue: int,
        overlap: bool = False,
        last_executor: Executor | None = None,
        device: str = "cpu",
        last_lane_priority: bool = False,
        overlap_backlog: int | None = None,
    ):
        """With ``overlap`` the last stage runs in its own lane: on ``last_executor`` (default: a one-thread
        pool this batcher owns), and on ``device`` 'cuda…' each lane on its own CUDA stream; with
        ``last_lane_priority`` the last lane's stream has the higher priority, so that the lower lane's
        kernels fill what the full-resolution stage leaves idle instead of delaying it. ``overlap_backlog``
        (default ``2 · limits[last]``; 0: never hold) is how many unstarted images make the lower lane run
        beside a busy last lane (:meth:`_held`)."""
        super().__init__(engine, executor, metrics, limits[resolutions[-1]], max_delay_s, max_queue, resolutions)
        self.limits = [int(limits[r]) for r in self.resolutions]
        last = len(self.resolutions) - 1
        if overlap and last < 1:
            raise ValueError("stage overlap needs at least two stages")
        self.overlap = overlap
        # Stage 0's queue is the inherited ``_queue`` (images not yet started: what submit, cancel and
        # backpressure count); stage k ≥ 1 holds started images waiting for stage k.
        self._stages: list[deque[ImageJob]] = [self._queue] + [deque() for _ in self.resolutions[1:]]
        self._per_image_s = [0.0] * len(self.resolutions)
        for k, r in enumerate(self.resolutions):
            metrics.stage_waiting.labels(str(r)).set_function(lambda k=k: self.waiting(k))
        self._owned_executor: ThreadPoolExecutor | None = None
        if overlap:
            if last_executor is None:
                last_executor = self._owned_executor = ThreadPoolExecutor(1, thread_name_prefix="lowdiff-engine-last")
            streams: list[Any] = [None, None]
            if device.startswith("cuda"):
                high = -1 if last_lane_priority else 0  # CUDA: lower numbers run first
                streams = [torch.cuda.Stream(device=device), torch.cuda.Stream(device=device, priority=high)]
            self._lanes = [
                Lane("lower", executor, 0, last - 1, streams[0]),
                Lane("last", last_executor, last, last, streams[1]),
            ]
        else:
            self._lanes = [Lane("all", executor, 0, last)]
        self.ahead_limit = self.limits[0] + 2 * self.limits[last]
        self.overlap_backlog = 2 * self.limits[last] if overlap_backlog is None else int(overlap_backlog)
        self._holding = False  # the lower lane is waiting in _held (for the metric)
        self._last_wakeup = asyncio.Event()  # images reached the last stage's queue (overlap)
        self._room = asyncio.Event()  # the last lane took images, or some went away (overlap)
        self._both_busy_since: float | None = None
        self._last_task: asyncio.Task[None] | None = None
        for lane in self._lanes:
            metrics.stage_lane_busy.labels(lane.name).set_function(lambda lane=lane: int(lane.busy))
            metrics.stage_lane_busy_seconds.labels(lane.name)

    def waiting(self, k: int) -> int:
        """Live images waiting for stage k."""
        if k == 0:
            return self._queued
        return sum(1 for job in self._stages[k] if self._alive(job.ticket))

    def ahead(self) -> int:
        """Live started images not yet taken by the last stage (waiting at stages 1 … last)."""
        return sum(self.waiting(k) for k in range(1, len(self._stages)))

    def retry_after(self, extra: int = 0) -> int:
        if any(self._per_image_s):
            if self.overlap:  # the lanes run side by side: the slower one sets the pace
                self._seconds_per_image = max(sum(self._per_image_s[:-1]), self._per_image_s[-1])
            else:
                self._seconds_per_image = sum(self._per_image_s)
        return super().retry_after(extra)

    def cancel(self, ticket: Ticket, reason: str) -> int:
        dropped = super().cancel(ticket, reason)
        self._room.set()  # its started images no longer count as ahead
        self._wakeup.set()  # nor as waiting for the last lane, which the lower lane may be holding for
        return dropped

    def start(self) -> None:
        super().start()
        if self.overlap:
            loop = asyncio.get_running_loop()
            self._last_task = loop.create_task(self._run_last_lane(), name="lowdiff-batcher-last")

    async def close(self) -> None:
        if self._last_task is not None:
            self._last_task.cancel()
            try:
                await self._last_task
            except asyncio.CancelledError:
                pass
        await super().close()
        for queue in self._stages[1:]:
            for job in queue:
                if not job.ticket.future.done():
                    job.ticket.future.cancel()
            queue.clear()
        if self._owned_executor is not None:
            self._owned_executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ choosing
    async def _run_forever(self) -> None:
        """The lane that takes new images: ``all`` stages, or with overlap the ``lower`` ones."""
        lane = self._lanes[0]
        while True:
            k, batch = await self._next_stage_batch(lane)
            await self._run_stage_batch(lane, k, batch)

    async def _run_last_lane(self) -> None:
        """Overlap: the last stage, whenever images wait for it (they arrive from the lower lane only)."""
        lane = self._lanes[1]
        last = len(self._stages) - 1
        while True:
            batch = self._take_started(last, self.limits[last])
            self._room.set()
            if not batch:
                # The images that were waiting for it may all have gone away (deadline, disconnect) without
                # a call: the lower lane, holding for them (_held), must look again.
                self._wakeup.set()
                self._last_wakeup.clear()
                await self._last_wakeup.wait()
                continue
            await self._run_stage_batch(lane, last, batch)

    def take_limit(self, k: int, waiting: int | None = None) -> int:
        """Images stage k takes in one call when ``waiting`` (default: its live queue) wait for it."""
        last = len(self.limits) - 1
        if k == last or (self.waiting(k) if waiting is None else waiting) > 2 * self.limits[last]:
            return self.limits[k]
        return min(self.limits[k], self.limits[last])

    def _held(self) -> bool:
        """Overlap: whether the lower lane waits for the last lane instead of starting a call beside it —
        the last lane runs (or has images waiting for it) and fewer than ``overlap_backlog`` images wait
        unstarted. Why (``benchmarks/scheduler/``, simulator): on an H200 the two lanes ran each at about
        1/1.7 of its speed alone while both were busy; at that contention, starting newcomers' small calls
        beside the last stage of images nearly done raised p50 1.2–3× at 50–95 % load (single images), while
        with this hold the order below a backlog is the serial one (1.00×) and a backlog still gains
        (1.08–1.10× saturated throughput)."""
        if not self.overlap or self.overlap_backlog == 0 or self._queued >= self.overlap_backlog:
            return False
        return self._lanes[1].busy or self.waiting(len(self._stages) - 1) > 0

    async def _next_stage_batch(self, lane: Lane) -> tuple[int, list[ImageJob]]:
        while True:
            if self._held():
                if not self._holding:  # counted once per hold, not per look while held
                    self._holding = True
                    self.metrics.stage_overlap_held.inc()
                self._wakeup.clear()
                await self._wakeup.wait()  # set by arrivals, cancellations and the last lane going idle
                continue
            self._holding = False
            for k in range(lane.last_stage, 0, -1):
                batch = self._take_started(k, self.take_limit(k))
                if batch:
                    return k, batch
            self._skip_dead_head()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_to_fill(min(self.take_limit(0), self.limits[-1]))  # no more than the last stage takes
            limit = self.take_limit(0)
            if self.overlap:
                room = self.ahead_limit - self.ahead()
                if room < min(self.limits[-1], self._queued):  # far enough ahead: wait for the last lane
                    self._room.clear()
                    await self._room.wait()
                    continue
                limit = min(limit, room)
            batch = self._take(limit)
            if batch:
                for job in batch:
                    job.since = job.ticket.submitted
                return 0, batch

    def _take_started(self, k: int, limit: int) -> list[ImageJob]:
        """Up to ``limit`` live images waiting for stage k; a request that went away (cancelled,
        failed, past its deadline) loses its images here, so its remaining stages never run."""
        now = time.monotonic()
        queue = self._stages[k]
        batch: list[ImageJob] = []
        while queue and len(batch) < limit:
            job = queue.popleft()
            ticket = job.ticket
            if self._alive(ticket) and ticket.deadline <= now:
                self.cancel(ticket, "deadline")
            if not self._alive(ticket):
                self.metrics.stage_images_abandoned.labels(str(self.resolutions[k])).inc()
                continue
            batch.append(job)
        return batch

    # ------------------------------------------------------------------ running
    def _set_busy(self, lane: Lane, busy: bool) -> None:
        """On the event loop: lane activity for the metrics (busy seconds per lane, seconds both ran)."""
        now = time.monotonic()
        if busy:
            lane.busy_since = now
        else:
            self.metrics.stage_lane_busy_seconds.labels(lane.name).inc(now - lane.busy_since)
        lane.busy = busy
        if not busy and lane.name == "last":
            self._wakeup.set()  # the lower lane may be holding for it (_held)
        both = len(self._lanes) > 1 and all(other.busy for other in self._lanes)
        if both and self._both_busy_since is None:
            self._both_busy_since = now
        elif not both and self._both_busy_since is not None:
            self.metrics.stage_lanes_overlap_seconds.inc(now - self._both_busy_since)
            self._both_busy_since = None
        self.running = any(other.busy for other in self._lanes)

    async def _run_stage_batch(self, lane: Lane, k: int, batch: list[ImageJob]) -> None:
        resolution = str(self.resolutions[k])
        start = time.monotonic()
        for job in batch:
            self.metrics.stage_wait.labels(resolution).observe(start - job.since)
            if k == 0:
                self.metrics.queue_wait.observe(start - job.ticket.submitted)
                if job.ticket.first_start is None:
                    job.ticket.first_start = start
        loop = asyncio.get_running_loop()
        # The fill delay counts from the end of the lane that takes new images; held, from either lane's
        # end (below a backlog the order is the serial one, and so is the delay).
        takes_new = lane is self._lanes[0] or self.overlap_backlog > 0
        try:
            self._set_busy(lane, True)
            try:
                last, out = await loop.run_in_executor(lane.executor, self._run_from, lane, k, batch, loop)
            finally:
                self._set_busy(lane, False)
        except Exception as exc:  # any engine error fails this batch's requests only
            if takes_new:
                self._engine_free_since = time.monotonic()
            self.metrics.batches.labels("error").inc()
            log.exception("engine failed from stage %s on a batch of %d images", resolution, len(batch))
            failure = EngineFailure(f"{type(exc).__name__}: {exc}")
            for ticket in {id(job.ticket): job.ticket for job in batch}.values():
                self._fail(ticket, failure)
            self._room.set()
            return
        end = time.monotonic()
        if takes_new:
            self._engine_free_since = end
        for job in batch:
            job.ticket.last_end = end
        if last == len(self.resolutions) - 1:
            self.batches_run += 1
            self.metrics.record_images(len(batch))
            self._deliver(batch, out)
            return
        nxt = self._stages[last + 1]
        for job in batch:
            job.stage, job.since = last + 1, end
            nxt.append(job)
        if last + 1 == len(self.resolutions) - 1:
            self._last_wakeup.set()

    def _run_from(
        self, lane: Lane, k: int, batch: list[ImageJob], loop: asyncio.AbstractEventLoop
    ) -> tuple[int, torch.Tensor]:
        """Runs in the lane's engine thread: stage k for ``batch``, then the lane's following stages too
        while the scheduler would choose them anyway, in one hand-over to the engine thread.

        Why that is the same schedule: later-first chose stage k because no image waited at a later
        stage of this lane, and only this call can feed one; so the next choice is stage k+1 for exactly
        these images, unless they are more than its take limit (then the event loop splits them) or one of
        their requests went away (then the event loop drops its images at the boundary; a cancel that
        lands while a stage runs costs at most that stage). Each return to the event loop costs a
        thread hand-over, milliseconds on a busy CPU (benchmarks/scheduler/README.md). Returns the last
        stage run and its output (uint8 images after the last stage)."""
        while True:
            start = time.monotonic()
            out, previews = self._stage_call_in(lane, k, batch)
            resolution = str(self.resolutions[k])
            self._per_image_s[k] = (time.monotonic() - start) / len(batch)
            self.metrics.batches.labels("ok").inc()
            self.metrics.stage_batches.labels(resolution).inc()
            self.metrics.stage_batch_size.labels(resolution).observe(len(batch))
            if previews:
                loop.call_soon_threadsafe(self._emit_previews, batch, previews)
            if k == lane.last_stage or not self._continues(k + 1, batch):
                return k, out
            k += 1
            self.metrics.stage_wait.labels(str(self.resolutions[k])).observe(0.0)

    def _stage_call_in(self, lane: Lane, k: int, batch: list[ImageJob]) -> tuple[Any, dict[int, dict[str, Any]]]:
        """:meth:`_stage_call` on the lane's CUDA stream (when it has one), synchronised before it returns:
        the other lane (another stream) may read what this call handed on as soon as it is back."""
        if lane.stream is None:
            return self._stage_call(k, batch)
        with torch.cuda.stream(lane.stream):
            result = self._stage_call(k, batch)
        lane.stream.synchronize()
        return result

    def _continues(self, k: int, batch: list[ImageJob]) -> bool:
        """Whether stage k would run next for exactly ``batch`` (see :meth:`_run_from`)."""
        now = time.monotonic()
        if any(not self._alive(job.ticket) or job.ticket.deadline <= now for job in batch):
            return False
        return len(batch) <= self.take_limit(k, len(batch))
