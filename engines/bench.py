"""``lowdiff bench``: the paper's Table 5 measurement (latency and throughput of one full batch).

For each model: build its engine once, run one warm-up batch (engine set-up, graph capture and
allocator growth are not timed), then ``--runs`` timed batches. Each run is one call of
:meth:`CascadeEngine.generate` for ``--batch`` images (seeds 0…B−1, classes cycling), timed end
to end; stage times come from :func:`lowdiff.sampler.run_cascade`'s ``on_stage`` callback.

Effective NFE (paper appendix B): a stage's *per-step latency* is its latency divided by its NFE
(one step = one denoiser evaluation here); each lower-resolution stage's NFE is scaled by the
ratio of its per-step latency to the target (last) stage's, the scaled NFEs are summed with the
target's NFE, and the sum is rounded up.

Several engines (``--engine torch,onnxruntime,torch:bf16``) are measured round-robin: each round
times every (model, engine) once, so on a shared, drifting machine they all see the same load.

Output: JSON ``{"results": [...], "ratio": ...}`` (``ratio`` = throughput of ``--config`` over
``--compare`` on the first engine listed, null without ``--compare``), a Markdown table and a PNG
plot beside it. Each result also carries the CPU seconds the process used per batch
(``cpu_s_mean``), steadier than wall time when other work shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def device_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return cpu_description()


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
    from engines import load_engine

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
        "nfe": sum(s["nfe"] for s in stages),
        "effective_nfe": eff,
        "runs": len(latencies),
        "warmup_runs": target.warmup_runs,
        "latency_s_all": latencies,
        # CPU seconds this process used per batch (all its threads): on a shared machine wall time
        # includes waiting for the CPU, this does not, so it compares engines more steadily.
        "cpu_s_mean": statistics.fmean(target.cpu_times),
        "cpu_s_all": target.cpu_times,
        "load_average": _load_average(),
        "precision": target.precision,
        "threads": target.threads or torch.get_num_threads(),
        "weights": target.weights,
        "checkpoint_sha256": target.model.metadata.get("checkpoint_sha256"),
        "load_and_warmup_s": target.load_s,
        "versions": {"torch": torch.__version__, **_runtime_versions(target.kind)},
    }


def run_interleaved(targets: list[BenchTarget], runs: int) -> list[dict[str, Any]]:
    """``runs`` rounds, each timing every target once in turn, so that all targets share the
    machine's conditions (a busy shared machine drifts over minutes); one result per target."""
    for _ in range(runs):
        for target in targets:
            target.measure()
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


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _runtime_versions(kind: str) -> dict[str, str]:
    if kind == "onnxruntime":
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}
    return {}


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| config | engine | device | batch | latency mean (s) | p50 (s) | p90 (s) | images/s | CPU s per batch | "
        "NFE per stage | stage latency (s) | effective NFE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        nfe = " / ".join(f"{s['resolution']}: {s['nfe']}" for s in r["stages"])
        lat = " / ".join(f"{s['resolution']}: {s['latency_s_mean']:.3f}" for s in r["stages"])
        lines.append(
            f"| {r['config']} | {r['engine']} {r['precision']} ({r['threads']} thr) | {r['device']} | {r['batch']} | "
            f"{r['latency_s_mean']:.3f} | {r['latency_s_p50']:.3f} | {r['latency_s_p90']:.3f} | "
            f"{r['throughput_img_s']:.2f} | {r['cpu_s_mean']:.3f} | {nfe} | {lat} | {r['effective_nfe']} |"
        )
    if report["ratio"] is not None:
        first = report["results"][0]
        other = next(r for r in report["results"] if r["config"] != first["config"])
        lines.append("")
        lines.append(
            f"Throughput ratio {first['config']} / {other['config']} ({first['engine']} {first['precision']}): "
            f"**{report['ratio']:.3f}**"
        )
    return "\n".join(lines) + "\n"


