"""`torchrun --standalone --nproc_per_node 2 -m lowdiff train --config fashion32 …` on the CPU (gloo):
it trains, only rank 0 talks, its checkpoint exports (`export-ema`) and samples, and it resumes in one
process (the checkpoint holds global counts only, so any world size continues it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lowdiff.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _torchrun() -> list[str]:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_trains_fashion32_and_the_checkpoint_exports_samples_and_resumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), labels=np.repeat(np.arange(10), 4))
    run = tmp_path / "run"
    train = ["train", "--config", "fashion32", "--data", str(data), "--run-dir", str(run), "--holdout-per-class", "1",
             "--batch-size", "8", "--grid-every", "0", "--threads", "1", "--device", "cpu"]  # fmt: skip
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "lowdiff", *train, "--kimg", "0.016"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("training fashion32 on 30 images") == 1  # rank 0 only
    assert "2 processes on cpu" in proc.stderr and "done at step 2 (0.0 kimg)" in proc.stderr
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert payload["train_state"]["step"] == 2 and payload["train_state"]["nimg"] == 16
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())  # atomic writes leave no partial file

    assert main(["export-ema", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "ema.pt")]) == 0
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(tmp_path / "ema.pt"), "--class-label", "3", "--num-images", "1",
                 "--threads", "1", "--out-dir", str(out)]) == 0  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["class3_seed0.png"]

    # One process continues what two started: same global batch, global counts.
    assert main([*train, "--kimg", "0.024", "--resume"]) == 0
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert payload["train_state"]["step"] == 3 and payload["train_state"]["nimg"] == 24
