"""``lowdiff export``: registered by lowdiff/cli.py, implemented here to keep the export code together."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export each cascade stage to ONNX (or TensorRT engines) with a manifest.json",
        description=(
            "One file per stage (only that stage's weights, preconditioning inside the graph, dynamic batch "
            "1…64) and DIR/manifest.json. Without --checkpoint/--config: the embedded default model."
        ),
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="a LowDiff checkpoint (default: the embedded model)")
    p.add_argument("--config", default=None, help="export a built-in config with random weights (for benchmarks)")
    p.add_argument("--format", choices=("onnx", "tensorrt"), required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch's ONNX exporter (dynamo needs onnxscript and is much slower)",
    )
    p.add_argument("--precision", choices=("fp16", "fp32"), default=None, help="TensorRT only (default fp16)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from engines import EngineUnavailable
    from export.manifest import MANIFEST_NAME
    from export.onnx_stages import DEFAULT_OPSET, export_onnx
    from lowdiff.cli import CLIError, _load_model

    if args.checkpoint is not None and args.config is not None:
        raise CLIError("--config: give either --checkpoint or --config, not both")
    if args.format == "onnx" and args.precision not in (None, "fp32"):
        raise CLIError("--precision: ONNX graphs are exported in fp32 (fp16 is for --format tensorrt)")
    if args.format == "tensorrt" and args.exporter != "torchscript":
        raise CLIError("--exporter: TensorRT engines are built from the default (torchscript) export")
    model = _load_model(args.checkpoint, args.config)
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out: {args.out} exists and is not a folder")
    try:
        if args.format == "onnx":
            manifest = export_onnx(model, args.out, opset=args.opset or DEFAULT_OPSET, exporter=args.exporter)
        else:
            from export.tensorrt_build import export_tensorrt

            manifest = export_tensorrt(model, args.out, precision=args.precision or "fp16")
    except EngineUnavailable as exc:
        raise CLIError(f"--format {args.format}: {exc}") from None
    except ImportError as exc:
        raise CLIError(f"--exporter {args.exporter}: {exc}") from None
    for stage in manifest["stages"]:
        r = stage["resolution"]
        print(f"{args.out / stage['file']}  ({r}×{r}, {stage['parameters']:,} params)")
    print(args.out / MANIFEST_NAME)
    if args.config is not None:
        print(f"note: {args.config} exported with random weights (--config); use --checkpoint for a trained model")
