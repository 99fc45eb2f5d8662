"""Measure: the paper's Table 5 measurement (latency and throughput of one full batch) for one or
more (model, engine) targets, timed round-robin.

For each target: build its engine once, run warm-up batches (engine set-up, graph capture and
allocator growth are not timed), then ``runs`` timed batches. Each run is one call of
:meth:`CascadeEngine.generate` for ``batch`` images (seeds 0…B−1, classes cycling), timed end to
end; stage times come from :func:`lowdiff.sampler.run_cascade`'s ``on_stage`` callback. Several
targets are measured round-robin: each round times every target once, so on a shared, drifting
machine they all see the same load.

Effective NFE (paper appendix B): a stage's *per-step latency* is its latency divided by its NFE
(one step = one denoiser evaluation here); each lower-resolution stage's NFE is scaled by the
ratio of its per-step latency to the target (last) stage's, the scaled NFEs are summed with the
target's NFE, and the sum is rounded up.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowdiff.bench.machine import device_description, load_average, runtime_versions
from lowdiff.engines import ENGINE_KINDS, load_engine
from lowdiff.errors import SettingsError
from lowdiff.progress import Progress

RANDOM_WEIGHTS_NOTE = (
    "random weights (--config): the architecture's speed, not a trained model; weights do not change the time"
)


def effective_nfe(stages: list[dict[str, Any]]) -> int:
    """Appendix B: Σ_k NFE_k · (per-step latency_k / per-step latency_target), ceiled; target = last stage."""
    target = stages[-1]["step_latency_s"]
    total = sum(s["nfe"] * s["step_latency_s"] / target for s in stages)
    return math.ceil(total - 1e-9)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class BenchTarget:
    """One (model, engine) under measurement: loaded and warmed once, then timed run by run."""

    model: Any
    engine: Any
    kind: str
    device: str
    precision: str
    batch: int
    warmup_runs: int
    threads: int | None
    weights: str
    load_s: float
    seeds: list[int]
    labels: list[int] | None
    latencies: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    stage_times: dict[int, list[float]] = field(default_factory=dict)

    def measure(self) -> None:
        """Time one full batch: wall clock, this process's CPU time, and each stage (on_stage)."""
        cpu_start = time.process_time()
        start = time.perf_counter()
        self.engine.generate(self.seeds, self.labels, on_stage=lambda r, s: self.stage_times[r].append(s))
        self.latencies.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu_start)


def prepare(
    model: Any,
    engine_kind: str,
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = 64,
    warmup_runs: int = 1,
    threads: int | None = None,
    engine_dir: str | Path | None = None,
    weights: str = "checkpoint",
) -> BenchTarget:
    """Load ``model`` on ``engine_kind`` and run the warm-up batches (not timed as runs)."""
    config = model.config
    load_start = time.perf_counter()
    engine = load_engine(model, engine_kind, device, precision, engine_dir=engine_dir, threads=threads)
    seeds = list(range(batch))
    labels = [i % config.num_classes for i in seeds] if config.conditional else None
    for _ in range(warmup_runs):
        engine.generate(seeds, labels)
    target = BenchTarget(
        model, engine, engine_kind, device, precision, batch, warmup_runs, threads, weights,
        time.perf_counter() - load_start, seeds, labels,
    )  # fmt: skip
    target.stage_times = {r: [] for r in config.resolutions}
    if engine.decoder is not None:  # a latent model's decode stage, timed like a stage at the image's size
        target.stage_times[engine.decoder.resolution] = []
    return target


def summarize(target: BenchTarget) -> dict[str, Any]:
    """One ``results`` entry of the JSON report."""
    config = target.model.config
    stages = []
    for stage in config.schedule.stages:
        times = target.stage_times[stage.resolution]
        mean = statistics.fmean(times)
        stages.append(
            {
                "resolution": stage.resolution,
                "nfe": stage.nfe,
                "latency_s_mean": mean,
                "latency_s_p50": percentile(times, 50),
                "step_latency_s": mean / stage.nfe,
            }
        )
    eff = effective_nfe(stages)
    for s in stages:
        s["step_latency_ratio"] = s["step_latency_s"] / stages[-1]["step_latency_s"]
    nfe = sum(s["nfe"] for s in stages)
    decoder = target.engine.decoder
    if decoder is not None:
        # The decode stage: one decoder call per batch, no denoiser evaluation (NFE 0), so it stays out
        # of the NFE and effective-NFE figures but is listed, and summed into the latency, like a stage.
        times = target.stage_times[decoder.resolution]
        mean = statistics.fmean(times)
        stages.append(
            {"resolution": decoder.resolution, "stage": "decode", "nfe": 0, "latency_s_mean": mean,
             "latency_s_p50": percentile(times, 50), "step_latency_s": mean}
        )  # fmt: skip
    latencies = target.latencies
    mean = statistics.fmean(latencies)
    return {
        "config": config.name,
        "engine": target.kind,
        "device": device_description(target.device),
        "batch": target.batch,
        "latency_s_mean": mean,
        "latency_s_p50": percentile(latencies, 50),
        "latency_s_p90": percentile(latencies, 90),
        "throughput_img_s": target.batch / mean,
        "stages": stages,
        "nfe": nfe,
        "effective_nfe": eff,
        "runs": len(latencies),
        "warmup_runs": target.warmup_runs,
        "latency_s_all": latencies,
        # CPU seconds this process used per batch (all its threads): on a shared machine wall time
        # includes waiting for the CPU, this does not, so it compares engines more steadily.
        "cpu_s_mean": statistics.fmean(target.cpu_times),
        "cpu_s_all": target.cpu_times,
        "load_average": load_average(),
        "precision": target.precision,
        "threads": target.threads or torch.get_num_threads(),
        "weights": target.weights,
        "checkpoint_sha256": target.model.metadata.get("checkpoint_sha256"),
        "load_and_warmup_s": target.load_s,
        "versions": {"torch": torch.__version__, **runtime_versions(target.kind)},
    }


def run_interleaved(targets: list[BenchTarget], runs: int, progress: Progress | None = None) -> list[dict[str, Any]]:
    """``runs`` rounds, each timing every target once in turn, so that all targets share the
    machine's conditions (a busy shared machine drifts over minutes); one result per target.
    ``progress`` counts timed batches."""
    for round_index in range(runs):
        for target in targets:
            target.measure()
            if progress is not None:
                progress.update(1, round=f"{round_index + 1}/{runs}")
    return [summarize(t) for t in targets]


def bench_model(
    model: Any,
    engine_kind: str,
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = 64,
    runs: int = 10,
    warmup_runs: int = 1,
    threads: int | None = None,
    engine_dir: str | Path | None = None,
    weights: str = "checkpoint",
) -> dict[str, Any]:
    """Time ``runs`` full batches of ``model`` on ``engine_kind``; returns one ``results`` entry."""
    target = prepare(model, engine_kind, device, precision, batch, warmup_runs, threads, engine_dir, weights)
    return run_interleaved([target], runs)[0]


def parse_engines(text: str, default_precision: str) -> list[tuple[str, str]]:
    """``torch,onnxruntime,torch:bf16`` → [(kind, precision), …]; unknown kinds are a :class:`SettingsError`."""
    specs = []
    for item in text.split(","):
        kind, _, precision = item.strip().partition(":")
        if kind not in ENGINE_KINDS:
            raise SettingsError(f"unknown engine {kind!r}; available: {', '.join(ENGINE_KINDS)}", "engine")
        specs.append((kind, precision or default_precision))
    if len(set(specs)) != len(specs):
        raise SettingsError(f"{text!r} names the same engine and precision twice", "engine")
    return specs
