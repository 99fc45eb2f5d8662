"""lowdiff.training: the cascade loss and its reduction, steps that learn, the NaN guard, no clipping by
default, augmentation in a step, checkpoints, resume, init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowdiff.data import prepare_images
from lowdiff.errors import CheckpointError
from lowdiff.model import LowDiffModel
from lowdiff.training import Trainer, TrainOptions, cascade_loss, draw_step, per_image_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    config = tiny_config().with_training(batch_size=16, lr=3e-3, lr_rampup_kimg=0.0)
    trainer = Trainer(config, TrainOptions(), tmp_path)
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
    trainer = Trainer(tiny_config().with_training(batch_size=4), TrainOptions(), tmp_path)
    x, y = _toy_data(4)
    x[0, 0, 0, 0] = float("nan")
    weights = [p.clone() for p in trainer.denoiser.parameters()]
    assert trainer.train_step(x, y) is None
    assert trainer.skipped_steps == 1 and trainer.step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.denoiser.parameters()))


def test_checkpoint_round_trip_and_resume(tiny_config, tmp_path: Path) -> None:
    options = TrainOptions(total_kimg=0.016, grid_every=0, checkpoint_every=1000)
    config = tiny_config().with_training(batch_size=8)
    trainer = Trainer(config, options, tmp_path)
    x, y = _toy_data(16)
    trainer.fit(x, y, log=open("/dev/null", "w"))
    assert trainer.checkpoint_path.exists() and not (tmp_path / "grids" / "final.png").exists()  # 0 = never

    resumed = Trainer(config, options, tmp_path)
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


def test_pixels_weighting_is_equal_weighting_times_pixel_counts(tiny_config) -> None:
    """EDM's reduction sums each resolution's loss over its pixels, so with the same draws the
    per-resolution losses are the per-pixel means × C·r²: 64 : 256 : 1024 for 8/16/32, one channel."""
    model = LowDiffModel(tiny_config())
    x, y = _toy_data(4)
    draws = draw_step(model.denoiser, 4, 1, (8, 16, 32), torch.Generator().manual_seed(1))
    with torch.no_grad():
        summed, per_sum = per_image_loss(model.denoiser, x, y, (8, 16, 32), draws, "pixels")
        meaned, per_mean = per_image_loss(model.denoiser, x, y, (8, 16, 32), draws, "equal")
    for r in (8, 16, 32):
        torch.testing.assert_close(per_sum[r], per_mean[r] * r * r, rtol=1e-5, atol=0)
    torch.testing.assert_close(summed, sum(per_sum.values()))
    assert not torch.allclose(summed, meaned)


def test_equal_weighting_is_the_old_mean_over_pixels_and_batch(tiny_config) -> None:
    """Checkpoints from before the recipe field (the embedded fashion32) continue with this loss."""
    model = LowDiffModel(tiny_config((32,)))
    x, y = _toy_data(4)
    draws = draw_step(model.denoiser, 4, 1, (32,), torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, _ = per_image_loss(model.denoiser, x, y, (32,), draws, "equal")
        sigma = draws.sigma[0][:, None, None, None]
        denoised = model.denoiser(x + draws.noise[0] * sigma, draws.sigma[0], y, 32)
        old = (model.denoiser.loss_weight(draws.sigma[0])[:, None, None, None] * (denoised - x) ** 2).mean()
    torch.testing.assert_close(loss.mean(), old, rtol=1e-5, atol=0)


def test_no_gradient_clipping_unless_the_recipe_asks(tiny_config, tmp_path: Path, monkeypatch) -> None:
    calls: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    x, y = _toy_data(4)
    Trainer(tiny_config().with_training(batch_size=4), TrainOptions(), tmp_path / "a").train_step(x, y)
    assert calls == []  # the default recipe (EDM's): no clipping
    Trainer(tiny_config().with_training(batch_size=4, grad_clip=1.0), TrainOptions(), tmp_path / "b").train_step(x, y)
    assert calls == [1.0]


def test_a_step_is_a_function_of_seed_and_step_only(tiny_config, tmp_path: Path) -> None:
    """Draws come from (seed, step): two trainers give the same weights; another seed does not."""
    x, y = _toy_data(8)
    config = tiny_config().with_training(batch_size=8, lr_rampup_kimg=0.0)
    runs = [Trainer(config, TrainOptions(seed=s), tmp_path / str(i)) for i, s in enumerate((0, 0, 1))]
    initial = {k: v.clone() for k, v in runs[0].denoiser.net.state_dict().items()}
    for trainer in runs:
        trainer.denoiser.net.load_state_dict(initial)  # same initial weights for all three
        for _ in range(2):
            assert trainer.train_step(x, y) is not None
    a, b, c = ([p.detach() for p in t.denoiser.parameters()] for t in runs)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert any(not torch.equal(p, q) for p, q in zip(a, c))


def test_training_with_augmentation_feeds_the_augment_labels(tiny_config, tmp_path: Path) -> None:
    from dataclasses import replace

    base = tiny_config()
    config = replace(base, network=replace(base.network, augment_dim=9)).with_training(batch_size=8, augment_p=0.5)
    trainer = Trainer(config, TrainOptions(), tmp_path)
    seen: list[torch.Tensor | None] = []
    forward = trainer.denoiser.net.forward

    def recording(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("augment_labels"))
        return forward(*args, **kwargs)

    trainer.denoiser.net.forward = recording
    x, y = _toy_data(8)
    assert trainer.train_step(x, y) is not None
    assert len(seen) == 3 and all(labels is not None and labels.shape == (8, 9) for labels in seen)
    assert torch.equal(seen[0], seen[2]) and seen[0].abs().sum() > 0  # one draw, given to every stage
    assert trainer.denoiser.net.map_augment.weight.grad is not None


def test_augmentation_needs_augment_labels(tiny_config) -> None:
    from lowdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="augment") as caught:
        tiny_config().with_training(augment_p=0.12)
    assert caught.value.field == "augment_p"


def test_bf16_autocast_keeps_fp32_master_weights(tiny_config, tmp_path: Path) -> None:
    config = tiny_config().with_training(batch_size=4, lr_rampup_kimg=0.0)
    trainer = Trainer(config, TrainOptions(precision="bf16"), tmp_path)
    seen: list[torch.dtype] = []
    block = next(iter(trainer.denoiser.net.encoder.values()))  # a U-Net block, run by every stage
    block.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x, y = _toy_data(4)
    before = [p.clone() for p in trainer.denoiser.parameters()]
    losses = trainer.train_step(x, y)
    assert losses is not None and all(v == v for v in losses.values())  # finite, not NaN
    assert torch.bfloat16 in seen  # the forward ran in bf16
    assert all(p.dtype == torch.float32 for p in trainer.denoiser.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.ema.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.denoiser.parameters()))
