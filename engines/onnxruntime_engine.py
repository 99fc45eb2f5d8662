"""ONNX Runtime stage runners: one InferenceSession per stage, built once from an exported folder.

Each session evaluates one stage's exported graph (export/onnx_stages.py); the shared Heun loop
(:func:`lowdiff.sampler.heun_stage`, via :class:`FunctionStage`) drives it with the model's own
schedule. CPU uses the CPU execution provider with all graph optimizations; on ``cuda`` the
TensorRT and CUDA providers are used when this onnxruntime build has them, and their absence is
an :class:`lowdiff.errors.EngineUnavailable`, not a silent fall-back to the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowdiff.errors import EngineUnavailable, SettingsError
from lowdiff.export.manifest import (
    DECODER_INPUT,
    DECODER_OUTPUT,
    OUTPUT,
    check_model_matches,
    decoder_entry,
    read_manifest,
    stage_file,
)
from lowdiff.model import LowDiffModel
from lowdiff.sampler import FunctionStage, StageRunner


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise EngineUnavailable(
            "'onnxruntime': the onnxruntime package is not installed (pip install onnxruntime)"
        ) from None
    return onnxruntime


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device``, best first; raises EngineUnavailable when none fits."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if not gpu:
            raise EngineUnavailable(
                f"'onnxruntime' on {device!r}: this onnxruntime build has no CUDA or TensorRT execution "
                f"provider (available: {', '.join(available)}); install onnxruntime-gpu"
            )
        return [*gpu, "CPUExecutionProvider"]
    raise SettingsError(f"expected 'cpu' or 'cuda', got {device!r}", "device")


class OrtStage:
    """One stage function over an InferenceSession: torch in, numpy through the session, torch out."""

    def __init__(self, session: Any, input_names: list[str]):
        self.session = session
        self.input_names = input_names

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
        feeds: dict[str, np.ndarray] = {}
        for name in self.input_names:
            value = values[name]
            if value is None:
                raise ValueError(f"stage input {name!r} is required by the exported graph")
            dtype = np.int64 if name == "class_labels" else np.float32
            feeds[name] = np.ascontiguousarray(value.detach().cpu().numpy(), dtype=dtype)
        (out,) = self.session.run([OUTPUT], feeds)
        return torch.from_numpy(out)


def session_options(threads: int | None) -> Any:
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads if threads else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: provider fall-back notes are not for users
    return options


def onnxruntime_runners(
    model: LowDiffModel,
    engine_dir: str | Path,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
) -> dict[int, StageRunner]:
    """Stage runners from an exported folder; refuses a folder exported from other weights."""
    if precision != "fp32":
        raise SettingsError("the ONNX engines are exported in fp32 (fp16 is TensorRT's)", "precision")
    ort = import_onnxruntime()
    manifest = read_manifest(engine_dir, expected_format="onnx")
    check_model_matches(manifest, model, engine_dir)
    providers = providers_for(device)
    options = session_options(threads)
    runners: dict[int, StageRunner] = {}
    for stage in manifest["stages"]:
        path = stage_file(engine_dir, stage)
        session = ort.InferenceSession(str(path), options, providers=providers)
        names = [i["name"] for i in stage["inputs"]]
        runners[int(stage["resolution"])] = FunctionStage(OrtStage(session, names), null_label=model.config.null_label)
    return runners


class OrtDecode:
    """The decode stage over an InferenceSession: float64 latents in, float64 images out (host)."""

    def __init__(self, session: Any, resolution: int):
        self.session = session
        self.resolution = resolution

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(latents.detach().cpu().numpy(), dtype=np.float32)
        (out,) = self.session.run([DECODER_OUTPUT], {DECODER_INPUT: feed})
        return torch.from_numpy(out).to(torch.float64)


def onnxruntime_decoder(
    model: LowDiffModel, engine_dir: str | Path, device: str = "cpu", threads: int | None = None
) -> OrtDecode | None:
    """A latent model's decode stage from the folder's ``decoder.onnx`` (verified like every stage
    file: inside the folder, sha256 as the manifest says, exported from this model's decoder)."""
    if model.decoder is None:
        return None
    ort = import_onnxruntime()
    manifest = read_manifest(engine_dir, expected_format="onnx")
    check_model_matches(manifest, model, engine_dir)
    entry = decoder_entry(manifest, engine_dir)
    assert entry is not None  # check_model_matches refuses a latent model's folder without one
    path = stage_file(engine_dir, entry)
    session = ort.InferenceSession(str(path), session_options(threads), providers=providers_for(device))
    return OrtDecode(session, model.config.image_resolution)
