"""`lowdiff sample`: named PNGs holding exactly the model's images; bad arguments are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowdiff.cli import main
from lowdiff.model import LowDiffModel


def test_sample_writes_named_pngs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "sample",
            "--checkpoint",
            str(tiny_checkpoint),
            "--class-label",
            "3",
            "--seed",
            "41",
            "--num-images",
            "2",
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["class3_seed41.png", "class3_seed42.png"]
    with Image.open(out / files[0]) as img:
        assert img.size == (32, 32) and img.mode == "L"
    # The file holds exactly what the model generates for (class 3, seed 41).
    expected = LowDiffModel.load(tiny_checkpoint).generate([41], [3])[0, 0]
    with Image.open(out / files[0]) as img:
        assert torch.equal(torch.from_numpy(np.array(img)), expected)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--class-label", "10"], "--class-label"),
        (["--checkpoint", "/nonexistent.pt", "--class-label", "1"], "--checkpoint"),
        ([], "--class-label"),
    ],
)
def test_sample_errors_are_one_line_exit_2(tiny_checkpoint: Path, tmp_path: Path, capsys, args, needle) -> None:
    argv = ["sample", "--out-dir", str(tmp_path / "o")]
    if "--checkpoint" not in args:
        argv += ["--checkpoint", str(tiny_checkpoint)]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_negative_seed_is_rejected_by_the_parser(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowdiff",
            "sample",
            "--class-label",
            "1",
            "--seed",
            "-4",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--seed" in proc.stderr and "Traceback" not in proc.stderr
