"""A discrete-event simulator of the service's schedulers over a cascade, driven by a per-evaluation cost.

Why a simulator: the question "which images should share the next engine call" is decided by the
cost of one denoiser evaluation against batch size, t_r(b), per resolution r, and by the arrival
process; both are cheap to model and expensive to measure on a GPU this project rarely has. The
simulator replays one open-loop arrival trace (Poisson, request sizes drawn from a given
distribution) through each scheduler on one serial engine: an engine call of ``b`` images at
resolution ``r`` running ``e`` evaluations takes ``e · t_r(b)`` seconds and nothing else happens on
the engine meanwhile (a single GPU stream, or a CPU, serialises the calls). The same trace is fed
to every scheduler (common random numbers), so differences between them are not sampling noise.

Schedulers (each :class:`Scheduler` answers "what does the engine run next, or how long to wait"):

* :class:`CascadeScheduler` — what ``service/batcher.py`` does today: images first-in first-out, up
  to ``max_batch`` per call, a call runs the whole cascade; it waits up to ``max_delay`` (from the
  later of the oldest image's arrival and the end of the last call) for a batch to fill.
* :class:`StagedScheduler` — a queue per stage; a call runs all of one stage's evaluations for up to
  ``limits[r]`` images (of any requests) waiting at that stage; images then move to the next stage's
  queue. Its ``policy`` picks the stage: ``"later"`` (the latest stage with work: finishes what has
  started, never starves because later queues are only fed by earlier ones) or ``"merge"`` (later
  first, except that a cohort waiting at a stage boundary with room in its batch is held while the
  images that arrived *before it reached the boundary* run the earlier stages and catch up, then
  share its batch; images arriving later do not extend the hold, so a hold lasts at most one call
  per earlier stage and nothing starves).
* :class:`OverlapStagedScheduler` — ``lowdiff serve --scheduler staged --stage-overlap on``: the staged
  scheduler's ``backlog`` policy in two lanes that run at the same time, one for the last stage, one for
  the stages before it (later first), the lower lane at most ``limits[0] + 2 · limits[last]`` started
  images ahead of the last. With a ``gate`` g (``--overlap-backlog``, served default ``2 · limits[last]``)
  the lower lane starts a call beside a running last-stage call only while at least g images wait
  unstarted; otherwise it waits for the last lane, so without a backlog the order is the serial one.
  **Contention model** (an assumption, one parameter): while both lanes run, each progresses at ``1/s``
  of its speed alone (``slowdown`` s); s = 1 is perfect overlap (the GPU had room for both), s = 2 none
  at all (two calls at once take as long as one after the other). Real contention is not symmetric —
  the 8×8 stage's kernels leave SMs idle, the 32×32 stage's do not — so s is what a measurement
  (``scripts/gpu_check.py``, step ``scheduler-overlap``) has to pin down.
* :class:`ContinuousScheduler` — per-evaluation joining, LLM-style: a call runs *one* evaluation
  for up to ``limits[r]`` images at resolution r, whatever their step inside the stage (the network
  takes a σ per image), so images join a running stage at any evaluation. Its ``policy``:
  ``"later"`` or ``"oldest"`` (the resolution holding the oldest request's image).

Costs come from a ``lowdiff-cost-table/1`` file (:func:`lowdiff.bench.costs.seconds_per_evaluation`)
or from a linear model ``t_r(b) = floor_r + per_image_r · b`` (:class:`LinearCost`).

Capacity, the unit of offered load: the saturated throughput of whole-cascade batching at its
``max_batch``, ``max_batch / Σ_r nfe_r · t_r(max_batch)`` images per second.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lowdiff.bench.costs import seconds_per_evaluation

CostFn = Callable[[int, int], float]  # (resolution, batch) -> seconds per evaluation


@dataclass(frozen=True)
class LinearCost:
    """t_r(b) = floor_r + per_image_r · b (seconds per evaluation)."""

    floor: Mapping[int, float]
    per_image: Mapping[int, float]

    def __call__(self, resolution: int, batch: int) -> float:
        return self.floor[resolution] + self.per_image[resolution] * batch

    @classmethod
    def through(cls, floor: Mapping[int, float], at_batch: int, seconds: Mapping[int, float]) -> LinearCost:
        """The line through (0, floor_r) and (at_batch, seconds_r) for each resolution."""
        return cls(dict(floor), {r: (seconds[r] - floor[r]) / at_batch for r in floor})


def table_cost(table: dict, config: str, engine: str) -> CostFn:
    """A cost function reading a ``lowdiff-cost-table/1`` table (log-log interpolation between points)."""
    cache: dict[tuple[int, int], float] = {}

    def cost(resolution: int, batch: int) -> float:
        key = (resolution, batch)
        if key not in cache:
            cache[key] = seconds_per_evaluation(table, config, engine, resolution, batch)
        return cache[key]

    return cost


@dataclass(frozen=True)
class Cascade:
    """The stages (resolution, evaluations) in order and the cost of one evaluation."""

    resolutions: tuple[int, ...]
    nfe: tuple[int, ...]
    cost: CostFn

    def stage_seconds(self, k: int, batch: int) -> float:
        return self.nfe[k] * self.cost(self.resolutions[k], batch)

    def cascade_seconds(self, batch: int) -> float:
        return sum(self.stage_seconds(k, batch) for k in range(len(self.resolutions)))

    def capacity(self, max_batch: int) -> float:
        """Images per second of whole-cascade batching with every call full."""
        return max_batch / self.cascade_seconds(max_batch)


# ---------------------------------------------------------------------------- the workload
@dataclass(eq=False)
class Request:
    arrival: float
    size: int
    remaining: int = 0
    finish: float | None = None

    def __post_init__(self) -> None:
        self.remaining = self.size


@dataclass(eq=False)
class Image:
    request: Request
    stage: int = 0  # index of the stage it waits for (or runs)
    step: int = 0  # evaluations done inside that stage (continuous scheduling)
    since: float = 0.0  # when it entered its current queue


def poisson_trace(rate_requests: float, count: int, sizes: Sequence[int], seed: int) -> list[tuple[float, int]]:
    """``count`` (arrival time, images) pairs: exponential gaps at ``rate_requests`` per second, sizes
    drawn uniformly from ``sizes``; the same seed gives the same trace."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(count):
        t += rng.expovariate(rate_requests)
        out.append((t, rng.choice(sizes)))
    return out


