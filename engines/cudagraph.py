"""PyTorch + CUDA graphs: each stage's whole Heun loop captured once per batch bucket, then replayed.

A stage of the paper-size model is 13–35 small denoiser calls whose kernels are short at batch
≤ 64, so launch overhead matters; capturing the entire stage (every Euler and Heun evaluation,
the float64 solver arithmetic in between) into one graph per batch bucket (1, 2, 4, …, 64) removes
it. A batch is padded up to its bucket; rows are independent (every layer is per-sample), so the
padding never changes a real image.

The loop that is captured is the shared one, :func:`lowdiff.sampler.heun_stage`, walking the
stage's own :meth:`StageSchedule.sigmas` and :meth:`~StageSchedule.step_orders`: the capture
replaces only the denoiser call, whose σ arguments are looked up in device tensors prepared from
the same ``sigmas()`` before capture (a graph cannot copy from host memory while capturing).

Each stage's graphs share one memory pool of their own, so graphs of different stages may replay at
once on different streams (``--stage-overlap``); that has not run on a GPU yet.

CI has no GPU, so no test runs this; it was checked on an H100 with ``scripts/gpu_check.py``
(parity with the CPU reference, determinism, speed: benchmarks/gpu/). Everything a graph reads must
stay allocated as long as the graph lives (see ``_Captured``). On a CPU-only machine
:func:`cudagraph_runners` raises :class:`engines.EngineUnavailable` naming what is missing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowdiff.engines.torch_eager import resolve_device
from lowdiff.errors import EngineUnavailable, SettingsError
from lowdiff.model import PRECISIONS, LowDiffModel
from lowdiff.precond import Denoiser
from lowdiff.sampler import StageRunner, heun_stage
from lowdiff.schedule import StageSchedule

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_ladder(limit: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first that holds ``limit`` images: the buckets of a stage whose
    calls take at most ``limit`` (the staged scheduler's per-stage limit, e.g. 8×8: 512).

    Why: with the default ladder (≤ 64) a 512-image 8×8 call runs as 8 replays of 64, each paying the
    small stage's fixed cost again; on an H200 (benchmarks/gpu/ run 4) the staged scheduler then served
    0.997× the whole-cascade batcher's images, i.e. its larger low-resolution calls bought nothing."""
    if limit < 1:
        raise ValueError(f"a stage's batch limit is at least 1, got {limit}")
    ladder = [1]
    while ladder[-1] < limit:
        ladder.append(ladder[-1] * 2)
    return tuple(ladder)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``batch`` (batches above the largest are split by the caller)."""
    for b in buckets:
        if b >= batch:
            return b
    return buckets[-1]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    noise: torch.Tensor  # static inputs, written before each replay
    labels: torch.Tensor | None
    condition: torch.Tensor | None
    sigma_cond: torch.Tensor | None
    out: torch.Tensor  # static output, read after each replay
    # The σ tensors the graph reads. Held here because a graph does not own the memory it was
    # captured with: once freed, the allocator hands it out again and replays read garbage.
    sigma_table: dict[float, torch.Tensor]


class CudaGraphStage:
    """A stage runner that owns its loop: replay of a captured :func:`heun_stage` per bucket."""

    def __init__(
        self,
        denoiser: Denoiser,
        resolution: int,
        channels: int,
        conditional: bool,
        conditioned: bool,
        device: torch.device,
        precision: str,
        buckets: tuple[int, ...],
        pool: object,
    ):
        self.denoiser = denoiser
        self.resolution = resolution
        self.channels = channels
        self.conditional = conditional
        self.conditioned = conditioned
        self.device = device
        self.autocast_dtype = PRECISIONS[precision]
        self.buckets = tuple(sorted(buckets))
        self.pool = pool
        self.graphs: dict[tuple[StageSchedule, int], _Captured] = {}

    def sigma_table(self, stage: StageSchedule, bucket: int) -> dict[float, torch.Tensor]:
        """Device tensors [bucket] of every σ the stage visits, keyed as :func:`heun_stage` passes them.

        heun_stage hands the denoiser a float32 host tensor filled with σ, so the key is the value
        rounded to float32; the table comes from the schedule's own ``sigmas()``.
        """
        table = {}
        for value in stage.sigmas().tolist():
            key = float(torch.tensor(value, dtype=torch.float32))
            table[key] = torch.full((bucket,), key, dtype=torch.float32, device=self.device)
        return table

    def stage_fn(self, sigma_table: dict[float, torch.Tensor], static_sigma_cond: torch.Tensor | None):  # noqa: ANN201
        """The denoiser call for capture: σ from device tensors keyed by the schedule's values."""
        dtype = self.autocast_dtype

        def fn(
            x: torch.Tensor,
            sigma: torch.Tensor,
            class_labels: torch.Tensor | None,
            condition: torch.Tensor | None,
            sigma_cond: torch.Tensor | None,
        ) -> torch.Tensor:
            sigma_dev = sigma_table[float(sigma[0])]  # sigma is a host tensor filled with one value
            autocast = torch.autocast(
                self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
            )
            with autocast:
                out = self.denoiser(x, sigma_dev, class_labels, self.resolution, condition, static_sigma_cond)
            return out.float()

        return fn

    @torch.no_grad()
    def capture(self, stage: StageSchedule, bucket: int) -> _Captured:
        r, c, dev = self.resolution, self.channels, self.device
        noise = torch.zeros(bucket, c, r, r, dtype=torch.float64, device=dev)
        labels = torch.zeros(bucket, dtype=torch.long, device=dev) if self.conditional else None
        condition = torch.zeros(bucket, c, r, r, device=dev) if self.conditioned else None
        sigma_cond = torch.ones(bucket, device=dev) if self.conditioned else None
        sigma_table = self.sigma_table(stage, bucket)
        fn = self.stage_fn(sigma_table, sigma_cond)
        placeholder = 1.0 if self.conditioned else None  # the real value sits in the static buffer

        # Warm up on a side stream first (cuDNN/cuBLAS choose kernels and allocate workspaces).
        # (cuDNN's benchmark mode was tried here on an H100: no measurable gain, so it is left off.)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            heun_stage(stage, fn, noise, labels, condition, placeholder)
        torch.cuda.current_stream(dev).wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        # One memory pool for this stage's graphs (its buckets): safe because two replays of one stage
        # never overlap (a stage runs in one engine thread) and each output is copied to the host right
        # after its replay, before that thread replays another. Other stages have their own pools, so
        # that the staged scheduler's --stage-overlap may replay a 32×32 graph on one stream while an
        # 8×8 or 16×16 graph replays on another.
        with torch.cuda.graph(graph, pool=self.pool):
            out = heun_stage(stage, fn, noise, labels, condition, placeholder)
        captured = _Captured(graph, noise, labels, condition, sigma_cond, out, sigma_table)
        self.graphs[(stage, bucket)] = captured
        return captured

    def warmup(self, stage: StageSchedule) -> None:
        for bucket in self.buckets:
            if (stage, bucket) not in self.graphs:
                self.capture(stage, bucket)

    @torch.no_grad()
    def run_stage(
        self,
        stage: StageSchedule,
        noise: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: float | None,
    ) -> torch.Tensor:
        largest = self.buckets[-1]
        if noise.shape[0] > largest:  # split, keeping each image's rows together with its inputs
            parts = []
            for start in range(0, noise.shape[0], largest):
                sl = slice(start, start + largest)
                parts.append(
                    self.run_stage(
                        stage,
                        noise[sl],
                        None if class_labels is None else class_labels[sl],
                        None if condition is None else condition[sl],
                        sigma_cond,
                    )
                )
            return torch.cat(parts)
        batch = noise.shape[0]
        bucket = bucket_for(batch, self.buckets)
        cap = self.graphs.get((stage, bucket)) or self.capture(stage, bucket)
        cap.noise[:batch].copy_(noise, non_blocking=True)
        if cap.labels is not None and class_labels is not None:
            cap.labels[:batch].copy_(class_labels, non_blocking=True)
        if cap.condition is not None and condition is not None:
            cap.condition[:batch].copy_(condition, non_blocking=True)
        if cap.sigma_cond is not None and sigma_cond is not None:
            cap.sigma_cond.fill_(sigma_cond)
        cap.graph.replay()
        return cap.out[:batch].cpu()


