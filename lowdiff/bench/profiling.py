"""Profile: where one denoiser evaluation spends its time, by kernel (CUDA) or operator (CPU).

:func:`profile_engine` loads an engine, warms it up, then runs ``torch.profiler`` over one evaluation at
one resolution (default: the config's largest) and batch (default 64) — the unit of
:mod:`lowdiff.bench.costs`: one call of the stage function, or, for engines that own the stage loop
(``cudagraph``; ``compile`` on CUDA), one whole stage replay whose times are divided by its NFE (the
shares are unaffected; the solver arithmetic between evaluations then shows up as elementwise work).

On CUDA the summary is over the **device** activity: every kernel, memcpy and memset, by its own (self)
GPU time; CPU-side launch calls are left out. On the CPU it is over the operators' **self** CPU time,
so nested operators (``aten::conv2d`` → ``aten::mkldnn_convolution``) are counted once. If a CUDA run
records no kernels (CUDA graph replays hide them from some CUPTI versions) the CPU side is summarised
instead and ``note`` says so.

Each entry is put in the first category whose pattern its name matches, in this order:
convolution (cuDNN/oneDNN/implicit-GEMM convolutions, their layout transforms), GroupNorm, SiLU,
attention (softmax, bmm/matmul/einsum/GEMM, scaled-dot-product/flash kernels; the embedding MLP's few
small GEMMs land here too), elementwise (add/mul/copy/cat/fill …, ATen's elementwise and reduction
kernels, inductor's pointwise kernels, and the resampling: pooling, upsampling), other (allocation,
views, …). A kernel that inductor fused (``triton_per_fused_native_group_norm_silu``) counts once, in its
first category (here GroupNorm); the name is kept in ``top`` for a closer look.

Output (``lowdiff bench --profile``): JSON ``{"schema": "lowdiff-profile/1", "profiles": [entry, …]}`` and
Markdown, where an entry is ``{"config", "engine", "precision", "device", "resolution", "batch", "method",
"evaluations", "activity": "cuda"|"cpu", "total_s_per_evaluation", "categories": {name: {"seconds",
"share"}}, "top": [{"name", "category", "seconds", "share", "calls"}], "note"}`` (seconds and calls per
evaluation), or ``{"config", "engine", "precision", "error"}``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lowdiff.bench.costs import error_text, stage_call
from lowdiff.bench.machine import device_description
from lowdiff.engines import load_engine

SCHEMA = "lowdiff-profile/1"
CATEGORY_NAMES = ("convolution", "groupnorm", "silu", "attention", "elementwise", "other")
# (category, pattern) rules, tried in order; the first that matches a name decides. Attention's own
# kernels come first (cuDNN's SDPA kernels have "cudnn" in their names); its GEMMs after convolution
# (whose implicit-GEMM kernels have "gemm" in theirs).
RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("attention", r"softmax|scaled_dot|sdpa|flash|fmha|attention"),
        ("convolution", r"conv(?!ert)|cudnn|fprop|dgrad|wgrad|implicit_?gemm|winograd|mkldnn|onednn|dnnl|nchwtonhwc|"
                        r"nhwctonchw|im2col"),
        ("groupnorm", r"group_?norm|rowwisemoments|computefusedparams"),
        ("silu", r"silu|swish"),
        ("attention", r"bmm|matmul|einsum|gemm|addmm|aten::mm\b|aten::linear|cutlass|cublas"),
        ("elementwise", r"elementwise|vectorized|unrolled|reduce_kernel|triton_poi|memcpy|memset|cpp_fused|copy|pool|"
                        r"upsample|interpolate|aten::(add|sub|mul|div|to|cat|fill_|zero_|clone|where|clamp|pow|sqrt|"
                        r"rsqrt|exp|log|neg|abs|cos|sin|mean|sum|index)"),
    )
)  # fmt: skip
OTHER = "other"


def category_of(name: str) -> str:
    for category, pattern in RULES:
        if pattern.search(name):
            return category
    return OTHER


@dataclass(frozen=True)
class OpTime:
    """One kernel or operator: its name, total self seconds over the profiled call, and its count."""

    name: str
    seconds: float
    calls: int


def summarize(ops: Iterable[OpTime], evaluations: int = 1, top: int = 15) -> dict[str, Any]:
    """Category shares and the ``top`` entries by self time, per evaluation (÷ ``evaluations``)."""
    ops = [o for o in ops if o.seconds > 0]
    total = sum(o.seconds for o in ops)
    categories = {name: 0.0 for name in CATEGORY_NAMES}
    for o in ops:
        categories[category_of(o.name)] += o.seconds
    ranked = sorted(ops, key=lambda o: o.seconds, reverse=True)[:top]

    def share(seconds: float) -> float:
        return seconds / total if total > 0 else 0.0

    return {
        "total_s_per_evaluation": total / evaluations,
        "categories": {k: {"seconds": v / evaluations, "share": share(v)} for k, v in categories.items()},
        "top": [
            {
                "name": o.name,
                "category": category_of(o.name),
                "seconds": o.seconds / evaluations,
                "share": share(o.seconds),
                "calls": o.calls / evaluations,
            }
            for o in ranked
        ],
    }


def op_times(prof: Any, device_activity: bool) -> list[OpTime]:
    """Self times from a finished ``torch.profiler.profile``: device kernels (``device_activity``) or CPU ops."""
    from torch.autograd import DeviceType

    out = []
    for evt in prof.key_averages():
        is_device = getattr(evt, "device_type", DeviceType.CPU) != DeviceType.CPU
        if is_device != device_activity:
            continue
        if device_activity:
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0.0)
        else:
            us = evt.self_cpu_time_total
        out.append(OpTime(str(evt.key), float(us) / 1e6, int(evt.count)))
    return out


def profile_engine(
    model: Any,
    kind: str,
    device: str = "cpu",
    precision: str = "fp32",
    resolution: int | None = None,
    batch: int = 64,
    warmup: int = 2,
    engine_dir: Any = None,
    threads: int | None = None,
    top: int = 15,
) -> dict[str, Any]:
    """One profile entry (module docstring); an engine that fails is an entry with ``error``."""
    resolution = resolution or max(model.config.resolutions)
    head = {"config": model.config.name, "engine": kind, "precision": precision}
    if resolution not in model.config.resolutions:
        return {**head, "error": f"{model.config.name} has no {resolution}×{resolution} stage"}
    cuda = device.startswith("cuda")
    try:
        start = time.perf_counter()
        engine = load_engine(model, kind, device, precision, engine_dir=engine_dir, threads=threads)
        load_s = time.perf_counter() - start
        unit = stage_call(engine, resolution, batch)
        with torch.no_grad():
            for _ in range(warmup):
                unit.call()
            if cuda:
                torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            wall = time.perf_counter()
            with torch.profiler.profile(activities=activities) as prof:
                unit.call()
                if cuda:
                    torch.cuda.synchronize()
            wall = time.perf_counter() - wall
    except Exception as exc:  # noqa: BLE001 -- an engine that cannot run is a finding
        return {**head, "error": error_text(exc)}
    note = None
    ops = op_times(prof, device_activity=cuda)
    activity = "cuda" if cuda else "cpu"
    if cuda and not any(o.seconds > 0 for o in ops):
        note = "no CUDA kernels were recorded (graph replays hidden from the profiler?): CPU-side operators instead"
        ops, activity = op_times(prof, device_activity=False), "cpu"
    return {
        **head,
        "device": device_description(device),
        "resolution": resolution,
        "batch": batch,
        "method": unit.method,
        "evaluations": unit.evaluations,
        "load_s": load_s,
        "profiled_wall_s_per_evaluation": wall / unit.evaluations,
        "activity": activity,
        **summarize(ops, unit.evaluations, top),
        "note": note,
    }


def profile_markdown(report: dict[str, Any]) -> str:
    """A shares table across the profiled engines, then each engine's top entries."""
    profiles = report["profiles"]
    ok = [p for p in profiles if "error" not in p]
    lines = ["# Profile of one denoiser evaluation", ""]
    if ok:
        p0 = ok[0]
        lines += [
            f"{p0['config']}, {p0['resolution']}×{p0['resolution']}, batch {p0['batch']}, {p0['device']}. "
            "Self time per evaluation; shares of the profiled activity's total.",
            "",
            "| engine | activity | ms per evaluation | " + " | ".join(CATEGORY_NAMES) + " |",
            "|---|---|---|" + "---|" * len(CATEGORY_NAMES),
        ]
        for p in ok:
            shares = " | ".join(f"{100 * p['categories'][c]['share']:.1f} %" for c in CATEGORY_NAMES)
            lines.append(
                f"| {p['engine']}:{p['precision']} ({p['method']}) | {p['activity']} | "
                f"{1000 * p['total_s_per_evaluation']:.3f} | {shares} |"
            )
        lines.append("")
    for p in profiles:
        lines += [f"## {p['config']} {p['engine']}:{p['precision']}", ""]
        if "error" in p:
            lines += [f"error: {p['error']}", ""]
            continue
        if p.get("note"):
            lines += [f"note: {p['note']}", ""]
        lines += ["| # | name | category | ms | share | calls |", "|---|---|---|---|---|---|"]
        for i, t in enumerate(p["top"], 1):
            name = t["name"] if len(t["name"]) <= 90 else t["name"][:87] + "…"
            name = name.replace("|", "\\|")
            lines.append(
                f"| {i} | `{name}` | {t['category']} | {1000 * t['seconds']:.3f} | {100 * t['share']:.1f} % | "
                f"{t['calls']:g} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