# ---------------------------------------------------------------------------- schedulers
@dataclass
class Call:
    """One engine call: these images, this stage (None: the whole cascade), this many seconds."""

    images: list[Image]
    stage: int | None
    seconds: float
    evaluations: int  # per image: the stage's NFE, the cascade's total, or 1


class Scheduler(Protocol):
    name: str

    def admit(self, images: list[Image], now: float) -> None: ...

    def decide(self, now: float) -> Call | float | None:
        """A call to run now, a time to look again (waiting for a batch to fill), or None (idle)."""
        ...

    def finish(self, call: Call, now: float) -> list[Image]:
        """The call ended at ``now``: move its images on; return those that are done."""
        ...


def _take(queue: deque[Image], limit: int) -> list[Image]:
    return [queue.popleft() for _ in range(min(limit, len(queue)))]


class CascadeScheduler:
    """Whole-cascade batching, as ``service/batcher.py`` does it."""

    def __init__(self, cascade: Cascade, max_batch: int, max_delay: float):
        self.name = f"cascade (max batch {max_batch})"
        self.cascade = cascade
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.queue: deque[Image] = deque()
        self.free_since = 0.0

    def admit(self, images: list[Image], now: float) -> None:
        self.queue.extend(images)

    def decide(self, now: float) -> Call | float | None:
        if not self.queue:
            return None
        fill_by = max(self.queue[0].request.arrival, self.free_since) + self.max_delay
        if len(self.queue) < self.max_batch and now < fill_by:
            return fill_by
        batch = _take(self.queue, self.max_batch)
        return Call(batch, None, self.cascade.cascade_seconds(len(batch)), sum(self.cascade.nfe))

    def finish(self, call: Call, now: float) -> list[Image]:
        self.free_since = now
        return call.images


