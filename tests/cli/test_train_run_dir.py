"""Training is never lost silently: an existing run is refused without --resume, a stop signal saves."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lowdiff.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), labels=np.repeat(np.arange(10), 4))
    return path


def _train_argv(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", "fashion32-2stage", "--data", str(data), "--run-dir", str(run_dir),
            "--holdout-per-class", "1", "--batch-size", "2", "--grid-every", "0", "--threads", "1", *extra]  # fmt: skip


def _step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["train_state"]["step"]


def test_a_run_dir_with_a_checkpoint_is_refused_without_resume(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(_train_argv(tiny_data, run, "--kimg", "0.004")) == 0
    assert _step(run) == 2
    capsys.readouterr()
    assert main(_train_argv(tiny_data, run, "--kimg", "0.002")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowdiff train: error: --run-dir: ") and "--resume" in err[0]
    assert _step(run) == 2  # untouched
    assert main(_train_argv(tiny_data, run, "--kimg", "0.008", "--resume")) == 0
    assert _step(run) == 4
    assert main(_train_argv(tiny_data, run, "--kimg", "0.002", "--overwrite")) == 0
    assert _step(run) == 1


def test_sigint_saves_the_checkpoint_and_says_where(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = _train_argv(tiny_data, run, "--kimg", "1000", "--checkpoint-every", "100000", "--checkpoint-minutes", "600")
    proc = subprocess.Popen([sys.executable, "-m", "lowdiff", *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.stderr is not None:  # wait until training has begun
            line = proc.stderr.readline()
            assert line, "training ended before it began"
            if line.startswith("training "):
                break
            assert time.monotonic() < deadline
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"checkpoint: {run / 'checkpoint.pt'}" in err
    assert "Traceback" not in err
    assert _step(run) > 0  # saved on the signal, not on a schedule (every 100,000 steps / 600 min)


def test_fewer_classes_than_the_config_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "three.npz"
    np.savez(data, images=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), labels=np.repeat(np.arange(3), 4))
    assert main(_train_argv(data, tmp_path / "run", "--kimg", "0.002")) == 0
    assert "has 3 classes, fashion32-2stage has 10" in capsys.readouterr().err


def test_the_recipe_is_the_configs_flags_override_and_resume_keeps_them(tiny_data: Path, tmp_path: Path) -> None:
    """Recipe flags default to the config's recipe; what a run used is in its checkpoint's config, and
    --resume continues with it (here batch 2 and clipping at 0.5, not fashion32-2stage's 64 and 1)."""
    run = tmp_path / "run"
    assert main(_train_argv(tiny_data, run, "--kimg", "0.002", "--grad-clip", "0.5")) == 0
    stored = torch.load(run / "checkpoint.pt", weights_only=True)["config"]["training"]
    assert (stored["batch_size"], stored["grad_clip"], stored["loss_weighting"]) == (2, 0.5, "equal")
    argv = ["train", "--config", "fashion32-2stage", "--data", str(tiny_data), "--run-dir", str(run), "--resume",
            "--holdout-per-class", "1", "--grid-every", "0", "--threads", "1", "--kimg", "0.004"]  # fmt: skip
    assert main(argv) == 0
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert payload["train_state"]["step"] == 2 and payload["train_state"]["nimg"] == 4
    assert payload["config"]["training"]["grad_clip"] == 0.5
