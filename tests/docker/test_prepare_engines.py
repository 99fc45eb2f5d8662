"""docker/prepare_engines.py (`lowdiff-prepare-engines` in the images): engine cache folders.

The ONNX path runs for real here (a tiny checkpoint); the TensorRT path only as far as its
refusal on a machine without TensorRT or a GPU, which is all this environment has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "prepare_engines.py"


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOWDIFF_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True, timeout=300
    )


def test_onnx_engines_are_built_once_into_a_folder_named_by_checkpoint(tiny_fast_model, tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny.pt"
    tiny_fast_model().save(checkpoint)
    env = {
        "LOWDIFF_ENGINE": "onnxruntime",
        "LOWDIFF_CHECKPOINT": str(checkpoint),
        "LOWDIFF_ENGINE_CACHE": str(tmp_path / "cache"),
    }
    first = run(env)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("onnx-model-")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(stage["resolution"] for stage in manifest["stages"]) == [8, 16, 32]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no scratch folder left behind

    again = run(env)
    assert again.returncode == 0 and "reusing" in again.stderr
    assert again.stdout.strip() == str(folder)


def test_engines_without_exports_and_tensorrt_refusal(tiny_fast_model, tmp_path: Path) -> None:
    torch_engine = run({"LOWDIFF_ENGINE": "torch", "LOWDIFF_ENGINE_CACHE": str(tmp_path)})
    assert torch_engine.returncode == 0 and "needs no exported engines" in torch_engine.stderr

    checkpoint = tmp_path / "tiny.pt"
    tiny_fast_model().save(checkpoint)
    cache = str(tmp_path)
    trt = run({"LOWDIFF_ENGINE": "tensorrt", "LOWDIFF_CHECKPOINT": str(checkpoint), "LOWDIFF_ENGINE_CACHE": cache})
    assert trt.returncode == 2
    assert "tensorrt" in trt.stderr.lower() and not any(p.name.startswith("tensorrt-") for p in tmp_path.iterdir())

    stray = run({"LOWDIFF_ENGINE": "torch"}, "--max-batch", "8")
    assert stray.returncode == 2 and "need --serve" in stray.stderr
