"""``lowdiff export``: one ONNX graph (or TensorRT engine) per cascade stage, with a manifest."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from lowdiff.cli.args import HelpFormatter, add_quiet, positive_int, progress_stream
from lowdiff.errors import EngineUnavailable, LowDiffError, SettingsError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export each cascade stage to ONNX (or TensorRT engines) with a manifest.json",
        formatter_class=HelpFormatter,
        description=(
            "One file per stage (only that stage's weights, preconditioning inside the graph, dynamic batch "
            "1…64) and DIR/manifest.json with each file's sha256. Without --checkpoint/--config: the embedded "
            "default model."
        ),
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="a LowDiff checkpoint (default: the embedded model)")
    p.add_argument("--config", default=None, help="export a built-in config with random weights (for benchmarks)")
    p.add_argument("--format", choices=("onnx", "tensorrt"), required=True, help="what to write")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default 17)")
    p.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch's ONNX exporter (dynamo needs the onnx-dynamo extra, onnxscript, and is much slower)",
    )
    p.add_argument("--precision", choices=("fp16", "fp32"), default=None, help="TensorRT only (default fp16)")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lowdiff.export.manifest import MANIFEST_NAME
    from lowdiff.export.onnx_stages import DEFAULT_OPSET, export_onnx
    from lowdiff.model import load_model
    from lowdiff.progress import Progress

    if args.format == "onnx" and args.precision not in (None, "fp32"):
        raise SettingsError("ONNX graphs are exported in fp32 (fp16 is for --format tensorrt)", "precision")
    if args.format == "tensorrt" and args.exporter != "torchscript":
        raise SettingsError("TensorRT engines are built from the default (torchscript) export", "exporter")
    if args.exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise SettingsError(
                "the dynamo exporter needs onnxscript: pip install 'lowdiff-serve[onnx-dynamo]'", "exporter"
            ) from None
    model = load_model(args.checkpoint, args.config)
    if args.out.exists() and not args.out.is_dir():
        raise SettingsError(f"{args.out} exists and is not a folder", "out")
    created = not args.out.exists()
    stages = len(model.config.schedule.stages)
    if model.config.latent and args.format != "onnx":
        raise SettingsError("a latent model exports to ONNX only (TensorRT has no flow or decode stage yet)", "format")
    units = stages + (1 if model.decoder is not None else 0) if args.format == "onnx" else 2 * stages
    try:
        with Progress(units, f"exporting {args.format}", "step", stream=progress_stream(args)) as progress:
            if args.format == "onnx":
                opset = args.opset or DEFAULT_OPSET
                manifest = export_onnx(model, args.out, opset=opset, exporter=args.exporter, progress=progress)
            else:
                from lowdiff.export.tensorrt_build import export_tensorrt

                manifest = export_tensorrt(model, args.out, precision=args.precision or "fp16", progress=progress)
    except LowDiffError as exc:
        if created:
            shutil.rmtree(args.out, ignore_errors=True)  # leave no half-written folder behind
        raise exc.for_field("format") if isinstance(exc, EngineUnavailable) else exc from None
    for stage in manifest["stages"]:
        r = stage["resolution"]
        print(f"{args.out / stage['file']}  ({r}×{r}, {stage['parameters']:,} params)")
    if "decoder" in manifest:
        decoder = manifest["decoder"]
        r = decoder["resolution"]
        print(f"{args.out / decoder['file']}  (decode → {r}×{r}, {decoder['parameters']:,} params)")
    print(args.out / MANIFEST_NAME)
    if args.config is not None:
        print(f"note: {args.config} exported with random weights (--config); use --checkpoint for a trained model")
