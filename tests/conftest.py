from __future__ import annotations

import pytest
import torch

from lowdiff.configs import ModelConfig, get_config
from lowdiff.model import LowDiffModel
from lowdiff.network import NetworkConfig

torch.set_num_threads(2)


def tiny_config(resolutions: tuple[int, ...] = (8, 16, 32), label_dim: int = 10, channels: int = 1) -> ModelConfig:
    """fashion32's schedule on a network small enough for fast tests."""
    base = get_config("fashion32")
    schedule = base.schedule
    if resolutions != base.resolutions:
        schedule = (
            get_config("edm-fashion32").schedule
            if len(resolutions) == 1
            else get_config("cifar10-cond-2stage").schedule
        )
    net = NetworkConfig(
        img_resolution=32,
        img_channels=channels,
        label_dim=label_dim,
        resolutions=resolutions,
        model_channels=8,
        channel_mult=(1, 1, 2),
        num_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
        augment_dim=0,
    )
    return ModelConfig(name="tiny", network=net, schedule=schedule, preconditioning="edm", pad=2)


@pytest.fixture
def tiny_model() -> LowDiffModel:
    torch.manual_seed(0)
    model = LowDiffModel(tiny_config())
    # Zero-initialised output layers make every denoiser near-identity; perturb them so that tests
    # exercise a network whose output depends on its input.
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
