"""The ``compile`` engine (torch.compile / inductor) on the CPU: parity with eager, and the cascade."""

from __future__ import annotations

import pytest
import torch

from lowdiff.engines import load_engine
from lowdiff.model import LowDiffModel, TorchStage
from lowdiff.schedule import CascadeSchedule, StageSchedule

# Two stages of a small network: inductor compiles one graph per (stage, batch bucket), tens of
# seconds each on a 2-core CI machine; both tests use bucket 4, so the module compiles twice.
SHORT = CascadeSchedule(
    (
        StageSchedule(16, 4, truncate_at=2),
        StageSchedule(32, 3, sigma_min=0.01, sigma_max=50.0),
    )
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory):
    from lowdiff.configs import ModelConfig
    from lowdiff.network import NetworkConfig

    torch.manual_seed(0)
    net = NetworkConfig(
        img_resolution=32, img_channels=1, label_dim=10, resolutions=(16, 32), model_channels=8,
        channel_mult=(1, 1), num_blocks=1, attn_resolutions=(16,), dropout=0.0, augment_dim=0,
    )  # fmt: skip
    model = LowDiffModel(ModelConfig("tiny", net, SHORT, "edm", 2))
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cache = tmp_path_factory.mktemp("inductor-cache")
    return model, load_engine(model, "compile", engine_dir=cache), cache


def test_each_evaluation_matches_eager_in_fp32(compiled) -> None:
    model, engine, _ = compiled
    gen = torch.Generator().manual_seed(1)
    for k, stage in enumerate(model.config.schedule.stages):
        r = stage.resolution
        for batch in (3,):  # padded to bucket 4
            x = torch.randn(batch, 1, r, r, generator=gen) * 5
            sigma = torch.full((batch,), 2.5)
            labels = torch.arange(batch) % 10
            cond = torch.randn(batch, 1, r, r, generator=gen) if k else None
            sigma_cond = torch.full((batch,), 0.7) if k else None
            eager = TorchStage(model.denoiser, r)(x, sigma, labels, cond, sigma_cond)
            fast = engine.runners[r].fn(x, sigma, labels, cond, sigma_cond)
            assert (fast - eager).abs().max().item() <= 1e-4, (r, batch)


def test_the_cascade_matches_eager_within_two_levels(compiled) -> None:
    model, engine, cache = compiled
    seeds, labels = [0, 1, 2, 3], [3, 1, 4, 1]
    reference = model.generate(seeds, labels).int()
    fast = engine.generate(seeds, labels).int()
    assert (fast - reference).abs().max().item() <= 2
    assert any(cache.rglob("*")), "inductor wrote nothing to the cache folder (--engine-dir)"
