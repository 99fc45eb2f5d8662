"""Cost table: seconds per denoiser evaluation against batch size, per resolution, engine and precision.

What a batch scheduler (or a simulator of one) needs to decide how many images to put in a batch
and which stage to run next: the cost of one denoiser evaluation of ``batch`` images at resolution
``r`` on an engine. ``lowdiff bench --cost-table`` writes it (JSON + Markdown + a log-log PNG).

**Method.** Per (config, engine, precision): load the engine once (as :func:`lowdiff.engines.load_engine`
serves it; load time recorded), then for every resolution of the config and every batch size:
``warmup`` untimed calls, then ``repeats`` timed calls; the point's value is their median.
The inputs are random (x ~ N(0, σ²) at the stage's middle σ, classes cycling, a random condition image
for the conditioned stages); values do not change the time of any engine here.

* Engines whose stage runner is a :class:`~lowdiff.sampler.FunctionStage` (torch, compile on the CPU,
  onnxruntime, tensorrt) are timed **one evaluation** at a time: one call of the stage function, with
  its inputs already where the engine keeps them (on the GPU for torch on CUDA, on the host for the
  runtimes that take host tensors, whose copies are then part of the cost).
  Method ``"evaluation"``.
* Engines that own the whole stage loop (``cudagraph``, and ``compile`` on CUDA, which captures the
  compiled denoiser into the same graphs) cannot run one evaluation alone: each point times **one
  whole stage** (:meth:`run_stage`: copy the inputs in, replay the stage's graph, copy the result out)
  and divides by the stage's NFE. The per-stage copies and the float64 solver arithmetic between
  evaluations are therefore spread over the evaluations. A batch larger than the engine's largest
  bucket (``max_batch_per_call``, 64 by default) is split into pieces of that size, as when serving,
  and a batch between buckets is padded to the next bucket. Method ``"stage/nfe"``.

Timing: on CUDA with ``torch.cuda.Event`` pairs around each call on the current stream, after a
``torch.cuda.synchronize()`` (a call ends when its last kernel has run, or when it returned to the host
for runtimes that copy back); on the CPU with ``time.perf_counter``. Points are measured one engine after
another (not round-robin as ``lowdiff bench`` does): they are medians, and a GPU is not shared.

**Schema** (``"schema": "lowdiff-cost-table/1"``)::

    {
      "schema": "lowdiff-cost-table/1",
      "method": "<the method above, in one paragraph>",
      "created": "2026-…Z", "machine": {"device": …, "torch": …, "cuda": …, "load_average": […]},
      "batches": [1, 2, 4, …], "warmup": 2, "repeats": 5,
      "configs": {
        "<config name>": {
          "weights": "random weights …" | "checkpoint <path>",
          "resolutions": [8, 16, 32],
          "nfe": {"8": 18, "16": 13, "32": 17},          # evaluations per stage (for stage costs)
          "engines": {
            "<kind>:<precision>": {                      # e.g. "cudagraph:bf16", always with the precision
              "engine": "cudagraph", "precision": "bf16", "device": "NVIDIA H100 … (CUDA 13.0)",
              "method": "evaluation" | "stage/nfe",
              "load_s": 12.3,                            # engine load, warm-up, graph capture, compiling
              "max_batch_per_call": 64 | null,           # larger batches are split (stage/nfe engines)
              "resolutions": {
                "32": [{"batch": 1, "seconds": 0.0031, "seconds_all": [0.0031, …]}, …]
              },
              "error": null | "<why this engine has no (or fewer) points>"
            }
          }
        }
      }
    }

JSON object keys are strings, so resolutions are ``"32"``; a point that failed (e.g. out of memory)
is ``{"batch": B, "error": "…"}`` and the resolution's larger batches are not tried.
:func:`read_cost_table` checks a file against this schema and :func:`seconds_per_evaluation`
looks a cost up (log-log interpolation between measured batch sizes).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowdiff.bench.machine import device_description, load_average
from lowdiff.engines import load_engine
from lowdiff.errors import LowDiffError
from lowdiff.sampler import FunctionStage

SCHEMA = "lowdiff-cost-table/1"
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
METHOD = (
    "median of `repeats` timed calls after `warmup` untimed ones, per (resolution, batch); "
    "method 'evaluation': one call of the engine's stage function (one denoiser evaluation); "
    "method 'stage/nfe': one whole stage (inputs in, graph replay, result out) divided by the stage's NFE, "
    "for engines that own the stage loop (cudagraph; compile on CUDA), whose batches above max_batch_per_call "
    "are split; CUDA timed with torch.cuda.Event after synchronize, CPU with perf_counter"
)


def engine_key(kind: str, precision: str) -> str:
    return f"{kind}:{precision}"


def parse_batches(text: str) -> list[int]:
    """``"1,2,4"`` → [1, 2, 4] (sorted, unique, each ≥ 1); a bad list is a :class:`ValueError`."""
    try:
        batches = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"expected a comma list of integers, got {text!r}") from None
    if not batches or batches[0] < 1:
        raise ValueError(f"expected batch sizes ≥ 1, got {text!r}")
    return batches


# ---------------------------------------------------------------------------- one call of one stage
@dataclass
class StageCall:
    """One timed unit of a stage runner: ``call()`` runs ``evaluations`` denoiser evaluations."""

    call: Callable[[], Any]
    evaluations: int
    method: str  # "evaluation" | "stage/nfe"


def stage_call(engine: Any, resolution: int, batch: int, seed: int = 0) -> StageCall:
    """The timed unit for ``resolution`` at ``batch`` on a loaded :class:`~lowdiff.engines.CascadeEngine`,
    with random inputs prepared once (the same for every call)."""
    config = engine.model.config
    stages = list(config.schedule.stages)
    index = next(k for k, s in enumerate(stages) if s.resolution == resolution)
    stage = stages[index]
    runner = engine.runners[resolution]
    channels = config.network.img_channels
    gen = torch.Generator().manual_seed(seed)
    sigmas = stage.times() if config.schedule.flow else stage.sigmas()  # a flow stage's levels are times t
    sigma = float(sigmas[len(sigmas) // 2]) or 1.0
    noise = torch.randn(batch, channels, resolution, resolution, generator=gen, dtype=torch.float64)
    labels = torch.arange(batch) % config.num_classes if config.conditional else None
    conditioned = index > 0  # as the engines build their stages: every stage after the first
    condition = torch.randn(batch, channels, resolution, resolution, generator=gen) if conditioned else None
    sigma_cond = 0.5 if conditioned else None

    if isinstance(runner, FunctionStage):
        device = runner.device  # None: the runtime takes host tensors

        def on(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or device is None else t.to(device)

        x = noise.float() * sigma
        s = torch.full((batch,), sigma, dtype=torch.float32)
        sc = None if sigma_cond is None else torch.full((batch,), sigma_cond, dtype=torch.float32)
        args = tuple(on(t) for t in (x, s, labels, condition, sc))
        fn = runner.fn
        return StageCall(lambda: fn(*args), 1, "evaluation")
    return StageCall(lambda: runner.run_stage(stage, noise, labels, condition, sigma_cond), stage.nfe, "stage/nfe")


def time_calls(call: Callable[[], Any], cuda: bool, warmup: int, repeats: int) -> list[float]:
    """``warmup`` untimed calls, then the seconds of ``repeats`` timed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
            else:
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
    return times