def cudagraph_runners(
    model: LowDiffModel,
    device: str = "cuda",
    precision: str = "fp32",
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    capture: bool = True,
    transform: Callable[[Denoiser], Any] | None = None,
    stage_limits: Mapping[int, int] | None = None,
) -> dict[int, StageRunner]:
    """One graph-replaying runner per stage; with ``capture`` every (stage, bucket) is captured now.
    ``stage_limits`` (resolution → the most images one call of that stage takes) replaces ``buckets``
    for the stages it names with :func:`bucket_ladder` of their limit.

    ``transform`` replaces the denoiser that is captured (the ``compile`` engine passes
    ``torch.compile``): whatever it returns is called exactly like the denoiser."""
    if precision not in PRECISIONS:
        raise SettingsError(f"expected one of {', '.join(PRECISIONS)}, got {precision!r}", "precision")
    if not torch.cuda.is_available():
        raise EngineUnavailable(
            f"'cudagraph' needs an NVIDIA GPU and a CUDA build of torch; this machine has torch "
            f"{torch.__version__} with CUDA {'available' if torch.backends.cuda.is_built() else 'not built'}"
            " and no usable GPU (use --engine torch)"
        )
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise SettingsError(f"engine 'cudagraph' runs on 'cuda', not {device!r} (pass --device cuda)", "device")
    denoiser = copy.deepcopy(model.denoiser).to(dev).eval()  # NCHW: see engines/torch_eager.py
    if transform is not None:
        denoiser = transform(denoiser)
    config = model.config
    runners: dict[int, StageRunner] = {}
    for k, stage in enumerate(config.schedule.stages):
        # A pool per stage rather than one for all graphs (see CudaGraphStage.capture): a pool holds
        # the most that one of its graphs needs, and a stage's activations scale with its pixels, so
        # the two lower stages add about 1/4 + 1/16 of the 32×32 stage's graph memory (not measured).
        pool = torch.cuda.graph_pool_handle()
        runner = CudaGraphStage(
            denoiser,
            stage.resolution,
            config.network.img_channels,
            config.conditional,
            k > 0,
            dev,
            precision,
            bucket_ladder(stage_limits[stage.resolution])
            if stage_limits and stage.resolution in stage_limits
            else tuple(buckets),
            pool,
        )
        if capture:
            runner.warmup(stage)
        runners[stage.resolution] = runner
    return runners