class _QueuePerStage:
    """What the stage-level and per-evaluation schedulers share: a queue and a batch limit per stage."""

    kind = ""
    policies: tuple[str, ...] = ()

    def __init__(self, cascade: Cascade, limits: Mapping[int, int], max_delay: float, policy: str = "later"):
        if policy not in self.policies:
            raise ValueError(f"unknown {self.kind} policy {policy!r}")
        limit_text = "/".join(str(limits[r]) for r in cascade.resolutions)
        self.name = f"{self.kind} {policy} ({limit_text})"
        self.cascade = cascade
        self.limits = [limits[r] for r in cascade.resolutions]
        self.max_delay = max_delay
        self.policy = policy
        self.queues: list[deque[Image]] = [deque() for _ in cascade.resolutions]
        self.free_since = 0.0


class StagedScheduler(_QueuePerStage):
    """Stage-level batching: a queue per stage, a call runs one stage for images of many requests."""

    kind = "staged"
    policies = ("later", "merge", "backlog")

    def admit(self, images: list[Image], now: float) -> None:
        for image in images:
            image.since = now
        self.queues[0].extend(images)

    def pick(self, now: float) -> int | None:
        waiting = [k for k, q in enumerate(self.queues) if q]
        if not waiting:
            return None
        latest = waiting[-1]
        if self.policy != "merge" or len(self.queues[latest]) >= self.limits[latest]:
            return latest
        # merge: first catch up the images that arrived before the cohort reached its boundary.
        reached = self.queues[latest][0].since
        for k in waiting[:-1]:
            if self.queues[k][0].request.arrival <= reached:
                return k
        return latest

    def decide(self, now: float) -> Call | float | None:
        k = self.pick(now)
        if k is None:
            return None
        queue = self.queues[k]
        if k == 0 and not any(self.queues[1:]) and len(queue) < min(self.take_limit(0), self.limits[-1]):
            # Nothing else to do: wait for new arrivals as the cascade batcher does, for as many images
            # as the last stage takes (waiting to fill a bigger first-stage call would delay them all).
            fill_by = max(queue[0].request.arrival, self.free_since) + self.max_delay
            if now < fill_by:
                return fill_by
        batch = _take(queue, self.take_limit(k))
        return Call(batch, k, self.cascade.stage_seconds(k, len(batch)), self.cascade.nfe[k])

    def take_limit(self, k: int) -> int:
        """How many images a call of stage k takes. ``backlog``: a lower stage takes no more than the
        last stage's limit unless more than twice that many wait (a backlog the next last-stage call
        cannot clear anyway), so that big low-resolution calls never delay images that a cascade-sized
        call would have finished first."""
        last = self.limits[-1]
        if self.policy != "backlog" or k == len(self.limits) - 1 or len(self.queues[k]) > 2 * last:
            return self.limits[k]
        return min(self.limits[k], last)

    def finish(self, call: Call, now: float) -> list[Image]:
        self.free_since = now
        assert call.stage is not None
        nxt = call.stage + 1
        if nxt == len(self.queues):
            return call.images
        for image in call.images:
            image.stage, image.since = nxt, now
        self.queues[nxt].extend(call.images)
        return []


