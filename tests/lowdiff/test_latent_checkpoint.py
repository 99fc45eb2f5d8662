"""A latent model's checkpoint carries its autoencoder: config (validated like every field read from a
file) and decoder weights with the latent statistics; .pt and .safetensors give back the same images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowdiff.errors import CheckpointError, ConfigError
from lowdiff.model import AUTOENCODER_WEIGHTS, LowDiffModel, config_from_dict, config_to_dict, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_latent_model) -> LowDiffModel:
    m = tiny_latent_model(guidance_scale=2.0)
    with torch.no_grad():  # statistics that matter: decoding must undo them
        m.decoder.latent_mean.copy_(torch.tensor([0.5, -0.2, 0.1, 0.0]).reshape(1, 4, 1, 1))
        m.decoder.latent_std.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]).reshape(1, 4, 1, 1))
    return m


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_keeps_the_decoder_and_its_statistics(model: LowDiffModel, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latent{suffix}"
    model.save(path)
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.config.autoencoder == model.config.autoencoder
    assert torch.equal(loaded.decoder.latent_std, model.decoder.latent_std)
    assert torch.equal(loaded.generate([1, 2], [3, 4]), model.generate([1, 2], [3, 4]))


def test_statistics_change_the_images(model: LowDiffModel) -> None:
    other = LowDiffModel(model.config, model.denoiser)  # fresh decoder: other weights, unit statistics
    other.decoder.load_state_dict(model.decoder.state_dict())
    with torch.no_grad():
        other.decoder.latent_std.fill_(1.0)
    assert not torch.equal(other.generate([1], [3]), model.generate([1], [3]))


def test_a_latent_config_needs_its_autoencoder(model: LowDiffModel) -> None:
    data = config_to_dict(model.config)
    assert tuple(data["autoencoder"]["ch_mult"]) == (1, 1)
    del data["autoencoder"]
    with pytest.raises(ConfigError, match="autoencoder"):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"ch": 48}, "multiple of 32"),
        ({"ch": 10**6}, "autoencoder.ch"),
        ({"ch_mult": [1] * 20}, "ch_mult"),
        ({"ch_mult": [1, True]}, "ch_mult"),
        ({"decoder_attn_levels": [5]}, "decoder_attn_levels"),
        ({"z_channels": 8}, "latent channels"),
        ({"latent_multiplier": 0}, "latent_multiplier"),
        ({"gpu": 1}, "unknown autoencoder key"),
    ],
)
def test_untrusted_autoencoder_fields_are_bounded(model: LowDiffModel, change: dict, needle: str) -> None:
    data = config_to_dict(model.config)
    data["autoencoder"] = {**data["autoencoder"], **change}
    with pytest.raises(ConfigError, match=needle) as err:
        config_from_dict(data)
    assert err.value.field == "config"


def test_checkpoint_without_decoder_weights_or_with_bad_statistics(model: LowDiffModel, tmp_path: Path) -> None:
    payload = torch.load(_saved(model, tmp_path), weights_only=True)
    del payload[AUTOENCODER_WEIGHTS]
    torch.save(payload, tmp_path / "no-decoder.pt")
    with pytest.raises(CheckpointError, match="decoder") as err:
        load_model(tmp_path / "no-decoder.pt")
    assert err.value.field == "checkpoint"
    payload = torch.load(_saved(model, tmp_path), weights_only=True)
    payload[AUTOENCODER_WEIGHTS]["latent_std"] = -payload[AUTOENCODER_WEIGHTS]["latent_std"]
    torch.save(payload, tmp_path / "bad-std.pt")
    with pytest.raises(CheckpointError, match="std"):
        load_model(tmp_path / "bad-std.pt")
    payload = torch.load(_saved(model, tmp_path), weights_only=True)
    payload[AUTOENCODER_WEIGHTS]["post_quant_conv.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "bad-shape.pt")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(tmp_path / "bad-shape.pt")


def _saved(model: LowDiffModel, tmp_path: Path) -> Path:
    path = tmp_path / "latent.pt"
    model.save(path)
    return path
