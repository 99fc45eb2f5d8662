"""TensorRT without the library, and the rule that an engine built for another GPU or version says rebuild."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lowdiff.engines.tensorrt_engine import EngineMismatch, check_engine_target, tensorrt_runners
from lowdiff.errors import EngineUnavailable
from lowdiff.export.tensorrt_build import engine_file_name
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_without_library_is_a_clear_error(tiny_config, tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="'tensorrt' Python package"):
        tensorrt_runners(LowDiffModel(tiny_config()), tmp_path, "cuda", "fp16")


def test_tensorrt_engine_for_another_gpu_or_version_says_rebuild(tmp_path: Path) -> None:
    name = engine_file_name(8, (8, 9), "10.3.0", "fp16")
    assert name == "stage8.sm89.trt10.3.0.fp16.engine"
    manifest = {
        "precision": "fp16",
        "tensorrt": {"version": "10.3.0", "compute_capability": [8, 9]},
        "stages": [{"resolution": 8, "file": name}],
    }
    check_engine_target(manifest, (8, 9), "10.3.0", tmp_path)  # its own GPU and version: accepted
    for capability, version in (((9, 0), "10.3.0"), ((8, 9), "10.4.0")):
        with pytest.raises(EngineMismatch, match="rebuild"):
            check_engine_target(manifest, capability, version, tmp_path)
