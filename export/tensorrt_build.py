"""TensorRT engines, one per stage, built from the stage's ONNX file with the TensorRT 10 Python API.

Written against NVIDIA's TensorRT 10 Python API documentation (whether it has run anywhere, and
why not: README, "Deployment"). It is import-guarded: without ``tensorrt`` (or without a GPU) it
raises :class:`lowdiff.errors.EngineUnavailable`; CI tests that error path and the file naming.

Design: fp16 by default (fp32 with ``precision="fp32"``); one optimization profile covering batch
1…64 (opt 64, the benchmark batch); engine files are named by GPU compute capability and
TensorRT version, ``stage{r}.sm{major}{minor}.trt{version}.{precision}.engine``, because a
serialized engine only loads on the GPU architecture and TensorRT version that built it.
The manifest records both; the runtime (engines/tensorrt_engine.py) refuses a mismatch with a
message that says to rebuild.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowdiff.errors import ConfigError, EngineUnavailable
from lowdiff.export.manifest import MANIFEST_FORMAT, write_manifest
from lowdiff.export.onnx_stages import MAX_BATCH, export_onnx
from lowdiff.hashing import file_sha256
from lowdiff.model import LowDiffModel
from lowdiff.progress import Progress

TRT_PRECISIONS = ("fp16", "fp32")


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise EngineUnavailable(
            "TensorRT: the 'tensorrt' Python package (TensorRT 10) is not installed on this machine; "
            "install it on a machine with an NVIDIA GPU (this path has not been run in our environment)"
        ) from None
    return tensorrt


def gpu_compute_capability() -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailable("TensorRT: no CUDA GPU on this machine (engines are built for and run on one)")
    return torch.cuda.get_device_capability()


def engine_file_name(resolution: int, capability: tuple[int, int], trt_version: str, precision: str) -> str:
    """``stage{r}.sm{cc}.trt{version}.{precision}.engine``: the pair an engine is valid for, in its name."""
    return f"stage{resolution}.sm{capability[0]}{capability[1]}.trt{trt_version}.{precision}.engine"


def build_stage_engine(
    trt: Any, onnx_path: Path, input_shapes: dict[str, list[Any]], precision: str, max_batch: int
) -> bytes:
    """Parse one stage's ONNX file and build a serialized engine with a batch 1…max_batch profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shape in input_shapes.items():
        rest = [int(d) for d in shape[1:]]
        profile.set_shape(name, [1, *rest], [max_batch, *rest], [max_batch, *rest])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized)


def export_tensorrt(
    model: LowDiffModel,
    out_dir: str | Path,
    *,
    precision: str = "fp16",
    max_batch: int = MAX_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export ONNX per stage into ``out_dir``, then build one TensorRT engine per stage beside it.

    ``progress`` counts 2 units per stage: its ONNX export, then its engine build.
    """
    if precision not in TRT_PRECISIONS:
        raise ConfigError(
            f"TensorRT engines are built as {' or '.join(TRT_PRECISIONS)}, not {precision!r}", "precision"
        )
    trt = import_tensorrt()
    capability = gpu_compute_capability()
    out = Path(out_dir)
    manifest = export_onnx(model, out, progress=progress)
    for stage in manifest["stages"]:
        shapes = {i["name"]: i["shape"] for i in stage["inputs"]}
        data = build_stage_engine(trt, out / stage["file"], shapes, precision, max_batch)
        name = engine_file_name(stage["resolution"], capability, trt.__version__, precision)
        (out / name).write_bytes(data)
        stage["onnx_file"], stage["onnx_sha256"] = stage["file"], stage["sha256"]
        stage["file"], stage["sha256"] = name, file_sha256(out / name)
        if progress is not None:
            progress.update(1, stage=f"{stage['resolution']}×{stage['resolution']} engine")
    manifest.update(
        {
            "format": MANIFEST_FORMAT,
            "engine_format": "tensorrt",
            "precision": precision,
            "batch": {"dynamic": True, "min": 1, "opt": max_batch, "max": max_batch},
            "tensorrt": {"version": trt.__version__, "compute_capability": list(capability)},
        }
    )
    manifest["exporter"]["versions"]["tensorrt"] = trt.__version__
    write_manifest(out, manifest)
    return manifest