class OverlapStagedScheduler(StagedScheduler):
    """Stage-level batching in two concurrent lanes (``--stage-overlap on``), see the module docstring.

    It answers per lane (:meth:`decide_lane`); :func:`simulate` and :func:`saturated_throughput` then run
    both lanes on the contention model instead of one serial engine."""

    kind = "staged overlap"
    policies = ("later", "backlog")
    lanes = ("last", "lower")  # asked in this order: what the last lane takes makes room for the lower

    def __init__(
        self,
        cascade: Cascade,
        limits: Mapping[int, int],
        max_delay: float,
        slowdown: float,
        policy: str = "backlog",
        gate: int | None = None,
    ):
        """``gate``: None — the lower lane runs whenever it has work (``--stage-overlap on``); an image
        count g — it starts a call while the last lane runs only if at least g images wait unstarted (a
        backlog), else it waits for the last lane to finish, which is the serial later-first order."""
        if slowdown < 1:
            raise ValueError(f"slowdown must be ≥ 1 (1: perfect overlap), got {slowdown}")
        super().__init__(cascade, limits, max_delay, policy)
        limit_text = "/".join(str(limits[r]) for r in cascade.resolutions)
        gated = "" if gate is None else f" gate {gate}"
        self.name = f"staged overlap s={slowdown:g}{gated} {policy} ({limit_text})"
        self.slowdown = slowdown
        self.gate = gate or None  # 0: never held, as --overlap-backlog 0
        self.last_running = False
        self.ahead_limit = self.limits[0] + 2 * self.limits[-1]

    def decide(self, now: float) -> Call | float | None:
        raise TypeError("an overlapped scheduler decides per lane (decide_lane)")

    def decide_lane(self, lane: str, now: float) -> Call | float | None:
        """What ``lane`` (idle now) runs next, a time to look again, or None (nothing for it now)."""
        last = len(self.queues) - 1
        if lane == "last":
            if not self.queues[last]:
                return None
            batch = _take(self.queues[last], self.limits[last])
            self.last_running = True
            return Call(batch, last, self.cascade.stage_seconds(last, len(batch)), self.cascade.nfe[last])
        waiting = [k for k in range(last) if self.queues[k]]
        if not waiting:
            return None
        if self.gate is not None and self.last_running and len(self.queues[0]) < self.gate:
            return None  # no backlog: wait for the last lane, as one serial engine would (asked again at its end)
        k = waiting[-1]
        queue = self.queues[k]
        limit = self.take_limit(k)
        if k == 0:
            if len(queue) < min(limit, self.limits[-1]):
                fill_by = max(queue[0].request.arrival, self.free_since) + self.max_delay
                if now < fill_by:
                    return fill_by
            room = self.ahead_limit - sum(len(q) for q in self.queues[1:])
            if room < min(self.limits[-1], len(queue)):
                return None  # far enough ahead: the last lane's next take makes room
            limit = min(limit, room)
        batch = _take(queue, limit)
        return Call(batch, k, self.cascade.stage_seconds(k, len(batch)), self.cascade.nfe[k])

    def finish(self, call: Call, now: float) -> list[Image]:
        free_since = self.free_since
        done = super().finish(call, now)
        if call.stage == len(self.queues) - 1:
            self.last_running = False
            if self.gate is None:
                self.free_since = free_since  # the fill delay counts from the end of the lower lane's calls
            # Gated, the lower lane starts beside the last one only with a backlog (the fill delay is then
            # moot): the delay counts from either lane's end, as on one serial engine.
        return done


class ContinuousScheduler(_QueuePerStage):
    """Per-evaluation joining: one evaluation per call, images at any step of the resolution's stage."""

    kind = "per-evaluation"
    policies = ("later", "oldest")

    def admit(self, images: list[Image], now: float) -> None:
        self.queues[0].extend(images)

    def decide(self, now: float) -> Call | float | None:
        waiting = [k for k, q in enumerate(self.queues) if q]
        if not waiting:
            return None
        if self.policy == "later":
            k = waiting[-1]
        else:
            k = min(waiting, key=lambda j: self.queues[j][0].request.arrival)
        queue = self.queues[k]
        if k == 0 and waiting == [0] and len(queue) < min(self.limits[0], self.limits[-1]):
            fill_by = max(queue[0].request.arrival, self.free_since) + self.max_delay
            if now < fill_by and all(im.step == 0 for im in queue):
                return fill_by
        batch = _take(queue, self.limits[k])
        return Call(batch, k, self.cascade.cost(self.cascade.resolutions[k], len(batch)), 1)

    def finish(self, call: Call, now: float) -> list[Image]:
        self.free_since = now
        assert call.stage is not None
        k = call.stage
        done: list[Image] = []
        stay: list[Image] = []
        for image in call.images:
            image.step += 1
            if image.step < self.cascade.nfe[k]:
                stay.append(image)
            elif k + 1 == len(self.queues):
                done.append(image)
            else:
                image.stage, image.step = k + 1, 0
                self.queues[k + 1].append(image)
        # Images still inside the stage go back to the front, in order: the oldest keep their turn.
        self.queues[k].extendleft(reversed(stay))
        return done


