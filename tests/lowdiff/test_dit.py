"""The unified multi-resolution DiT: the paper's parameter counts, stage isolation, positions, configs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lowdiff.configs import ModelConfig, get_config
from lowdiff.counting import describe
from lowdiff.dit import DiTConfig, UnifiedDiT, rope_tables, rotate_pairs, sincos_2d
from lowdiff.errors import ConfigError
from lowdiff.model import config_from_dict, config_to_dict, load_config


def meta_params(config: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        net = UnifiedDiT(config.network)  # type: ignore[arg-type]
    return {name: p.numel() for name, p in net.named_parameters()}


def test_b1_baseline_and_cascade_have_the_papers_parameter_counts() -> None:
    """Table 4: 130.56 M and 131.86 M (± 0.02 M); the difference is exactly the cascade's additions."""
    base = meta_params(get_config("lightningdit-b1-imagenet256"))
    cascade = meta_params(get_config("lowdiff-dit-b1-imagenet256"))
    assert abs(sum(base.values()) / 1e6 - 130.56) <= 0.02
    assert abs(sum(cascade.values()) / 1e6 - 131.86) <= 0.02
    d, c = 768, 32
    added = {name: n for name, n in cascade.items() if name not in base}
    widened = cascade["inputs.16.proj.weight"] - base["inputs.16.proj.weight"]
    assert widened == c * d  # the 16×16 patch embedding takes the upsampled condition too
    assert sum(v for k, v in added.items() if k.startswith("inputs.8.")) == c * d + d  # 8×8 patch embedding
    assert sum(v for k, v in added.items() if k.startswith("outputs.8.")) == d + (d * c + c) + (d * 2 * d + 2 * d)
    assert added["pos_embed.8"] == 64 * d and added["map_resolution.weight"] == 2 * d
    assert sum(cascade.values()) - sum(base.values()) == sum(added.values()) + widened


def test_models_json_reports_nfe_and_more_flops_at_16_than_at_8() -> None:
    base = describe(get_config("lightningdit-b1-imagenet256"))
    cascade = describe(get_config("lowdiff-dit-b1-imagenet256"))
    assert [s["nfe"] for s in base["stages"]] == [100]
    assert [(s["resolution"], s["nfe"]) for s in cascade["stages"]] == [(8, 45), (16, 50)]
    low, high = (s["gflops_per_evaluation"] for s in cascade["stages"])
    assert 3 < high / low < 5  # 64 vs 256 tokens: linear layers ×4, attention more
    assert cascade["gflops_per_image"] < base["gflops_per_image"]


def test_a_stage_uses_only_its_own_io_layers(tiny_latent_model: Callable) -> None:
    model = tiny_latent_model()
    net = model.denoiser.net
    x = torch.randn(2, 4, 4, 4)
    out = net(x, torch.rand(2), torch.tensor([1, 2]), 4)
    out.square().sum().backward()
    touched = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("inputs.4.") for n in touched) and any(n.startswith("outputs.4.") for n in touched)
    assert not any(n.startswith(("inputs.8.", "outputs.8.")) for n in touched)
    assert out.shape == x.shape


def test_the_conditioned_stage_needs_and_reads_its_condition(tiny_latent_model: Callable) -> None:
    net = tiny_latent_model().denoiser.net
    x, t, y = torch.randn(1, 4, 8, 8), torch.full((1,), 0.3), torch.tensor([3])
    with pytest.raises(ValueError, match="condition"):
        net(x, t, y, 8)
    a = net(x, t, y, 8, torch.zeros(1, 4, 8, 8))
    b = net(x, t, y, 8, torch.ones(1, 4, 8, 8))
    assert not torch.allclose(a, b)


def test_rope_scores_depend_only_on_the_offset_between_tokens() -> None:
    """2-D RoPE: ⟨R(p)q, R(p')k⟩ is a function of p − p' (rows and columns separately)."""
    cos, sin = rope_tables(16, 4)
    q, k = torch.randn(16), torch.randn(16)

    def score(i: int, j: int) -> float:
        qi = q * cos[i] + rotate_pairs(q[None])[0] * sin[i]
        kj = k * cos[j] + rotate_pairs(k[None])[0] * sin[j]
        return float(qi @ kj)

    # tokens (0,0)→(1,2) and (2,1)→(3,3) differ by the same (row, column) offset
    assert score(0 * 4 + 0, 1 * 4 + 2) == pytest.approx(score(2 * 4 + 1, 3 * 4 + 3), abs=1e-4)
    assert score(0, 1) != pytest.approx(score(0, 4), abs=1e-3)  # a column step is not a row step
    assert torch.allclose((q * cos[5] + rotate_pairs(q[None])[0] * sin[5]).norm(), q.norm())


def test_sincos_table_first_half_encodes_the_column() -> None:
    table = sincos_2d(8, 3)  # tokens row-major: token 1 is (row 0, col 1), token 3 is (row 1, col 0)
    assert torch.equal(table[0, 4:], table[1, 4:]) and not torch.equal(table[0, :4], table[1, :4])
    assert torch.equal(table[0, :4], table[3, :4]) and not torch.equal(table[0, 4:], table[3, 4:])


def test_a_dit_config_round_trips_through_a_file(tmp_path: Path, tiny_latent_config: Callable) -> None:
    for config in (tiny_latent_config(), get_config("lowdiff-dit-b1-imagenet256")):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(config_to_dict(config)))
        assert load_config(path) == config


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"hidden_size": 10**6}, "hidden_size must be an integer"),
        ({"depth": 0}, "depth must be an integer"),
        ({"num_heads": 5}, "not divisible by num_heads"),
        ({"mlp_ratio": "4"}, "mlp_ratio must be a number"),
        ({"resolutions": [8, 4]}, "resolutions must rise"),
        ({"resolutions": [3, 8]}, "whole multiple"),
        ({"architecture": "vit"}, "architecture must be 'dit'"),
        ({"model_channels": 8}, "unknown DiT network key"),
    ],
)
def test_a_bad_dit_network_is_one_config_error(tiny_latent_config: Callable, change: dict, words: str) -> None:
    data = config_to_dict(tiny_latent_config())
    data["network"].update(change)
    if change.get("resolutions"):
        data["schedule"]["stages"][0]["resolution"] = change["resolutions"][0]
    with pytest.raises(ConfigError, match=words) as info:
        config_from_dict(data)
    assert info.value.field == "config"


def test_flow_needs_a_dit_and_a_dit_needs_flow(tiny_latent_config: Callable) -> None:
    data = config_to_dict(tiny_latent_config())
    data["preconditioning"] = "edm"
    with pytest.raises(ConfigError, match="go together"):
        config_from_dict(data)
    pixel = config_to_dict(get_config("fashion32"))
    pixel["preconditioning"] = "flow"
    with pytest.raises(ConfigError, match="go together"):
        config_from_dict(pixel)


def test_dit_config_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        DiTConfig(8, 4, 0, (8,), hidden_size=12, num_heads=2).check()  # head size 6
