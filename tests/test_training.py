from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowdiff.data import holdout_split, load_dataset, prepare_images
from lowdiff.errors import CheckpointError, DataError
from lowdiff.model import LowDiffModel
from lowdiff.training import Trainer, TrainOptions, cascade_loss

from .conftest import tiny_config


def _toy_data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return prepare_images(images, pad=2, resolution=32, channels=1), torch.arange(n) % 10


def test_cascade_loss_has_one_term_per_resolution() -> None:
    model = LowDiffModel(tiny_config())
    x, y = _toy_data(8)
    loss, per_res = cascade_loss(model.denoiser, x, y, (8, 16, 32), torch.Generator().manual_seed(0))
    assert set(per_res) == {8, 16, 32}
    assert loss.item() == pytest.approx(sum(per_res.values()), rel=1e-5)


def test_training_steps_reduce_loss_and_update_ema(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(), TrainOptions(batch_size=16, lr=3e-3, lr_rampup_kimg=0.0), tmp_path)
    x, y = _toy_data(16)
    before = [p.clone() for p in trainer.ema.parameters()]

    def eval_loss() -> float:
        return cascade_loss(trainer.denoiser, x, y, (8, 16, 32), torch.Generator().manual_seed(5))[0].item()

    first = eval_loss()
    for _ in range(30):
        assert trainer.train_step(x, y) is not None
    assert eval_loss() < first
    assert trainer.step == 30 and trainer.nimg == 30 * 16
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.ema.parameters()))


def test_nan_guard_skips_the_step(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(), TrainOptions(batch_size=4), tmp_path)
    x, y = _toy_data(4)
    x[0, 0, 0, 0] = float("nan")
    weights = [p.clone() for p in trainer.denoiser.parameters()]
    assert trainer.train_step(x, y) is None
    assert trainer.skipped_steps == 1 and trainer.step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.denoiser.parameters()))


def test_checkpoint_round_trip_and_resume(tmp_path: Path) -> None:
    options = TrainOptions(batch_size=8, total_kimg=0.016, grid_every=0, checkpoint_every=1000)
    trainer = Trainer(tiny_config(), options, tmp_path)
    x, y = _toy_data(16)
    trainer.fit(x, y, log=open("/dev/null", "w"))
    assert trainer.checkpoint_path.exists() and (tmp_path / "grids" / "final.png").exists()

    resumed = Trainer(tiny_config(), options, tmp_path)
    assert resumed.resume() and resumed.step == trainer.step == 2
    for a, b in zip(trainer.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    # Same continuation from the same state: one more step lands on the same weights.
    trainer.train_step(x[:8], y[:8])
    resumed.train_step(x[:8], y[:8])
    for a, b in zip(trainer.denoiser.parameters(), resumed.denoiser.parameters()):
        assert torch.allclose(a, b, atol=1e-6)

    # The EMA export loads as an inference model that generates the same images.
    trainer.ema_model().save(tmp_path / "ema.pt")
    loaded = LowDiffModel.load(tmp_path / "ema.pt")
    assert loaded.config == trainer.config
    assert torch.equal(loaded.generate([5], [3]), trainer.ema_model().generate([5], [3]))
    assert len(loaded.metadata["checkpoint_sha256"]) == 64


def test_init_from_an_inference_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = LowDiffModel(tiny_config())
    source.save(tmp_path / "src.pt")
    trainer = Trainer(tiny_config(), TrainOptions(), tmp_path / "run")
    trainer.init_from(tmp_path / "src.pt")
    for a, b, c in zip(source.denoiser.net.parameters(), trainer.denoiser.net.parameters(), trainer.ema.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = Trainer(tiny_config((16, 32)), TrainOptions(), tmp_path / "run2")
    with pytest.raises(CheckpointError, match="another network"):
        other.init_from(tmp_path / "src.pt")


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        LowDiffModel.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        LowDiffModel.load(bad)


def test_loaders(tmp_path: Path) -> None:
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    x, y = load_dataset(tmp_path / "d.npz")
    assert x.shape == (6, 1, 28, 28) and y.tolist() == [0, 0, 1, 1, 2, 2]

    for label in range(3):
        (tmp_path / "folder" / f"class{label}").mkdir(parents=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(tmp_path / "folder" / f"class{label}" / f"{i}.png")
    fx, fy = load_dataset(tmp_path / "folder")
    assert torch.equal(fx, x) and torch.equal(fy, y)

    train, held = holdout_split(y, 1)
    assert held.tolist() == [1, 3, 5] and train.tolist() == [0, 2, 4]

    np.savez(tmp_path / "bad.npz", pictures=images)
    with pytest.raises(DataError, match="missing array"):
        load_dataset(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.npz")


def test_cifar10_tarball(tmp_path: Path) -> None:
    import io
    import pickle
    import tarfile

    rng = np.random.default_rng(0)
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for k in (1, 2):
            blob = pickle.dumps({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [k, 0, 9]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{k}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    x, y = load_dataset(path)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [1, 0, 9, 2, 0, 9]