# ---------------------------------------------------------------------------- the event loop
@dataclass
class RunStats:
    scheduler: str
    requests: int
    images: int
    p50_s: float
    p90_s: float
    p99_s: float
    mean_s: float
    throughput: float  # images per second completed inside the measured window
    busy: float  # share of the window the engine was running
    calls: int
    images_per_call: dict[str, float] = field(default_factory=dict)  # by stage ("all" for the cascade)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0…100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def simulate(
    scheduler: Scheduler,
    trace: Sequence[tuple[float, int]],
    warmup_fraction: float = 0.1,
    on_call: Callable[[float, Call], None] | None = None,
) -> RunStats:
    """Replay ``trace`` (open loop) through ``scheduler`` on one serial engine.

    Latency is measured on the requests that arrive after the first ``warmup_fraction`` of the trace
    (the queue starts empty); throughput is the images completed between the arrival of the first
    measured request and the last arrival, per second (at an offered load above what a scheduler can
    serve, that is what it can serve). ``on_call(start, call)`` sees every engine call.
    """
    requests = [Request(t, n) for t, n in trace]
    if not requests:
        raise ValueError("empty trace")
    first = int(len(requests) * warmup_fraction)
    window_start, window_end = requests[first].arrival, requests[-1].arrival
    if isinstance(scheduler, OverlapStagedScheduler):
        run = _run_lanes(scheduler, requests, (window_start, window_end), on_call)
        return _stats(scheduler, requests[first:], (window_start, window_end), run)
    now = 0.0
    nxt = 0
    done_in_window = 0
    busy = 0.0
    calls = 0
    per_stage: dict[str, list[int]] = {}
    pending = len(requests)
    while pending:
        while nxt < len(requests) and requests[nxt].arrival <= now:
            r = requests[nxt]
            scheduler.admit([Image(r) for _ in range(r.size)], now)
            nxt += 1
        decision = scheduler.decide(now)
        next_arrival = requests[nxt].arrival if nxt < len(requests) else math.inf
        if decision is None:
            if next_arrival == math.inf:
                raise RuntimeError(f"{scheduler.name}: idle with {pending} request(s) unfinished")
            now = next_arrival
            continue
        if isinstance(decision, float | int):
            now = max(now, min(float(decision), next_arrival))
            continue
        call = decision
        if on_call is not None:
            on_call(now, call)
        start, end = now, now + call.seconds
        busy += max(0.0, min(end, window_end) - max(start, window_start))
        calls += 1
        per_stage.setdefault("all" if call.stage is None else str(call.stage), []).append(len(call.images))
        now = end
        done, finished = _complete(scheduler, call, now, (window_start, window_end))
        done_in_window += done
        pending -= finished
    run = _LaneRun(busy, calls, per_stage, done_in_window, now)
    return _stats(scheduler, requests[first:], (window_start, window_end), run)


@dataclass
class _LaneRun:
    busy: float  # seconds inside the window with at least one call running
    calls: int
    per_stage: dict[str, list[int]]
    done_in_window: int
    end: float


def _stats(scheduler: Scheduler, measured: list[Request], window: tuple[float, float], run: _LaneRun) -> RunStats:
    latencies = [r.finish - r.arrival for r in measured if r.finish is not None]
    span = max(window[1] - window[0], 1e-9)
    return RunStats(
        scheduler=scheduler.name,
        requests=len(measured),
        images=sum(r.size for r in measured),
        p50_s=percentile(latencies, 50),
        p90_s=percentile(latencies, 90),
        p99_s=percentile(latencies, 99),
        mean_s=sum(latencies) / len(latencies),
        throughput=run.done_in_window / span,
        busy=run.busy / span,
        calls=run.calls,
        images_per_call={k: sum(v) / len(v) for k, v in sorted(run.per_stage.items())},
    )


def _complete(scheduler: Scheduler, call: Call, now: float, window: tuple[float, float]) -> tuple[int, int]:
    """Hands ``call``'s images back to ``scheduler`` at ``now``; marks the requests they complete.
    Returns (images done inside ``window``, requests finished)."""
    done = finished = 0
    for image in scheduler.finish(call, now):
        if window[0] <= now <= window[1]:
            done += 1
        req = image.request
        req.remaining -= 1
        if req.remaining == 0:
            req.finish = now
            finished += 1
    return done, finished


