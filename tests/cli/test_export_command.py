"""`lowdiff export` from a checkpoint, in a fresh interpreter: the ONNX files and the checkpoint's sha256."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]


def test_export_cli_from_checkpoint(tiny_model: LowDiffModel, tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny.pt"
    tiny_model.save(checkpoint)  # the perturbed tiny model (seed 0) that tests/export exports
    out = tmp_path / "engines"
    proc = subprocess.run(
        [sys.executable, "-m", "lowdiff", "export", "--checkpoint", str(checkpoint), "--format", "onnx",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.glob("*.onnx")) == ["stage16.onnx", "stage32.onnx", "stage8.onnx"]
