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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

import torch

from lowdiff.sampler import StageCallback, to_uint8
from lowdiff.service.batcher import Batcher, Engine, EngineFailure, ImageJob, Ticket
from lowdiff.service.metrics import ServiceMetrics

log = logging.getLogger("lowdiff.service.staged")

DEFAULT_LIMIT_CAP = 512


class StageEngine(Engine, Protocol):
    """What the stage-level scheduler needs of an engine on top of :class:`Engine` (``CascadeEngine``)."""

    def stage_noise(self, seeds: Sequence[int]) -> list[torch.Tensor]: ...

    def run_stage(
        self,
        index: int,
        noise: torch.Tensor,
        class_labels: Sequence[int] | None,
        condition: torch.Tensor | None,
        sigma_cond: float | None,
        on_stage: StageCallback | None = None,
    ) -> tuple[torch.Tensor, float | None]: ...

    def denoised_preview(
        self,
        index: int,
        x: torch.Tensor,
        class_labels: Sequence[int] | None,
        condition: torch.Tensor | None,
        sigma_cond: float | None,
    ) -> torch.Tensor: ...


def default_stage_limits(resolutions: Sequence[int], max_batch: int, cap: int = DEFAULT_LIMIT_CAP) -> dict[int, int]:
    """As many pixels per call as ``max_batch`` images at the output resolution (×4 per halving), capped:
    a low-resolution call then costs about what a last-stage call costs, and its fixed per-evaluation
    cost is spread over more images. The last stage keeps ``max_batch``."""
    top = resolutions[-1]
    return {r: max(max_batch, min(cap, max_batch * (top // r) ** 2)) if r != top else max_batch for r in resolutions}


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
    ):
        super().__init__(engine, executor, metrics, limits[resolutions[-1]], max_delay_s, max_queue)
        self.stage_engine = engine
        self.resolutions = tuple(resolutions)
        self.limits = [int(limits[r]) for r in self.resolutions]
        # Stage 0's queue is the inherited ``_queue`` (images not yet started: what submit, cancel and
        # backpressure count); stage k ≥ 1 holds started images waiting for stage k.
        self._stages: list[deque[ImageJob]] = [self._queue] + [deque() for _ in self.resolutions[1:]]
        self._per_image_s = [0.0] * len(self.resolutions)
        self.makes_previews = len(self.resolutions) > 1
        for k, r in enumerate(self.resolutions):
            metrics.stage_waiting.labels(str(r)).set_function(lambda k=k: self.waiting(k))

    def waiting(self, k: int) -> int:
        """Live images waiting for stage k."""
        if k == 0:
            return self._queued
        return sum(1 for job in self._stages[k] if self._alive(job.ticket))

    @staticmethod
    def _alive(ticket: Ticket) -> bool:
        return ticket.cancelled is None and not ticket.future.done()

    def retry_after(self, extra: int = 0) -> int:
        if any(self._per_image_s):
            self._seconds_per_image = sum(self._per_image_s)
        return super().retry_after(extra)

    async def close(self) -> None:
        await super().close()
        for queue in self._stages[1:]:
            for job in queue:
                if not job.ticket.future.done():
                    job.ticket.future.cancel()
            queue.clear()

    # ------------------------------------------------------------------ choosing
    async def _run_forever(self) -> None:
        while True:
            k, batch = await self._next_stage_batch()
            await self._run_stage_batch(k, batch)

    def take_limit(self, k: int, waiting: int | None = None) -> int:
        """Images stage k takes in one call when ``waiting`` (default: its live queue) wait for it."""
        last = len(self.limits) - 1
        if k == last or (self.waiting(k) if waiting is None else waiting) > 2 * self.limits[last]:
            return self.limits[k]
        return min(self.limits[k], self.limits[last])

    async def _next_stage_batch(self) -> tuple[int, list[ImageJob]]:
        while True:
            for k in range(len(self._stages) - 1, 0, -1):
                batch = self._take_started(k, self.take_limit(k))
                if batch:
                    return k, batch
            self._skip_dead_head()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_to_fill(min(self.take_limit(0), self.limits[-1]))  # no more than the last stage takes
            batch = self._take(self.take_limit(0))
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
    async def _run_stage_batch(self, k: int, batch: list[ImageJob]) -> None:
        resolution = str(self.resolutions[k])
        start = time.monotonic()
        for job in batch:
            self.metrics.stage_wait.labels(resolution).observe(start - job.since)
            if k == 0:
                self.metrics.queue_wait.observe(start - job.ticket.submitted)
                if job.ticket.first_start is None:
                    job.ticket.first_start = start
        loop = asyncio.get_running_loop()
        try:
            self.running = True
            try:
                last, out = await loop.run_in_executor(self.executor, self._run_from, k, batch, loop)
            finally:
                self.running = False
        except Exception as exc:  # any engine error fails this batch's requests only
            self._engine_free_since = time.monotonic()
            self.metrics.batches.labels("error").inc()
            log.exception("engine failed from stage %s on a batch of %d images", resolution, len(batch))
            failure = EngineFailure(f"{type(exc).__name__}: {exc}")
            for ticket in {id(job.ticket): job.ticket for job in batch}.values():
                self._fail(ticket, failure)
            return
        end = self._engine_free_since = time.monotonic()
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

    def _run_from(self, k: int, batch: list[ImageJob], loop: asyncio.AbstractEventLoop) -> tuple[int, torch.Tensor]:
        """Runs in the engine thread: stage k for ``batch``, then the following stages too while the
        scheduler would choose them anyway, in one hand-over to the engine thread.

        Why that is the same schedule: later-first chose stage k because no image waited at a later
        stage, and only this call can feed one; so the next choice is stage k+1 for exactly these
        images, unless they are more than its take limit (then the event loop splits them) or one of
        their requests went away (then the event loop drops its images at the boundary; a cancel that
        lands while a stage runs costs at most that stage). Each return to the event loop costs a
        thread hand-over, milliseconds on a busy CPU (benchmarks/scheduler/README.md). Returns the last
        stage run and its output (uint8 images after the last stage)."""
        last = len(self.resolutions) - 1
        while True:
            start = time.monotonic()
            out, previews = self._stage_call(k, batch)
            resolution = str(self.resolutions[k])
            self._per_image_s[k] = (time.monotonic() - start) / len(batch)
            self.metrics.batches.labels("ok").inc()
            self.metrics.stage_batches.labels(resolution).inc()
            self.metrics.stage_batch_size.labels(resolution).observe(len(batch))
            if previews:
                loop.call_soon_threadsafe(self._emit_previews, batch, previews)
            if k == last or not self._continues(k + 1, batch):
                return k, out
            k += 1
            self.metrics.stage_wait.labels(str(self.resolutions[k])).observe(0.0)

    def _continues(self, k: int, batch: list[ImageJob]) -> bool:
        """Whether stage k would run next for exactly ``batch`` (see :meth:`_run_from`)."""
        now = time.monotonic()
        if any(not self._alive(job.ticket) or job.ticket.deadline <= now for job in batch):
            return False
        return len(batch) <= self.take_limit(k, len(batch))

    def _emit_previews(self, batch: list[ImageJob], previews: dict[int, dict[str, Any]]) -> None:
        """On the event loop: hand the previews of one stage call to their streams."""
        now = time.monotonic()
        for position, preview in previews.items():
            job = batch[position]
            ticket = job.ticket
            if ticket.events is not None and self._alive(ticket):
                if ticket.first_preview is None:
                    ticket.first_preview = now
                    self.metrics.first_preview.observe(now - ticket.submitted)
                ticket.events.put_nowait(("preview", job.index, preview))

    def _deliver(self, batch: list[ImageJob], images: torch.Tensor) -> None:
        for job, image in zip(batch, images):
            job.noise = job.condition = None
            if self._alive(job.ticket):
                self._deliver_image(job, image)

    def _stage_call(self, k: int, batch: list[ImageJob]) -> tuple[Any, dict[int, dict[str, Any]]]:
        """Runs in the engine thread: stage k for ``batch``. Returns uint8 images after the last stage;
        otherwise the images' hand-off state is stored on the jobs and the previews are returned
        (position in the batch → {resolution, sigma, image})."""
        engine = self.stage_engine
        if k == 0:
            noises = engine.stage_noise([job.seed for job in batch])
            for i, job in enumerate(batch):
                job.noise = [n[i] for n in noises]
        noise = torch.stack([job.noise[k] for job in batch])  # type: ignore[index, misc]
        labels = None if all(job.class_label is None for job in batch) else [int(job.class_label) for job in batch]  # type: ignore[arg-type]
        condition = None if k == 0 else torch.stack([job.condition for job in batch])  # type: ignore[misc]
        sigma_cond = batch[0].sigma_cond
        if any(job.sigma_cond != sigma_cond for job in batch):
            raise RuntimeError(f"stage {k}: images handed on at different σ")  # a scheduler bug, never expected

        def on_stage(resolution: int, seconds: float) -> None:
            self.metrics.stage_duration.labels(str(resolution)).observe(seconds)

        x, sigma_next = engine.run_stage(k, noise, labels, condition, sigma_cond, on_stage=on_stage)
        if x.shape[0] != len(batch):
            raise RuntimeError(f"engine returned {x.shape[0]} images for a batch of {len(batch)}")
        for job in batch:
            job.noise[k] = None  # type: ignore[index]
        if k == len(self.resolutions) - 1:
            return to_uint8(x), {}
        wanted = [i for i, job in enumerate(batch) if job.ticket.previews and self._alive(job.ticket)]
        previews: dict[int, dict[str, Any]] = {}
        if wanted:
            sub_labels = None if labels is None else [labels[i] for i in wanted]
            sub_cond = None if condition is None else condition[wanted]
            estimate = engine.denoised_preview(k, x[wanted], sub_labels, sub_cond, sigma_cond)
            images = to_uint8(estimate)
            for j, i in enumerate(wanted):
                previews[i] = {"resolution": self.resolutions[k], "sigma": sigma_next, "image": images[j]}
        for i, job in enumerate(batch):
            job.condition, job.sigma_cond = x[i], sigma_next
        return x, previews
