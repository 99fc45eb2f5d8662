"""TensorRT stage runners: one deserialized engine and execution context per stage.

Written against the TensorRT 10 Python API documentation (whether it has run anywhere: README,
"Deployment"). Import-guarded: a machine without the
``tensorrt`` package or without a GPU gets :class:`lowdiff.errors.EngineUnavailable`, and an engine
folder built on another GPU architecture or TensorRT version is refused with a message to rebuild.

Per call, inputs are copied into preallocated device buffers sized for the profile's largest
batch and the context runs with ``execute_async_v3`` on a dedicated stream; nothing is allocated
on the GPU after loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowdiff.errors import ManifestError
from lowdiff.export.manifest import OUTPUT, check_model_matches, read_manifest, stage_file
from lowdiff.export.tensorrt_build import engine_file_name, gpu_compute_capability, import_tensorrt
from lowdiff.model import LowDiffModel
from lowdiff.sampler import FunctionStage, StageRunner

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


class EngineMismatch(ManifestError):
    """An engine built for another GPU architecture or TensorRT version: it must be rebuilt."""


def check_engine_target(
    manifest: dict[str, Any], capability: tuple[int, int], trt_version: str, engine_dir: Path
) -> None:
    """Raise :class:`EngineMismatch` unless the folder was built for this GPU and TensorRT version."""
    built = manifest.get("tensorrt", {})
    built_cc = tuple(built.get("compute_capability", ()))
    built_version = built.get("version")
    if built_cc != tuple(capability) or built_version != trt_version:
        raise EngineMismatch(
            f"{engine_dir}: engines were built for compute capability {built_cc} with TensorRT {built_version}, "
            f"but this machine has {tuple(capability)} with TensorRT {trt_version}; rebuild them here with "
            "`lowdiff export --format tensorrt`"
        )
    for stage in manifest["stages"]:
        expected = engine_file_name(stage["resolution"], capability, trt_version, manifest["precision"])
        if stage["file"] != expected:
            raise EngineMismatch(
                f"{engine_dir}: {stage['file']} is not named for this GPU/TensorRT ({expected}); rebuild"
            )


class TrtStage:
    """One stage function over a TensorRT execution context with static device buffers."""

    def __init__(self, engine: Any, stage: dict[str, Any], max_batch: int, device: torch.device):
        self.engine = engine  # the context needs its engine alive
        self.context = engine.create_execution_context()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.inputs = {
            i["name"]: torch.zeros([max_batch, *i["shape"][1:]], dtype=_DTYPES[i["dtype"]], device=device)
            for i in stage["inputs"]
        }
        out_shape = stage["outputs"][0]["shape"]
        self.output = torch.zeros([max_batch, *out_shape[1:]], dtype=torch.float32, device=device)
        self.max_batch = max_batch

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        values = {"x": x, "sigma": sigma, "class_labels": class_labels, "condition": condition}
        values["sigma_cond"] = sigma_cond
        batch = x.shape[0]
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the engine's optimization profile (max {self.max_batch})")
        with torch.cuda.stream(self.stream):
            for name, buffer in self.inputs.items():
                buffer[:batch].copy_(values[name], non_blocking=True)
                self.context.set_input_shape(name, tuple(buffer[:batch].shape))
                self.context.set_tensor_address(name, buffer.data_ptr())
            self.context.set_tensor_address(OUTPUT, self.output.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            out = self.output[:batch].cpu()
        return out


def tensorrt_runners(
    model: LowDiffModel, engine_dir: str | Path, device: str = "cuda", precision: str | None = None
) -> dict[int, StageRunner]:
    trt = import_tensorrt()
    capability = gpu_compute_capability()
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir, expected_format="tensorrt")
    if precision is not None and precision != manifest["precision"]:
        raise ManifestError(f"{engine_dir}: engines are {manifest['precision']}, not {precision}; rebuild or pick that")
    check_model_matches(manifest, model, engine_dir)
    check_engine_target(manifest, capability, trt.__version__, engine_dir)
    dev = torch.device(device)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    runners: dict[int, StageRunner] = {}
    for stage in manifest["stages"]:
        engine = runtime.deserialize_cuda_engine(stage_file(engine_dir, stage).read_bytes())
        if engine is None:
            raise EngineMismatch(f"{engine_dir / stage['file']}: TensorRT could not deserialize it; rebuild it here")
        runners[int(stage["resolution"])] = FunctionStage(TrtStage(engine, stage, int(manifest["batch"]["max"]), dev))
    return runners