def headless_pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """A stacked bar per result (per-stage latency of one batch); False when matplotlib is missing."""
    plt = headless_pyplot()
    if plt is None:
        return False
    results = report["results"]
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.7 * len(results)))
    labels = [f"{r['config']}\n{r['engine']} {r['precision']}, {r['threads']} thr, batch {r['batch']}" for r in results]
    colors = {8: "#8ecae6", 16: "#219ebc", 32: "#023047", 64: "#fb8500"}
    for row, r in enumerate(results):
        left = 0.0
        for s in r["stages"]:
            ax.barh(
                row,
                s["latency_s_mean"],
                left=left,
                color=colors.get(s["resolution"], "#999999"),
                label=f"{s['resolution']}×{s['resolution']}",
            )
            left += s["latency_s_mean"]
        note = f"  {r['throughput_img_s']:.3g} img/s, {r['cpu_s_mean']:.3g} CPU s/batch"
        ax.text(left, row, note, va="center", fontsize=8)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), title="stage", fontsize=8, loc="lower right")
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per batch (mean of runs), split by stage")
    title = "LowDiff bench"
    if report["ratio"] is not None:
        title += f": throughput ratio {report['ratio']:.2f}×"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(r["latency_s_mean"] for r in results) * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_engines(text: str, default_precision: str) -> list[tuple[str, str]]:
    """``torch,onnxruntime,torch:bf16`` → [(kind, precision), …]; unknown kinds raise ValueError."""
    from engines import ENGINE_KINDS

    specs = []
    for item in text.split(","):
        kind, _, precision = item.strip().partition(":")
        if kind not in ENGINE_KINDS:
            raise ValueError(f"unknown engine {kind!r}; available: {', '.join(ENGINE_KINDS)}")
        specs.append((kind, precision or default_precision))
    if len(set(specs)) != len(specs):
        raise ValueError(f"{text!r} names the same engine and precision twice")
    return specs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark latency/throughput of full batches on an engine (the paper's Table 5)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--config", default=None, help="a built-in config, benchmarked with random weights")
    p.add_argument("--checkpoint", type=Path, default=None, help="benchmark a trained checkpoint instead")
    p.add_argument("--compare", default=None, help="a second built-in config (random weights), e.g. its EDM baseline")
    p.add_argument(
        "--engine",
        default="torch",
        help="torch, cudagraph, onnxruntime or tensorrt; KIND:PRECISION picks a precision; a comma list "
        "(e.g. torch,onnxruntime,torch:bf16) measures them round-robin, run by run, under the same conditions",
    )
    p.add_argument("--engine-dir", type=Path, default=None, help="exported folder (onnxruntime: optional; tensorrt)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision", default="fp32", help="default precision: fp32; bf16 (CPU autocast, CUDA); fp16 (CUDA)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup-runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--json", type=Path, required=True, help="write the JSON report here (+ .md and .png beside it)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from engines import EngineUnavailable
    from export.manifest import ManifestError
    from lowdiff.cli import CLIError, _load_model

    if args.config is None and args.checkpoint is None:
        raise CLIError("--config: give --config NAME (random weights) or --checkpoint P")
    try:
        engines = parse_engines(args.engine, args.precision)
    except ValueError as exc:
        raise CLIError(f"--engine: {exc}") from None
    for flag, value in (("--batch", args.batch), ("--runs", args.runs)):
        if value < 1:
            raise CLIError(f"{flag}: must be ≥ 1")
    if args.warmup_runs < 0:
        raise CLIError("--warmup-runs: must be ≥ 0")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError("--threads: must be ≥ 1")
        torch.set_num_threads(args.threads)

    models = []
    if args.checkpoint is not None:
        model = _load_model(args.checkpoint)
        if args.config is not None and args.config != model.config.name:
            raise CLIError(f"--config: {args.checkpoint} holds {model.config.name!r}, not {args.config!r}")
        models.append((model, f"checkpoint {args.checkpoint}"))
    else:
        models.append((_load_model(None, args.config), RANDOM_WEIGHTS_NOTE))
    if args.compare is not None:
        models.append((_load_model(None, args.compare), RANDOM_WEIGHTS_NOTE))
    if args.engine_dir is not None and len(models) > 1:
        raise CLIError("--engine-dir: holds one model's engines; without it each model is exported for the run")

    # Order: every engine of the first model, then of the second; results keep that order, so
    # results[0] and results[len(engines)] are the two models on the first engine.
    targets = []
    for model, weights in models:
        if weights == RANDOM_WEIGHTS_NOTE:
            print(f"{model.config.name}: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
        for kind, precision in engines:
            print(f"{model.config.name}: loading {kind} ({precision}) on {args.device}…", file=sys.stderr)
            try:
                targets.append(
                    prepare(
                        model,
                        kind,
                        args.device,
                        precision,
                        args.batch,
                        args.warmup_runs,
                        args.threads,
                        args.engine_dir,
                        weights,
                    )
                )
            except EngineUnavailable as exc:
                raise CLIError(f"--engine {kind}: {exc}") from None
            except ManifestError as exc:
                raise CLIError(f"--engine-dir: {exc}") from None
            except ValueError as exc:
                raise CLIError(f"--engine {kind}: {exc}") from None
    print(f"timing {len(targets)} target(s), batch {args.batch}, {args.runs} round(s)…", file=sys.stderr)
    results = run_interleaved(targets, args.runs)
    ratio = None
    if len(models) > 1:  # the paper's comparison: same engine (the first listed), same run
        ratio = results[0]["throughput_img_s"] / results[len(engines)]["throughput_img_s"]
    report = {"results": results, "ratio": ratio}

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    md_path = args.json.with_suffix(".md")
    md_path.write_text(table)
    png_path = args.json.with_suffix(".png")
    plotted = write_plot(report, png_path)
    print(table)
    print(args.json)
    print(md_path)
    print(png_path if plotted else "plot skipped: matplotlib is not installed (pip install matplotlib)")
