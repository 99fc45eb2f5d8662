"""Training on your own data with your own config: an image folder's class names reach the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowdiff.cli import main
from lowdiff.model import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"model_channels": 8, "channel_mult": [1, 1, 1], "num_blocks": 1, "attn_resolutions": []}


def image_folder(root: Path, classes: tuple[str, ...], per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_and_json_config_train_a_model_with_the_folder_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = image_folder(tmp_path / "pets", ("cat", "dog", "rabbit"))
    config = tmp_path / "pets.json"
    config.write_text(json.dumps({
        "base": "fashion32-2stage", "name": "pets32", "pad": 0,
        "network": {"img_channels": 3, "label_dim": 3, **TINY},
    }))  # fmt: skip
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data", str(data), "--run-dir", str(run), "--holdout-per-class", "1",
            "--batch-size", "2", "--kimg", "0.002", "--grid-every", "0", "--threads", "1",
            "--export", str(tmp_path / "pets.pt")]  # fmt: skip
    assert main(argv) == 0
    assert "classes: 0 = cat, 1 = dog, 2 = rabbit" in capsys.readouterr().err
    model = load_model(tmp_path / "pets.pt")
    assert model.config.name == "pets32" and model.config.class_names == ("cat", "dog", "rabbit")
    assert model.config.network.img_channels == 3
    images = model.generate([0, 1], [0, 2])
    assert images.shape == (2, 3, 32, 32)


def test_models_dump_is_a_config_file_train_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--dump", "fashion32"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["name"] == "fashion32" and dumped["network"]["label_dim"] == 10
    assert main(["models", "--dump", "no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err


def test_a_bad_config_file_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": "fashion32", "network": {"label_dim": "ten"}}))
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4))
    argv = ["train", "--config", str(bad), "--data", str(data), "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lowdiff train: error: --config:") and str(bad) in err
