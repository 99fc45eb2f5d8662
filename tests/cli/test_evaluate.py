"""`lowdiff eval --inception-fid`: a clear error without torch-fidelity; PNG folders handed to it; its failure
reported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowdiff.cli import main


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
