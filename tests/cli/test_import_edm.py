"""``lowdiff import-edm``: an EDM snapshot made by EDM's own code becomes a checkpoint that samples
EDM's images; anything else is one line and exit status 2, and nothing from the file runs."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
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


def test_train_init_from_edm_starts_a_lowdiff_model_from_edm_weights(
    lowdiff_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lowdiff train --init-from-edm` on a (registered, tiny) 8-16 LowDiff config over the fixture's U-Net:
    it trains from EDM's blocks, and its checkpoint's U-Net is EDM's moved by a few optimizer steps."""
    from lowdiff import configs

    edm = load_model(FIXTURES / "edm-cond16.pkl")
    stages = (StageSchedule(8, 4, truncate_at=2), StageSchedule(16, 4))
    config = replace(
        edm.config,
        name="tiny-from-edm",
        network=replace(edm.config.network, resolutions=(8, 16)),
        schedule=CascadeSchedule(stages),
    )
    monkeypatch.setitem(configs.BUILTIN_CONFIGS, config.name, config)
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), labels=np.repeat(np.arange(10), 2))
    run = tmp_path / "run"
    args = ["train", "--config", config.name, "--data", str(data), "--run-dir", str(run), "--holdout-per-class", "0"]
    args += ["--batch-size", "4", "--kimg", "0.008", "--grid-every", "0", "--threads", "1"]
    result = lowdiff_cli(*args, "--init-from-edm", str(FIXTURES / "edm-cond16.pkl"), "--lr", "1e-9")
    assert result.returncode == 0, result.stderr
    assert "initialised from EDM" in result.stderr and "resolution-specific ones fresh" in result.stderr
    out = tmp_path / "ema.safetensors"
    assert lowdiff_cli("export-ema", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)).returncode == 0
    trained = load_model(out).denoiser.net.state_dict()
    for name, tensor in edm.denoiser.net.state_dict().items():
        if not name.startswith(("inputs.", "outputs.")):
            torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_train_init_from_edm_refuses_a_snapshot_that_does_not_fit(lowdiff_cli, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), labels=np.repeat(np.arange(10), 2))
    args = [
        "train",
        "--config",
        "fashion32",
        "--data",
        str(data),
        "--run-dir",
        str(tmp_path / "run"),
        "--holdout-per-class",
        "0",
    ]
    result = lowdiff_cli(*args, "--init-from-edm", str(FIXTURES / "vp-uncond16.pkl"), "--threads", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("lowdiff train: error: --init-from-edm: ") and "does not fit" in result.stderr
