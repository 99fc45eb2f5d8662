"""A missing runtime (CUDA, TensorRT) is one line from the CLI's error boundary, exit 2, no traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_cli_reports_a_missing_runtime_in_one_line(lowdiff_cli) -> None:
    kind = "cudagraph" if not torch.cuda.is_available() else None
    if kind is None:
        pytest.skip("this machine has a GPU")
    proc = lowdiff_cli(
        "bench", "--config", "fashion32", "--engine", "cudagraph", "--device", "cuda", "--json", "x.json"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lowdiff bench: error: --engine: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_export_tensorrt_without_library_is_a_clear_error(lowdiff_cli, tmp_path: Path) -> None:
    proc = lowdiff_cli("export", "--config", "fashion32", "--format", "tensorrt", "--out", str(tmp_path / "trt"))
    assert proc.returncode == 2
    assert "TensorRT" in proc.stderr and "Traceback" not in proc.stderr