def max_batch_per_call(engine: Any) -> int | None:
    sizes = [r.buckets[-1] for r in engine.runners.values() if getattr(r, "buckets", None)]
    return max(sizes) if sizes else None


def error_text(exc: BaseException) -> str:
    if isinstance(exc, LowDiffError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def measure_engine(
    model: Any,
    kind: str,
    device: str = "cpu",
    precision: str = "fp32",
    batches: Sequence[int] = DEFAULT_BATCHES,
    warmup: int = 2,
    repeats: int = 5,
    engine_dir: str | Path | None = None,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One ``engines`` entry of the table (see the module docstring); failures are recorded, not raised."""
    entry: dict[str, Any] = {
        "engine": kind,
        "precision": precision,
        "device": device_description(device),
        "method": None,
        "load_s": None,
        "max_batch_per_call": None,
        "resolutions": {},
        "error": None,
    }
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    try:
        engine = load_engine(model, kind, device, precision, engine_dir=engine_dir, threads=threads)
    except Exception as exc:  # noqa: BLE001 -- an engine this machine cannot load is a finding, not a crash
        entry["error"] = error_text(exc)
        return entry
    entry["load_s"] = time.perf_counter() - start
    entry["max_batch_per_call"] = max_batch_per_call(engine)
    failures = []
    for resolution in model.config.resolutions:
        points: list[dict[str, Any]] = []
        entry["resolutions"][str(resolution)] = points
        for batch in batches:
            try:
                unit = stage_call(engine, resolution, batch)
                entry["method"] = unit.method
                times = [t / unit.evaluations for t in time_calls(unit.call, cuda, warmup, repeats)]
            except Exception as exc:  # noqa: BLE001 -- e.g. out of memory: keep the smaller batches
                points.append({"batch": batch, "error": error_text(exc)})
                failures.append(f"{resolution}×{resolution} batch {batch}: {error_text(exc)}")
                if log is not None:
                    log(traceback.format_exc())
                if cuda:
                    torch.cuda.empty_cache()
                break
            points.append({"batch": batch, "seconds": statistics.median(times), "seconds_all": times})
            if log is not None:
                log(f"{model.config.name} {engine_key(kind, precision)} {resolution}×{resolution} batch {batch}: "
                    f"{1000 * statistics.median(times):.3f} ms per evaluation")  # fmt: skip
    if failures:
        entry["error"] = "; ".join(failures)
    del engine
    if cuda:
        torch.cuda.empty_cache()
    return entry


# ---------------------------------------------------------------------------- the table
def new_table(batches: Sequence[int], warmup: int, repeats: int, device: str) -> dict[str, Any]:
    machine: dict[str, Any] = {"device": device_description(device), "torch": torch.__version__}
    machine["cuda"] = torch.version.cuda
    machine["load_average"] = load_average()
    return {
        "schema": SCHEMA,
        "method": METHOD,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "batches": list(batches),
        "warmup": warmup,
        "repeats": repeats,
        "configs": {},
    }


def config_entry(model: Any, weights: str) -> dict[str, Any]:
    config = model.config
    return {
        "weights": weights,
        "resolutions": list(config.resolutions),
        "nfe": {str(s.resolution): s.nfe for s in config.schedule.stages},
        "engines": {},
    }


def cost_table(
    models: Sequence[tuple[Any, str]],
    engines: Sequence[tuple[str, str]],
    device: str = "cpu",
    batches: Sequence[int] = DEFAULT_BATCHES,
    warmup: int = 2,
    repeats: int = 5,
    engine_dir: str | Path | None = None,
    threads: int | None = None,
    on_entry: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The table for every (model, weights note) × (kind, precision); ``on_entry(table)`` after each
    engine, so a caller can save what is done before a long or failing engine runs."""
    table = new_table(batches, warmup, repeats, device)
    for model, weights in models:
        entry = table["configs"].setdefault(model.config.name, config_entry(model, weights))
        for kind, precision in engines:
            if log is not None:
                log(f"{model.config.name}: {engine_key(kind, precision)} on {device}…")
            entry["engines"][engine_key(kind, precision)] = measure_engine(
                model, kind, device, precision, batches, warmup, repeats, engine_dir, threads, log
            )
            if on_entry is not None:
                on_entry(table)
    return table


def merge_cost_tables(tables: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One table from several (e.g. one run per engine group): configs and engines united, later wins;
    ``batches`` is the union; the first table's header otherwise."""
    if not tables:
        raise ValueError("nothing to merge")
    merged = json.loads(json.dumps(tables[0]))
    for table in tables[1:]:
        merged["batches"] = sorted(set(merged["batches"]) | set(table["batches"]))
        for name, config in table["configs"].items():
            target = merged["configs"].setdefault(name, {**config, "engines": {}})
            target["engines"].update(config["engines"])
    return merged


def check_cost_table(data: Any) -> dict[str, Any]:
    """``data`` if it follows the schema (module docstring), else a :class:`ValueError` saying where not."""

    def need(cond: bool, where: str) -> None:
        if not cond:
            raise ValueError(f"not a {SCHEMA} table: {where}")

    need(isinstance(data, dict) and data.get("schema") == SCHEMA, "schema")
    need(isinstance(data.get("configs"), dict), "configs")
    for name, config in data["configs"].items():
        need(isinstance(config.get("engines"), dict), f"configs.{name}.engines")
        need(isinstance(config.get("nfe"), dict), f"configs.{name}.nfe")
        for key, entry in config["engines"].items():
            where = f"configs.{name}.engines.{key}"
            need(key == engine_key(entry.get("engine"), entry.get("precision")), f"{where}: key ≠ engine:precision")
            need(entry.get("method") in ("evaluation", "stage/nfe", None), f"{where}.method")
            need(isinstance(entry.get("resolutions"), dict), f"{where}.resolutions")
            for res, points in entry["resolutions"].items():
                need(res.isdigit() and isinstance(points, list), f"{where}.resolutions.{res}")
                for p in points:
                    ok = isinstance(p.get("batch"), int) and (
                        "error" in p or (isinstance(p.get("seconds"), float | int) and p["seconds"] > 0)
                    )
                    need(ok, f"{where}.resolutions.{res}: point {p}")
    return data


def read_cost_table(path: str | Path) -> dict[str, Any]:
    return check_cost_table(json.loads(Path(path).read_text()))


def seconds_per_evaluation(table: dict[str, Any], config: str, engine: str, resolution: int, batch: int) -> float:
    """The cost of one evaluation of ``batch`` images at ``resolution``: a measured point, else log-log
    interpolation between the neighbouring batch sizes; below the smallest, the smallest's cost; above the
    largest, proportional to batch (``engine`` is ``kind:precision``). KeyError when nothing was measured."""
    points = sorted(
        (p["batch"], p["seconds"])
        for p in table["configs"][config]["engines"][engine]["resolutions"][str(resolution)]
        if "seconds" in p
    )
    if not points:
        raise KeyError(f"{config} {engine} {resolution}: no measured point")
    exact = dict(points)
    if batch in exact:
        return exact[batch]
    for (b0, t0), (b1, t1) in itertools.pairwise(points):
        if b0 < batch < b1:
            w = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    if batch <= points[0][0]:
        return points[0][1]
    b_max, t_max = points[-1]
    return t_max * batch / b_max


# ---------------------------------------------------------------------------- outputs
def cost_markdown(table: dict[str, Any]) -> str:
    """Per config and engine: milliseconds per evaluation, one row per resolution, one column per batch."""
    lines = [
        "# Cost table: milliseconds per denoiser evaluation",
        "",
        f"{table['machine']['device']}; torch {table['machine']['torch']}; median of {table['repeats']} "
        f"after {table['warmup']} warm-up call(s). Method: {table['method']}.",
        "",
    ]
    batches = table["batches"]
    for name, config in table["configs"].items():
        lines += [f"## {name} ({config['weights']})", ""]
        for key, entry in config["engines"].items():
            head = f"### {key} — method {entry['method'] or '–'}"
            if entry.get("load_s") is not None:
                head += f", load {entry['load_s']:.1f} s"
            if entry.get("max_batch_per_call"):
                head += f", batches above {entry['max_batch_per_call']} split"
            lines += [head, ""]
            if entry.get("error"):
                lines += [f"error: {entry['error']}", ""]
            if not any(entry["resolutions"].values()):
                continue
            lines.append("| resolution (NFE) | " + " | ".join(f"b={b}" for b in batches) + " |")
            lines.append("|---|" + "---|" * len(batches))
            for res, points in entry["resolutions"].items():
                by_batch = {p["batch"]: p for p in points}
                cells = []
                for b in batches:
                    p = by_batch.get(b)
                    cells.append("–" if p is None else ("error" if "error" in p else f"{1000 * p['seconds']:.3g}"))
                lines.append(f"| {res}×{res} ({config['nfe'].get(res, '?')}) | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def write_cost_plot(table: dict[str, Any], path: str | Path) -> bool:
    """Log-log seconds per evaluation vs batch, one panel per (config, engine), one line per resolution;
    False when matplotlib is missing or nothing was measured."""
    from lowdiff.bench.plots import headless_pyplot

    panels = [
        (name, key, entry)
        for name, config in table["configs"].items()
        for key, entry in config["engines"].items()
        if any("seconds" in p for points in entry["resolutions"].values() for p in points)
    ]
    plt = headless_pyplot()
    if plt is None or not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, key, entry) in zip(axes.flat, panels):
        for res, points in entry["resolutions"].items():
            measured = [(p["batch"], p["seconds"]) for p in points if "seconds" in p]
            if measured:
                xs, ys = zip(*measured)
                ax.plot(xs, [1000 * y for y in ys], marker="o", markersize=3, label=f"{res}×{res}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(table["batches"], [str(b) for b in table["batches"]])
        ax.set_title(f"{name}\n{key} ({entry['method']})", fontsize=9)
        ax.set_xlabel("batch size", fontsize=8)
        ax.set_ylabel("ms per evaluation", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title="resolution", title_fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Cost per denoiser evaluation — {table['machine']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_json_atomically(data: Any, path: Path) -> None:
    """Write then rename: a process stopped at its time limit never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def write_cost_outputs(table: dict[str, Any], json_path: str | Path) -> tuple[Path, Path, Path | None]:
    """JSON at ``json_path``, Markdown and PNG beside it (PNG None when it could not be drawn)."""
    json_path = Path(json_path)
    write_json_atomically(table, json_path)
    md = json_path.with_suffix(".md")
    md.write_text(cost_markdown(table))
    png = json_path.with_suffix(".png")
    return json_path, md, png if write_cost_plot(table, png) else None
