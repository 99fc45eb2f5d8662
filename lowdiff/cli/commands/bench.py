"""``lowdiff bench``: latency and throughput of full batches per engine, round-robin (the paper's Table 5).

Output: JSON ``{"results": [...], "ratio": ...}`` (``ratio`` = throughput of ``--config`` over
``--compare`` on the first engine listed, null without ``--compare``), a Markdown table and a PNG
plot beside it. The measurement itself is :mod:`lowdiff.bench.measure`.

Two other modes write to ``--json`` (+ ``.md``, and ``.png`` for the table) instead:

* ``--cost-table``: seconds per denoiser evaluation against batch size (``--batches``) for every
  resolution of every model (``--config`` may be a comma list; ``--compare`` adds one) and engine
  (:mod:`lowdiff.bench.costs`, which documents the method and the JSON schema);
* ``--profile``: ``torch.profiler`` over one evaluation at ``--resolution`` (default: the largest) and
  ``--batch`` per engine: top kernels/operators and the shares of GroupNorm, SiLU, attention, convolution
  and elementwise work (:mod:`lowdiff.bench.profiling`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowdiff.cli.args import HelpFormatter, add_quiet, nonnegative_int, positive_int, progress_stream
from lowdiff.engines import ENGINE_KINDS
from lowdiff.errors import LowDiffError, SettingsError
from lowdiff.progress import Progress

DEFAULT_BATCHES = "1,2,4,8,16,32,64,128,256,512"  # lowdiff.bench.costs.DEFAULT_BATCHES (not imported: torch)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark latency/throughput of full batches on an engine (the paper's Table 5)",
        formatter_class=HelpFormatter,
        description="Time --runs full batches of --batch images per (model, engine), every engine "
        "round-robin so that all see the same machine load; write JSON, Markdown and a PNG plot.",
    )
    p.add_argument("--config", default=None, help="a built-in config, benchmarked with random weights")
    p.add_argument("--checkpoint", type=Path, default=None, help="benchmark a trained checkpoint instead")
    p.add_argument(
        "--compare",
        default=None,
        help="a second built-in config (random weights), e.g. its EDM baseline, or a checkpoint file (.pt)",
    )
    p.add_argument(
        "--engine",
        default="torch",
        help=f"one of {', '.join(ENGINE_KINDS)}; KIND:PRECISION picks a precision; a comma list "
        "(e.g. torch,onnxruntime,torch:bf16) measures them round-robin, run by run, under the same conditions",
    )
    p.add_argument("--engine-dir", type=Path, default=None, help="exported folder (onnxruntime: optional; tensorrt)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", help="fp32; bf16 (CPU autocast, CUDA); fp16 (CUDA)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per batch")
    p.add_argument("--runs", type=positive_int, default=10, help="timed batches per target")
    p.add_argument(
        "--warmup-runs", type=nonnegative_int, default=1, help="untimed batches first (--cost-table: calls per point)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--json", type=Path, required=True, help="write the JSON report here (+ .md and .png beside it)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--cost-table",
        action="store_true",
        help="instead: seconds per denoiser evaluation vs batch size (--batches), per resolution, model and "
        "engine (median of --repeats after --warmup-runs); --config may be a comma list",
    )
    mode.add_argument(
        "--profile",
        action="store_true",
        help="instead: torch.profiler over one evaluation at --resolution and --batch per engine; top "
        "kernels/ops and the shares of GroupNorm, SiLU, attention, convolution, elementwise",
    )
    p.add_argument("--batches", default=DEFAULT_BATCHES, help="--cost-table: batch sizes")
    p.add_argument("--repeats", type=positive_int, default=5, help="--cost-table: timed calls per point (median)")
    p.add_argument("--resolution", type=positive_int, default=None, help="--profile: stage (default: the largest)")
    add_quiet(p)
    p.set_defaults(func=run)


def load_models(args: argparse.Namespace) -> list[tuple[Any, str]]:
    """(model, weights note) for --checkpoint or each --config, then --compare (a config or a .pt file)."""
    from lowdiff.bench.measure import RANDOM_WEIGHTS_NOTE
    from lowdiff.model import load_model

    models = []
    if args.checkpoint is not None:
        model = load_model(args.checkpoint)
        if args.config is not None and args.config != model.config.name:
            raise SettingsError(f"{args.checkpoint} holds {model.config.name!r}, not {args.config!r}", "config")
        models.append((model, f"checkpoint {args.checkpoint}"))
    else:
        names = args.config.split(",") if (args.cost_table or args.profile) else [args.config]
        models += [(load_model(config=name.strip()), RANDOM_WEIGHTS_NOTE) for name in names]
    if args.compare is not None:
        try:
            if args.compare.endswith(".pt") or Path(args.compare).is_file():
                models.append((load_model(Path(args.compare)), f"checkpoint {args.compare}"))
            else:
                models.append((load_model(config=args.compare), RANDOM_WEIGHTS_NOTE))
        except LowDiffError as exc:
            raise exc.for_field("compare") from None
    return models


def run(args: argparse.Namespace) -> None:
    import torch

    from lowdiff.bench.measure import RANDOM_WEIGHTS_NOTE, parse_engines, prepare, run_interleaved
    from lowdiff.bench.plots import write_plot
    from lowdiff.bench.report import markdown_table

    if args.config is None and args.checkpoint is None:
        raise SettingsError("give --config NAME (random weights) or --checkpoint P", "config")
    engines = parse_engines(args.engine, args.precision)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = load_models(args)
    if args.cost_table:
        return run_cost_table(args, models, engines)
    if args.profile:
        return run_profile(args, models, engines)
    if args.engine_dir is not None and len(models) > 1:
        raise SettingsError("holds one model's engines; without it each model is exported for the run", "engine_dir")

    # Order: every engine of the first model, then of the second; results keep that order, so
    # results[0] and results[len(engines)] are the two models on the first engine.
    log = progress_stream(args)
    targets = []
    for model, weights in models:
        if weights == RANDOM_WEIGHTS_NOTE:
            print(f"{model.config.name}: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
        for kind, precision in engines:
            if log is not None:
                print(f"{model.config.name}: loading {kind} ({precision}) on {args.device}…", file=log, flush=True)
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
    desc = f"timing {len(targets)} target(s) at batch {args.batch}"
    with Progress(len(targets) * args.runs, desc, "batch", stream=log) as progress:
        results = run_interleaved(targets, args.runs, progress)
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


def run_cost_table(args: argparse.Namespace, models: list[tuple[Any, str]], engines: list[tuple[str, str]]) -> None:
    from lowdiff.bench.costs import cost_table, parse_batches, write_cost_outputs

    try:
        batches = parse_batches(args.batches)
    except ValueError as exc:
        raise SettingsError(str(exc), "batches") from None

    entries = len(models) * len(engines)
    with Progress(entries, "cost table", "engine", stream=progress_stream(args)) as progress:

        def saved(table: dict[str, Any]) -> None:  # after every engine: a run stopped by a time limit keeps it
            write_cost_outputs(table, args.json)
            progress.update(1)

        table = cost_table(
            models, engines, args.device, batches, args.warmup_runs, args.repeats, args.engine_dir, args.threads,
            on_entry=saved, log=progress.note,
        )  # fmt: skip
    json_path, md_path, png_path = write_cost_outputs(table, args.json)
    print(md_path.read_text())
    print(json_path)
    print(md_path)
    print(png_path if png_path else "plot skipped: matplotlib is not installed, or nothing was measured")


def run_profile(args: argparse.Namespace, models: list[tuple[Any, str]], engines: list[tuple[str, str]]) -> None:
    from lowdiff.bench.costs import write_json_atomically
    from lowdiff.bench.profiling import SCHEMA, profile_engine, profile_markdown

    report: dict[str, Any] = {"schema": SCHEMA, "profiles": []}
    md_path = args.json.with_suffix(".md")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log = progress_stream(args)
    for model, _weights in models:
        for kind, precision in engines:
            if log is not None:
                print(f"{model.config.name}: profiling {kind} ({precision}) on {args.device}…", file=log, flush=True)
            entry = profile_engine(
                model, kind, args.device, precision, args.resolution, args.batch, max(1, args.warmup_runs),
                args.engine_dir, args.threads,
            )  # fmt: skip
            report["profiles"].append(entry)
            write_json_atomically(report, args.json)  # saved after every engine
            md_path.write_text(profile_markdown(report))
    print(md_path.read_text())
    print(args.json)
    print(md_path)
