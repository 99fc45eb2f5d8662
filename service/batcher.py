"""Dynamic batching: requests are split into images, images are batched, batches run off the event loop.

The unit of scheduling is one image, an :class:`ImageJob` ``(class_label, seed)``; a request is a
:class:`Ticket` that owns its jobs, its deadline and the future its handler awaits. The batcher
takes live jobs first-in first-out, up to ``max_batch``, waiting at most ``max_delay`` for a batch
to fill (counted from the later of the oldest queued job's arrival and the end of the previous
batch), and runs the batch on the engine in one worker thread; the event loop keeps accepting,
validating and answering meanwhile. Jobs of several requests share a batch; a request larger than
``max_batch`` spans several batches.

Determinism needs nothing from this module: the engine makes image i depend only on
``(class_labels[i], seeds[i])``, whatever its batch neighbours are.

Why the per-stage loop is not here: the cascade (stage order, Heun steps, hand-offs) belongs to the
engine layer (:func:`lowdiff.sampler.run_cascade` and the engines' stage runners), and this module
only sees "images in, images out". Batching each stage on its own (``--scheduler staged``) is
:class:`lowdiff.service.staged.StagedBatcher`, a subclass: one queue per stage, a job carrying its
hand-off state from stage to stage (the fields of :class:`ImageJob` after ``started``), the engine's
per-stage entry point (``CascadeEngine.run_stage``); tickets, deadlines, cancellation and
backpressure are this module's.

Previews for streams (``POST /generate/stream``) with whole-cascade batches: a batch that holds a
streaming request's image runs the cascade through the same per-stage entry point, one engine call per
stage in the same engine thread (:meth:`Batcher._cascade_by_stages`), so each hand-off's preview reaches
its stream while the later stages run; the pixels are ``generate``'s (the same noise and per-stage work).
Batches without a stream keep the single ``generate`` call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lowdiff.engines import EngineInfo
from lowdiff.sampler import StageCallback, to_uint8
from lowdiff.service.metrics import ServiceMetrics, batch_size_bucket

log = logging.getLogger("lowdiff.service.batcher")


class Engine(Protocol):
    """What the service needs of an engine (``engines.CascadeEngine`` provides it)."""

    def generate(
        self,
        seeds: Sequence[int],
        class_labels: Sequence[int] | None = None,
        on_stage: StageCallback | None = None,
    ) -> torch.Tensor: ...

    def warmup(self, batch_size: int = 1) -> None: ...

    def info(self) -> EngineInfo: ...


STAGE_API = ("stage_noise", "run_stage", "denoised_preview")


class StageEngine(Engine, Protocol):
    """What running one stage at a time needs of an engine on top of :class:`Engine` (``CascadeEngine``):
    the stage-level scheduler, and the cascade batcher for streams that want previews."""

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


class QueueFull(Exception):
    """The queue cannot take a request's images; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineFailure(RuntimeError):
    """The engine raised while running a batch that held some of this request's images."""


@dataclass(eq=False)
class ImageJob:
    ticket: Ticket
    index: int
    seed: int
    class_label: int | None
    started: bool = False
    # Hand-off state, where batches run one stage per engine call (service/staged.py; a cascade batch that
    # carries a stream's previews): the stage the image waits for, every stage's starting noise (drawn when
    # it enters the cascade), the previous stage's output and the σ it was handed on at, and when it entered
    # its current queue.
    stage: int = 0
    noise: list[torch.Tensor | None] | None = None
    condition: torch.Tensor | None = None
    sigma_cond: float | None = None
    since: float = 0.0


