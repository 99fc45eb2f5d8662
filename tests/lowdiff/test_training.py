"""lowdiff.training: the cascade loss, steps that learn, the NaN guard, checkpoints, resume, init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowdiff.data import prepare_images
from lowdiff.errors import CheckpointError
from lowdiff.model import LowDiffModel
from lowdiff.training import Trainer, TrainOptions, cascade_loss


def _toy_data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return prepare_images(images, pad=2, resolution=32, channels=1), torch.arange(n) % 10


def test_cascade_loss_has_one_term_per_resolution(tiny_config) -> None:
    model = LowDiffModel(tiny_config())
    x, y = _toy_data(8)
    loss, per_res = cascade_loss(model.denoiser, x, y, (8, 16, 32), torch.Generator().manual_seed(0))
    assert set(per_res) == {8, 16, 32}
    assert loss.item() == pytest.approx(sum(per_res.values()), rel=1e-5)


def test_training_steps_reduce_loss_and_update_ema(tiny_config, tmp_path: Path) -> None:
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


def test_nan_guard_skips_the_step(tiny_config, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(), TrainOptions(batch_size=4), tmp_path)
    x, y = _toy_data(4)
    x[0, 0, 0, 0] = float("nan")
    weights = [p.clone() for p in trainer.denoiser.parameters()]
    assert trainer.train_step(x, y) is None
    assert trainer.skipped_steps == 1 and trainer.step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.denoiser.parameters()))


def test_checkpoint_round_trip_and_resume(tiny_config, tmp_path: Path) -> None:
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


def test_init_from_an_inference_checkpoint(tiny_config, tmp_path: Path) -> None:
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
