"""``lowdiff bench``: the paper's Table 5 measurement (latency and throughput of one full batch).

For each model: build its engine once, run one warm-up batch (engine set-up, graph capture and
allocator growth are not timed), then ``--runs`` timed batches. Each run is one call of
:meth:`CascadeEngine.generate` for ``--batch`` images (seeds 0…B−1, classes cycling), timed end
to end; stage times come from :func:`lowdiff.sampler.run_cascade`'s ``on_stage`` callback.

Effective NFE (paper appendix B): a stage's *per-step latency* is its latency divided by its NFE
(one step = one denoiser evaluation here); each lower-resolution stage's NFE is scaled by the
ratio of its per-step latency to the target (last) stage's, the scaled NFEs are summed with the
target's NFE, and the sum is rounded up.

Output: JSON ``{"results": [...], "ratio": ...}`` (``ratio`` = throughput of ``--config`` over
``--compare``, null without ``--compare``), a Markdown table and a PNG plot beside it.
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
    from engines import load_engine

    config = model.config
    load_start = time.perf_counter()
    engine = load_engine(model, engine_kind, device, precision, engine_dir=engine_dir, threads=threads)
    seeds = list(range(batch))
    labels = [i % config.num_classes for i in seeds] if config.conditional else None
    for _ in range(warmup_runs):
        engine.generate(seeds, labels)
    load_s = time.perf_counter() - load_start

    latencies: list[float] = []
    cpu_times: list[float] = []
    stage_times: dict[int, list[float]] = {r: [] for r in config.resolutions}
    for _ in range(runs):
        cpu_start = time.process_time()
        start = time.perf_counter()
        engine.generate(seeds, labels, on_stage=lambda r, s: stage_times[r].append(s))
        latencies.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    stages = []
    for stage in config.schedule.stages:
        times = stage_times[stage.resolution]
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
    mean = statistics.fmean(latencies)
    return {
        "config": config.name,
        "engine": engine_kind,
        "device": device_description(device),
        "batch": batch,
        "latency_s_mean": mean,
        "latency_s_p50": percentile(latencies, 50),
        "latency_s_p90": percentile(latencies, 90),
        "throughput_img_s": batch / mean,
        "stages": stages,
        "nfe": sum(s["nfe"] for s in stages),
        "effective_nfe": eff,
        "runs": runs,
        "warmup_runs": warmup_runs,
        "latency_s_all": latencies,
        # CPU seconds this process used per batch (all its threads): on a shared machine wall time
        # includes waiting for the CPU, this does not, so it compares engines more steadily.
        "cpu_s_mean": statistics.fmean(cpu_times),
        "cpu_s_all": cpu_times,
        "load_average": _load_average(),
        "precision": precision,
        "threads": threads or torch.get_num_threads(),
        "weights": weights,
        "checkpoint_sha256": model.metadata.get("checkpoint_sha256"),
        "load_and_warmup_s": load_s,
        "versions": {"torch": torch.__version__, **_runtime_versions(engine_kind)},
    }


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
        a, b = report["results"][0]["config"], report["results"][1]["config"]
        lines.append("")
        lines.append(f"Throughput ratio {a} / {b}: **{report['ratio']:.3f}**")
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """A stacked bar per result (per-stage latency of one batch); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
        ax.text(left, row, f"  {r['throughput_img_s']:.1f} img/s", va="center", fontsize=8)
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
    ax.set_xlim(0, max(r["latency_s_mean"] for r in results) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark latency/throughput of full batches on an engine (the paper's Table 5)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--config", default=None, help="a built-in config, benchmarked with random weights")
    p.add_argument("--checkpoint", type=Path, default=None, help="benchmark a trained checkpoint instead")
    p.add_argument("--compare", default=None, help="a second built-in config (random weights), e.g. its EDM baseline")
    p.add_argument("--engine", default="torch", help="torch, cudagraph, onnxruntime or tensorrt")
    p.add_argument("--engine-dir", type=Path, default=None, help="exported folder (onnxruntime: optional; tensorrt)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="fp32 (CPU); bf16/fp16 on CUDA")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup-runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--json", type=Path, required=True, help="write the JSON report here (+ .md and .png beside it)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from engines import ENGINE_KINDS, EngineUnavailable
    from export.manifest import ManifestError
    from lowdiff.cli import CLIError, _load_model

    if args.config is None and args.checkpoint is None:
        raise CLIError("--config: give --config NAME (random weights) or --checkpoint P")
    if args.engine not in ENGINE_KINDS:
        raise CLIError(f"--engine: unknown engine {args.engine!r}; available: {', '.join(ENGINE_KINDS)}")
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

    results = []
    for model, weights in models:
        if weights == RANDOM_WEIGHTS_NOTE:
            print(f"{model.config.name}: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
        print(
            f"{model.config.name}: {args.engine} on {args.device}, batch {args.batch}, {args.runs} runs…",
            file=sys.stderr,
        )
        try:
            result = bench_model(
                model,
                args.engine,
                args.device,
                args.precision,
                args.batch,
                args.runs,
                args.warmup_runs,
                args.threads,
                args.engine_dir,
                weights,
            )
        except EngineUnavailable as exc:
            raise CLIError(f"--engine {args.engine}: {exc}") from None
        except ManifestError as exc:
            raise CLIError(f"--engine-dir: {exc}") from None
        except ValueError as exc:
            raise CLIError(f"--engine {args.engine}: {exc}") from None
        results.append(result)
    ratio = results[0]["throughput_img_s"] / results[1]["throughput_img_s"] if len(results) > 1 else None
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