def _run_lanes(
    scheduler: OverlapStagedScheduler,
    requests: list[Request],
    window: tuple[float, float],
    on_call: Callable[[float, Call], None] | None = None,
) -> _LaneRun:
    """Replay ``requests`` through an overlapped scheduler: each lane runs one call at a time; a call of
    ``seconds`` (its time alone) progresses at rate 1 while it runs alone and ``1/slowdown`` while the
    other lane runs too. Idle lanes are asked again after every event (an arrival, a call's end, a
    fill-delay timer)."""
    now = 0.0
    nxt = 0
    pending = len(requests)
    running: dict[str, list] = {}  # lane -> [call, seconds of its solo work left]
    wake: dict[str, float] = {}
    busy = 0.0
    calls = 0
    done_in_window = 0
    per_stage: dict[str, list[int]] = {}
    while pending:
        while nxt < len(requests) and requests[nxt].arrival <= now:
            r = requests[nxt]
            scheduler.admit([Image(r) for _ in range(r.size)], now)
            nxt += 1
        for lane in scheduler.lanes:
            if lane in running:
                continue
            wake.pop(lane, None)
            decision = scheduler.decide_lane(lane, now)
            if decision is None:
                continue
            if isinstance(decision, float | int):
                wake[lane] = float(decision)
                continue
            if on_call is not None:
                on_call(now, decision)
            calls += 1
            per_stage.setdefault(str(decision.stage), []).append(len(decision.images))
            running[lane] = [decision, decision.seconds]
        rate = 1.0 / scheduler.slowdown if len(running) > 1 else 1.0
        next_arrival = requests[nxt].arrival if nxt < len(requests) else math.inf
        ends = {lane: now + left / rate for lane, (_, left) in running.items()}
        t = min([next_arrival, *wake.values(), *ends.values()])
        if t == math.inf:
            raise RuntimeError(f"{scheduler.name}: idle with {pending} request(s) unfinished")
        if running:
            busy += max(0.0, min(t, window[1]) - max(now, window[0]))
        for entry in running.values():
            entry[1] -= (t - now) * rate
        now = t
        # A call ends when the clock reaches its end, not when its remaining work rounds to zero: late in a
        # long trace ``now`` is large, and ``now + left / rate`` may equal ``now`` while ``left`` is not 0.
        for lane in [lane for lane, end in ends.items() if end <= t]:
            done, finished = _complete(scheduler, running.pop(lane)[0], now, window)
            done_in_window += done
            pending -= finished
    return _LaneRun(busy, calls, per_stage, done_in_window, now)


def saturated_throughput(scheduler: Scheduler, images: int) -> float:
    """Images per second with ``images`` single-image requests all waiting at time 0 (no arrivals
    later): what a scheduler does with an always-full queue, without an open-loop window's edges."""
    trace = [(0.0, 1)] * images
    requests = [Request(t, n) for t, n in trace]
    if isinstance(scheduler, OverlapStagedScheduler):
        return images / _run_lanes(scheduler, requests, (0.0, math.inf)).end
    scheduler.admit([Image(r) for r in requests], 0.0)
    now = 0.0
    left = images
    while left:
        decision = scheduler.decide(now)
        if decision is None:
            raise RuntimeError(f"{scheduler.name}: idle with {left} image(s) left")
        if isinstance(decision, float | int):
            now = max(now, float(decision))
            continue
        now += decision.seconds
        left -= len(scheduler.finish(decision, now))
    return images / now


def slowdown_for(
    target: float, cascade: Cascade, limits: Mapping[int, int], max_batch: int, images: int = 4096
) -> float | None:
    """The largest contention slowdown s at which overlapped stage batching still reaches ``target`` ×
    the saturated throughput of whole-cascade batching at ``max_batch`` (bisection on s in [1, 2]);
    None if even perfect overlap (s = 1) falls short."""
    base = saturated_throughput(CascadeScheduler(cascade, max_batch, 0.0), images)

    def ratio(s: float) -> float:
        return saturated_throughput(OverlapStagedScheduler(cascade, limits, 0.0, s), images) / base

    if ratio(1.0) < target:
        return None
    if ratio(2.0) >= target:
        return 2.0
    lo, hi = 1.0, 2.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) >= target else (lo, mid)
    return lo