@dataclass(eq=False)
class Ticket:
    """One request's images: filled in by the batcher, awaited by the HTTP handler."""

    future: asyncio.Future[list[torch.Tensor]]
    deadline: float  # time.monotonic() by which the request must be done
    submitted: float = field(default_factory=time.monotonic)
    jobs: list[ImageJob] = field(default_factory=list)
    images: list[torch.Tensor | None] = field(default_factory=list)
    remaining: int = 0
    first_start: float | None = None  # when its first batch started (for queue_s)
    last_end: float | None = None  # when its last batch ended (for compute_s)
    first_preview: float | None = None  # when its first preview was made (streaming)
    cancelled: str | None = None  # reason its unstarted work was dropped
    # Streaming (POST /generate/stream): events ("preview" | "image", job index, payload) are put here
    # as they happen; previews are computed only when ``previews`` is set (an engine with the stage API).
    events: asyncio.Queue[tuple[str, int, dict]] | None = None
    previews: bool = False

    @property
    def queue_s(self) -> float:
        return (self.first_start or self.submitted) - self.submitted

    @property
    def compute_s(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start


class Batcher:
    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        metrics: ServiceMetrics,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        resolutions: Sequence[int] = (),
    ):
        """``resolutions``: the model's stages; with more than one, and an engine that runs one stage at a
        time, streaming requests get previews (their batches then run stage by stage, same pixels)."""
        self.engine = engine
        self.executor = executor
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._queue: deque[ImageJob] = deque()  # may hold jobs of cancelled tickets; skipped when taken
        self._queued = 0  # live (not cancelled, not started) jobs: what backpressure counts
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seconds_per_image = 0.0  # from the last batch, for Retry-After
        self._engine_free_since = 0.0  # time.monotonic() when the last batch ended
        self.batches_run = 0
        self.running = False  # a batch is in the engine thread
        self.resolutions = tuple(resolutions)
        stage_api = all(hasattr(engine, name) for name in STAGE_API)
        self.stage_engine: StageEngine | None = engine if stage_api else None  # type: ignore[assignment]
        self.makes_previews = self.stage_engine is not None and len(self.resolutions) > 1
        metrics.bind_queue(lambda: self._queued)

    # ------------------------------------------------------------------ requests
    @property
    def queue_depth(self) -> int:
        return self._queued

    def submit(
        self, seeds: Sequence[int], class_labels: Sequence[int | None], deadline: float, stream: bool = False
    ) -> Ticket:
        """Queue one request's images, or raise :class:`QueueFull` (nothing already queued is dropped).
        With ``stream`` the ticket gets an event queue (each image as it is done; previews too where the
        scheduler makes them)."""
        count = len(seeds)
        if self._queued + count > self.max_queue:
            raise QueueFull(self.retry_after(count))
        ticket = Ticket(future=asyncio.get_running_loop().create_future(), deadline=deadline)
        if stream:
            ticket.events = asyncio.Queue()
            ticket.previews = self.makes_previews
        ticket.jobs = [ImageJob(ticket, k, int(s), c) for k, (s, c) in enumerate(zip(seeds, class_labels))]
        ticket.images = [None] * count
        ticket.remaining = count
        self._queue.extend(ticket.jobs)
        self._queued += count
        self._wakeup.set()
        return ticket

    def cancel(self, ticket: Ticket, reason: str) -> int:
        """Drop the ticket's jobs that have not started (started ones finish, unseen); returns how many."""
        if ticket.cancelled is not None:
            return 0
        ticket.cancelled = reason
        dropped = sum(1 for job in ticket.jobs if not job.started)
        self._queued -= dropped
        if dropped:
            self.metrics.images_dropped.labels(reason).inc(dropped)
        if not ticket.future.done():
            ticket.future.cancel()
        return dropped

    def retry_after(self, extra: int = 0) -> int:
        """Seconds until the queue has room, estimated from the last batch's time per image."""
        backlog = self._queued + extra - self.max_queue
        per_image = self._seconds_per_image or 0.1
        return max(1, min(3600, math.ceil(max(backlog, 1) * per_image)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run_forever(), name="lowdiff-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._queue:
            if job.ticket.cancelled is None:
                self.cancel(job.ticket, "failed")

    async def _run_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._run_batch(batch)

    # ------------------------------------------------------------------ batching
    async def _next_batch(self) -> list[ImageJob]:
        while True:
            self._skip_dead_head()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_to_fill(self.max_batch)
            batch = self._take(self.max_batch)
            if batch:
                return batch

    async def _wait_to_fill(self, target: int) -> None:
        """Wait until ``target`` images are queued or ``max_delay`` has passed (the queue is not empty).

        Counting the delay from the end of the last batch too lets clients whose answers that batch
        just carried rejoin the next one: without it, closed-loop clients as many as max_batch split
        into two groups that alternate in half-full batches."""
        fill_by = max(self._queue[0].ticket.submitted, self._engine_free_since) + self.max_delay_s
        while self._queued < target:
            timeout = fill_by - time.monotonic()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return

    def _skip_dead_head(self) -> None:
        while self._queue and self._queue[0].ticket.cancelled is not None:
            self._queue.popleft()

    def _take(self, limit: int) -> list[ImageJob]:
        now = time.monotonic()
        batch: list[ImageJob] = []
        while self._queue and len(batch) < limit:
            job = self._queue.popleft()
            ticket = job.ticket
            if ticket.cancelled is not None:
                continue
            if ticket.deadline <= now:
                # Its handler is timing out right now; running it would only waste a slot.
                self.cancel(ticket, "deadline")
                continue
            job.started = True
            self._queued -= 1
            batch.append(job)
        return batch

    async def _run_batch(self, batch: list[ImageJob]) -> None:
        start = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.observe(start - job.ticket.submitted)
            if job.ticket.first_start is None:
                job.ticket.first_start = start
        seeds = [job.seed for job in batch]
        labels = None if all(job.class_label is None for job in batch) else [int(job.class_label) for job in batch]
        loop = asyncio.get_running_loop()
        by_stages = self.makes_previews and any(job.ticket.previews for job in batch)
        try:
            self.running = True
            try:
                if by_stages:
                    done, images = await loop.run_in_executor(self.executor, self._cascade_by_stages, batch, loop)
                else:
                    done = batch
                    images = await loop.run_in_executor(self.executor, self._generate, seeds, labels)
            finally:
                self.running = False
            if images.shape[0] != len(done):
                raise RuntimeError(f"engine returned {images.shape[0]} images for a batch of {len(done)}")
        except Exception as exc:  # any engine error fails this batch only
            self._engine_free_since = time.monotonic()
            self.metrics.batches.labels("error").inc()
            log.exception("engine failed on a batch of %d images", len(batch))
            failure = EngineFailure(f"{type(exc).__name__}: {exc}")
            for ticket in {id(job.ticket): job.ticket for job in batch}.values():
                self._fail(ticket, failure)
            return
        end = self._engine_free_since = time.monotonic()
        elapsed = end - start
        self.batches_run += 1
        self._seconds_per_image = elapsed / len(batch)
        self.metrics.batches.labels("ok").inc()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_duration.labels(batch_size_bucket(len(batch))).observe(elapsed)
        self.metrics.record_images(len(done))
        log.debug("batch of %d images in %.3f s", len(batch), elapsed)
        for job in done:
            job.ticket.last_end = end
        self._deliver(done, images)

    def _deliver(self, jobs: list[ImageJob], images: torch.Tensor) -> None:
        """Hand finished images to their requests, those still waiting for them."""
        for job, image in zip(jobs, images):
            if self._alive(job.ticket):
                self._deliver_image(job, image)

    @staticmethod
    def _deliver_image(job: ImageJob, image: torch.Tensor) -> None:
        """Hand one finished image to its live request: its slot, a stream event, the answer once all are in."""
        ticket = job.ticket
        ticket.images[job.index] = image
        if ticket.events is not None:
            ticket.events.put_nowait(("image", job.index, {"image": image}))
        ticket.remaining -= 1
        if ticket.remaining == 0:
            ticket.future.set_result([im for im in ticket.images if im is not None])

    def _generate(self, seeds: list[int], labels: list[int] | None) -> torch.Tensor:
        """Runs in the engine thread; stage timings go straight to the (thread-safe) histogram."""
        return self.engine.generate(seeds, labels, on_stage=self._observe_stage)

    def _observe_stage(self, resolution: int, seconds: float) -> None:
        self.metrics.stage_duration.labels(str(resolution)).observe(seconds)

    @staticmethod
    def _alive(ticket: Ticket) -> bool:
        return ticket.cancelled is None and not ticket.future.done()

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

    def _stage_call(self, k: int, batch: list[ImageJob]) -> tuple[Any, dict[int, dict[str, Any]]]:
        """Runs in the engine thread: stage k for ``batch``. Returns uint8 images after the last stage;
        otherwise the images' hand-off state is stored on the jobs and the previews are returned
        (position in the batch → {resolution, sigma, image})."""
        engine = self.stage_engine
        assert engine is not None, "an engine without the stage API runs whole cascades only"
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
        x, sigma_next = engine.run_stage(k, noise, labels, condition, sigma_cond, on_stage=self._observe_stage)
        if x.shape[0] != len(batch):
            raise RuntimeError(f"engine returned {x.shape[0]} images for a batch of {len(batch)}")
        for job in batch:
            job.noise[k] = None  # type: ignore[index]
        if k == len(self.resolutions) - 1:
            for job in batch:
                job.noise = job.condition = None  # the hand-off state is spent
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

    def _cascade_by_stages(
        self, batch: list[ImageJob], loop: asyncio.AbstractEventLoop
    ) -> tuple[list[ImageJob], torch.Tensor]:
        """Runs in the engine thread: the whole cascade for ``batch``, one :meth:`_stage_call` per stage,
        handing each stage's previews to their streams as soon as it ends. What ``engine.generate`` does,
        with the same pixels (the same noise and per-stage work; ``tests/service/test_staged.py``), plus one
        preview evaluation for the streaming requests' images; used only for batches that hold one. Images
        whose request went away (a stream's client disconnected, its deadline passed) are dropped at the
        next stage boundary, as the staged scheduler does. Returns the images that ran to the end, and
        theirs (uint8)."""
        last = len(self.resolutions) - 1
        for k in range(last + 1):
            out, previews = self._stage_call(k, batch)
            if previews:
                loop.call_soon_threadsafe(self._emit_previews, batch, previews)
            if k == last:
                break
            alive = [job for job in batch if self._alive(job.ticket)]
            if len(alive) < len(batch):
                self.metrics.stage_images_abandoned.labels(str(self.resolutions[k + 1])).inc(len(batch) - len(alive))
                batch = alive
                if not batch:
                    return [], torch.empty(0, dtype=torch.uint8)
        return batch, out

    def _fail(self, ticket: Ticket, failure: EngineFailure) -> None:
        if ticket.future.done():
            return
        ticket.future.set_exception(failure)
        # Its other images (queued for later batches) are useless now.
        unstarted = sum(1 for job in ticket.jobs if not job.started)
        if ticket.cancelled is None:
            ticket.cancelled = "failed"
            self._queued -= unstarted
            if unstarted:
                self.metrics.images_dropped.labels("failed").inc(unstarted)
