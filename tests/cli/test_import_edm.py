"""``lowdiff import-edm``: an EDM snapshot made by EDM's own code becomes a checkpoint that samples
EDM's images; anything else is one line and exit status 2, and nothing from the file runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowdiff.model import load_model
from lowdiff.sampler import initial_noise
from lowdiff.schedule import CascadeSchedule, StageSchedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "edm"


def draws_edm_noise() -> bool:
    """Whether lowdiff's starting noise is EDM's per-seed float32 draw (issue 13, part 1)."""
    ours = initial_noise([5], CascadeSchedule((StageSchedule(8, 2),)), 1)[0][0]
    return torch.equal(ours, torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5)).to(torch.float64))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_import_writes_a_checkpoint_every_command_loads(lowdiff_cli, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    result = lowdiff_cli("import-edm", str(FIXTURES / "edm-cond16.pkl"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and "EDMPrecond → edm" in result.stdout
    model = load_model(out)
    direct = load_model(FIXTURES / "edm-cond16.pkl")
    assert model.config == direct.config
    assert model.config.schedule.stages[0].num_steps == 18
    for key, value in direct.denoiser.net.state_dict().items():
        assert torch.equal(model.denoiser.net.state_dict()[key], value)


def test_num_steps(lowdiff_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    assert (
        lowdiff_cli("import-edm", str(FIXTURES / "vp-uncond16.pkl"), "--out", str(out), "--num-steps", "5").returncode
        == 0
    )
    assert load_model(out).config.schedule.stages[0].num_steps == 5


@pytest.mark.skipif(not draws_edm_noise(), reason="starting noise is not EDM's per-seed float32 draw yet (part 1)")
def test_sample_on_the_imported_model_draws_edms_images(lowdiff_cli, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    assert lowdiff_cli("import-edm", str(FIXTURES / "edm-cond16.pkl"), "--out", str(ckpt)).returncode == 0
    with np.load(FIXTURES / "edm-cond16-reference.npz") as ref:
        seeds, labels, images = ref["seeds"], ref["image_labels"], ref["images"]
    for seed, label, edm in zip(seeds, labels, images):
        out = tmp_path / "png"
        args = ["sample", "--checkpoint", str(ckpt), "--seed", str(seed), "--class-label", str(label)]
        result = lowdiff_cli(*args, "--out-dir", str(out), "--threads", "1")
        assert result.returncode == 0, result.stderr
        with Image.open(out / f"class{label}_seed{seed}.png") as png:
            ours = np.asarray(png).astype(int)
        assert np.abs(ours - edm.astype(int)).max() <= 1, f"seed {seed}"


class RunsCode:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("kind", ["runs-code", "not-a-snapshot", "dhariwal", "missing"])
def test_refusals_are_one_line_exit_2_and_write_nothing(lowdiff_cli, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "pwned"
    source = {
        "runs-code": tmp_path / "evil.pkl",
        "not-a-snapshot": tmp_path / "notes.pkl",
        "dhariwal": FIXTURES / "dhariwal8.pkl",
        "missing": tmp_path / "nope.pkl",
    }[kind]
    if kind == "runs-code":
        source.write_bytes(pickle.dumps({"ema": RunsCode(target)}))
    elif kind == "not-a-snapshot":
        source.write_bytes(pickle.dumps({"hello": "world"}))
    out = tmp_path / "m.pt"
    result = lowdiff_cli("import-edm", str(source), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowdiff import-edm: error: --snapshot: "), result.stderr
    assert not out.exists() and not target.exists()


def test_out_must_be_pt_or_safetensors(lowdiff_cli, tmp_path: Path) -> None:
    result = lowdiff_cli("import-edm", str(FIXTURES / "edm-cond16.pkl"), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2 and "--out:" in result.stderr


def test_export_ema_writes_safetensors(lowdiff_cli, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = lowdiff_cli("export-ema", "--checkpoint", str(tiny_checkpoint), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert load_model(out).config == load_model(tiny_checkpoint).config
