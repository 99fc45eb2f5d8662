"""``lowdiff bench``: latency and throughput of full batches per engine, round-robin (the paper's Table 5).

Output: JSON ``{"results": [...], "ratio": ...}`` (``ratio`` = throughput of ``--config`` over
``--compare`` on the first engine listed, null without ``--compare``), a Markdown table and a PNG
plot beside it. The measurement itself is :mod:`lowdiff.bench.measure`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowdiff.cli.args import HelpFormatter, nonnegative_int, positive_int
from lowdiff.engines import ENGINE_KINDS
from lowdiff.errors import LowDiffError, SettingsError


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
    p.add_argument("--compare", default=None, help="a second built-in config (random weights), e.g. its EDM baseline")
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
    p.add_argument("--warmup-runs", type=nonnegative_int, default=1, help="untimed batches first")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--json", type=Path, required=True, help="write the JSON report here (+ .md and .png beside it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from lowdiff.bench.measure import RANDOM_WEIGHTS_NOTE, parse_engines, prepare, run_interleaved
    from lowdiff.bench.plots import write_plot
    from lowdiff.bench.report import markdown_table
    from lowdiff.model import load_model

    if args.config is None and args.checkpoint is None:
        raise SettingsError("give --config NAME (random weights) or --checkpoint P", "config")
    engines = parse_engines(args.engine, args.precision)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = []
    if args.checkpoint is not None:
        model = load_model(args.checkpoint)
        if args.config is not None and args.config != model.config.name:
            raise SettingsError(f"{args.checkpoint} holds {model.config.name!r}, not {args.config!r}", "config")
        models.append((model, f"checkpoint {args.checkpoint}"))
    else:
        models.append((load_model(config=args.config), RANDOM_WEIGHTS_NOTE))
    if args.compare is not None:
        try:
            models.append((load_model(config=args.compare), RANDOM_WEIGHTS_NOTE))
        except LowDiffError as exc:
            raise exc.for_field("compare") from None
    if args.engine_dir is not None and len(models) > 1:
        raise SettingsError("holds one model's engines; without it each model is exported for the run", "engine_dir")

    # Order: every engine of the first model, then of the second; results keep that order, so
    # results[0] and results[len(engines)] are the two models on the first engine.
    targets = []
    for model, weights in models:
        if weights == RANDOM_WEIGHTS_NOTE:
            print(f"{model.config.name}: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
        for kind, precision in engines:
            print(f"{model.config.name}: loading {kind} ({precision}) on {args.device}…", file=sys.stderr)
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
