#!/usr/bin/env python3
"""lowdiff-prepare-engines: build or reuse this machine's exported engines in a cache folder.

TensorRT engines only load on the GPU architecture and TensorRT version that built them, so they
are built where they run: at container start, or by an init container (Helm chart,
``engineCache.initContainer``) into a shared cache folder (an emptyDir or a persistent volume).

    lowdiff-prepare-engines                 # build if missing, print the engine folder
    lowdiff-prepare-engines --serve [ARGS]  # … then exec `lowdiff serve ARGS` with LOWDIFF_ENGINE_DIR set

Reads the same LOWDIFF_* variables as ``lowdiff serve``: LOWDIFF_ENGINE (``tensorrt`` or
``onnxruntime`` use exported engines; other engines need none and the folder step is skipped),
LOWDIFF_CHECKPOINT (default: the embedded model), LOWDIFF_PRECISION (TensorRT: fp16 or fp32), and
LOWDIFF_ENGINE_DIR (if set, used as given: nothing is built). LOWDIFF_ENGINE_CACHE is the cache
root (default /var/cache/lowdiff/engines).

Each build goes to its own sub-folder, named by everything an engine depends on: the format, for
TensorRT the GPU compute capability, TensorRT version and precision, and the checkpoint's SHA-256.
Pods on different GPU types can therefore share one volume. A build is written to a private
temporary folder and renamed into place, so concurrent pods never see half an export.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

DEFAULT_CACHE = "/var/cache/lowdiff/engines"
MANIFEST = "manifest.json"


def fail(message: str) -> None:
    print(f"lowdiff-prepare-engines: {message}", file=sys.stderr)
    raise SystemExit(2)


def checkpoint_path() -> Path:
    given = os.environ.get("LOWDIFF_CHECKPOINT")
    if given:
        return Path(given)
    from lowdiff.model import default_checkpoint_path

    return default_checkpoint_path()


def file_digest(path: Path) -> str:
    from lowdiff.hashing import file_sha256

    return file_sha256(path)[:16]


def tensorrt_target() -> str:
    """``sm{major}{minor}-trt{version}``: what a serialized TensorRT engine is valid for."""
    try:
        import tensorrt
    except ImportError:
        fail("LOWDIFF_ENGINE=tensorrt, but the 'tensorrt' Python package is not installed in this image")
    import torch

    if not torch.cuda.is_available():
        fail("LOWDIFF_ENGINE=tensorrt needs a CUDA GPU (is nvidia.com/gpu requested?)")
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}-trt{tensorrt.__version__}"


def engine_folder(engine: str, cache: Path) -> tuple[Path, list[str]] | None:
    """(folder, extra `lowdiff export` arguments) for this engine, or None when it needs no export."""
    if engine not in ("tensorrt", "onnxruntime"):
        return None
    if os.environ.get("LOWDIFF_CONFIG"):
        if engine == "tensorrt":
            fail("LOWDIFF_CONFIG serves random weights, which cannot be cached; give LOWDIFF_CHECKPOINT instead")
        return None  # onnxruntime then exports privately at start-up, as `lowdiff serve` does by itself
    checkpoint = checkpoint_path()
    if not checkpoint.is_file():
        fail(f"checkpoint not found: {checkpoint}")
    model = f"model-{file_digest(checkpoint)}"
    args = ["--checkpoint", str(checkpoint)] if os.environ.get("LOWDIFF_CHECKPOINT") else []
    if engine == "onnxruntime":
        return cache / f"onnx-{model}", ["--format", "onnx", *args]
    precision = os.environ.get("LOWDIFF_PRECISION") or "fp16"
    if precision not in ("fp16", "fp32"):
        fail(f"LOWDIFF_PRECISION={precision}: TensorRT engines are built in fp16 or fp32")
    return cache / f"tensorrt-{tensorrt_target()}-{precision}-{model}", [
        "--format",
        "tensorrt",
        "--precision",
        precision,
        *args,
    ]


def build(folder: Path, export_args: list[str], rebuild: bool) -> None:
    if (folder / MANIFEST).is_file() and not rebuild:
        print(f"lowdiff-prepare-engines: reusing {folder}", file=sys.stderr)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.parent / f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    command = [sys.executable, "-m", "lowdiff", "export", *export_args, "--out", str(scratch)]
    print(f"lowdiff-prepare-engines: building {folder.name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        fail(f"`lowdiff export` failed with status {result.returncode}")
    if rebuild and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(scratch, folder)
    except OSError:
        # Another pod finished the same build first: use its folder, drop ours.
        shutil.rmtree(scratch, ignore_errors=True)
        if not (folder / MANIFEST).is_file():
            raise
    print(f"lowdiff-prepare-engines: built {folder}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lowdiff-prepare-engines",
        description="Build (or reuse) exported engines for this GPU in LOWDIFF_ENGINE_CACHE; optionally exec "
        "`lowdiff serve` with LOWDIFF_ENGINE_DIR pointing at them. Other arguments go to `lowdiff serve`.",
    )
    parser.add_argument("--serve", action="store_true", help="exec `lowdiff serve` afterwards")
    parser.add_argument("--rebuild", action="store_true", help="build even if the folder already exists")
    args, serve_args = parser.parse_known_args(argv)
    if serve_args and not args.serve:
        parser.error(f"unrecognized arguments: {' '.join(serve_args)} (serve arguments need --serve)")

    engine = os.environ.get("LOWDIFF_ENGINE") or "torch"
    if os.environ.get("LOWDIFF_ENGINE_DIR"):
        print(f"lowdiff-prepare-engines: LOWDIFF_ENGINE_DIR is set; using {os.environ['LOWDIFF_ENGINE_DIR']}")
    else:
        target = engine_folder(engine, Path(os.environ.get("LOWDIFF_ENGINE_CACHE") or DEFAULT_CACHE))
        if target is None:
            print(f"lowdiff-prepare-engines: engine {engine!r} needs no exported engines", file=sys.stderr)
        else:
            folder, export_args = target
            build(folder, export_args, args.rebuild)
            os.environ["LOWDIFF_ENGINE_DIR"] = str(folder)
            print(folder, flush=True)
    if args.serve:
        sys.stdout.flush()
        os.execvp("lowdiff", ["lowdiff", "serve", *serve_args])


if __name__ == "__main__":
    main()
