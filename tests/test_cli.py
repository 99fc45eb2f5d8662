from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowdiff.cli import main
from lowdiff.model import LowDiffModel

from .conftest import tiny_config


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    LowDiffModel(tiny_config()).save(path)
    return path


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


def test_unknown_config_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["train", "--config", "nope", "--data", str(tmp_path / "x.npz"), "--run-dir", str(tmp_path)])
    assert code == 2 and "--config" in capsys.readouterr().err


def test_missing_data_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["train", "--config", "fashion32", "--data", str(tmp_path / "x.npz"), "--run-dir", str(tmp_path)])
    assert code == 2 and "--data" in capsys.readouterr().err


def test_models_json(capsys) -> None:
    assert main(["models", "--json", "fashion32", "cifar10-cond"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["cifar10-cond"]["params"] == 55_775_241
    stages = table["cifar10-cond"]["stages"]
    assert [s["resolution"] for s in stages] == [8, 16, 32] and [s["nfe"] for s in stages] == [18, 13, 17]
    assert all(s["gflops_per_image"] > 0 for s in stages)


@pytest.fixture
def tiny_reference(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "ref.npz"
    np.savez(path, images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), labels=np.repeat(np.arange(10), 4))
    return path


def _eval_argv(checkpoint: Path, reference: Path, tmp_path: Path) -> list[str]:
    return [
        "eval", "--checkpoint", str(checkpoint), "--reference", str(reference), "--holdout-per-class", "2",
        "--num-samples", "4", "--json", str(tmp_path / "eval.json"), "--inception-fid",
    ]  # fmt: skip


def test_eval_inception_fid_without_torch_fidelity_is_a_clear_error(
    tiny_checkpoint: Path, tiny_reference: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import fail, installed or not
    assert main(_eval_argv(tiny_checkpoint, tiny_reference, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "--inception-fid" in err and "torch-fidelity" in err and "Traceback" not in err
    assert not (tmp_path / "eval.json").exists()  # failed before generating anything


def test_eval_inception_fid_hands_pngs_to_torch_fidelity_and_reports_its_failure(
    tiny_checkpoint: Path, tiny_reference: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # A stand-in for torch-fidelity (not installed in CI, and its weights need the network): it
    # checks what it is given — RGB PNG folders of the generated and the held-out images.
    import types

    seen: dict[str, int] = {}

    def calculate_metrics(input1: str, input2: str, fid: bool, **_kwargs: object) -> dict[str, float]:
        for key, folder in (("generated", input1), ("reference", input2)):
            files = sorted(Path(folder).glob("*.png"))
            assert all(Image.open(f).mode == "RGB" and Image.open(f).size == (32, 32) for f in files)
            seen[key] = len(files)
        if fail:
            raise OSError("weights download failed: no network")
        return {"frechet_inception_distance": 12.5}

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics))
    fail = False
    assert main(_eval_argv(tiny_checkpoint, tiny_reference, tmp_path)) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["inception_fid"] == 12.5 and seen == {"generated": 4, "reference": 20}
    assert len(report["class_agreement_per_class"]) == 10

    fail = True
    assert main(_eval_argv(tiny_checkpoint, tiny_reference, tmp_path)) == 2
    report = json.loads((tmp_path / "eval.json").read_text())  # the other figures are still reported
    assert report["inception_fid"] is None and "no network" in report["inception_fid_error"]
    assert report["fd"] >= 0 and "--inception-fid" in capsys.readouterr().err
