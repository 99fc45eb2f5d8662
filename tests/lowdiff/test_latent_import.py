"""Released latent formats: LightningDiT checkpoints, a cascade initialised from one, VA-VAE + statistics.

The fixtures were written by LightningDiT's own code (scripts/make_latent_fixtures.py) with random,
shrunk weights in the released key layout, together with the reference forward's outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowdiff.dit import DiTConfig, UnifiedDiT, sincos_2d
from lowdiff.errors import CheckpointError
from lowdiff.latent_import import cascade_network, import_lightningdit, init_cascade_from_baseline, load_vavae

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DIT, DIT_IO = FIXTURES / "lightningdit-tiny.pt", FIXTURES / "lightningdit-tiny-io.pt"
VAE, VAE_IO, STATS = FIXTURES / "vavae-tiny.pt", FIXTURES / "vavae-tiny-io.pt", FIXTURES / "latents_stats-tiny.pt"


def baseline() -> UnifiedDiT:
    imported = import_lightningdit(DIT)
    net = UnifiedDiT(imported.network).eval()
    net.load_state_dict(imported.state_dict)
    return net


def test_the_shape_is_read_off_the_tensors() -> None:
    c = import_lightningdit(DIT).network
    assert (c.hidden_size, c.depth, c.num_heads, c.img_channels, c.img_resolution, c.label_dim) == (32, 2, 2, 4, 8, 10)
    assert c.resolutions == (8,) and c.patch_size == 1 and c.mlp_ratio == 4.0


def test_our_dit_reproduces_lightningdits_forward() -> None:
    io = torch.load(DIT_IO, weights_only=True)
    with torch.no_grad():
        out = baseline()(io["x"], io["t"], io["y"], 8)
    assert torch.allclose(out, io["out"], atol=1e-5), float((out - io["out"]).abs().max())


def test_our_fixed_position_table_is_lightningdits() -> None:
    released = torch.load(DIT, weights_only=True)["ema"]["pos_embed"][0]
    assert torch.allclose(sincos_2d(32, 8), released, atol=1e-6)


def test_a_cascade_from_the_baseline_computes_the_baseline_at_the_top_stage() -> None:
    """Where it should: the 8×8 stage, for any condition (its condition channels start at zero and the
    resolution embedding at zero); the new 4×4 stage's layers are fresh."""
    base = baseline()
    torch.manual_seed(1)
    cascade = UnifiedDiT(cascade_network(base.config, (4, 8))).eval()
    report = init_cascade_from_baseline(cascade, base.state_dict())
    assert report["widened"] == ["inputs.8.proj.weight"]
    assert {"inputs.4.proj.weight", "outputs.4.linear.weight", "pos_embed.4", "map_resolution.weight"} <= set(
        report["fresh"]
    )
    assert not any(k.startswith("blocks.") for k in report["fresh"])
    io = torch.load(DIT_IO, weights_only=True)
    with torch.no_grad():
        expected = base(io["x"], io["t"], io["y"], 8)
        for cond in (torch.zeros_like(io["x"]), torch.randn_like(io["x"])):
            assert torch.allclose(cascade(io["x"], io["t"], io["y"], 8, cond), expected, atol=1e-6)
        low = cascade(io["x"][:, :, :4, :4], io["t"], io["y"], 4)
    assert low.shape == (3, 4, 4, 4)


def test_a_cascade_whose_top_is_not_the_baseline_is_refused() -> None:
    base = baseline()
    other = UnifiedDiT(DiTConfig(16, 4, 10, (8, 16), hidden_size=32, depth=2, num_heads=2))
    with pytest.raises(CheckpointError, match="must be one") as info:
        init_cascade_from_baseline(other, base.state_dict())
    assert info.value.field == "init_from"


def edited(tmp_path: Path, change) -> Path:
    payload = torch.load(DIT, weights_only=True)
    change(payload["ema"])
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda sd: sd.pop("blocks.1.attn.proj.bias"), "missing 1 \\(e.g. blocks.1.attn.proj.bias\\)"),
        (lambda sd: sd.__setitem__("blocks.0.mlp.w3.bias", torch.zeros(5)), "wrong shape"),
        (lambda sd: sd.__setitem__("blocks.0.attn.q_norm.weight", torch.ones(16)), "q/k norm"),
        (lambda sd: sd.__setitem__("extra.weight", torch.ones(1)), "unexpected 1"),
        (lambda sd: sd["blocks.0.norm1.weight"].fill_(float("nan")), "NaN"),
        (lambda sd: sd.__setitem__("pos_embed", torch.zeros(1, 10, 32)), "not a square grid"),
        (lambda sd: sd["feat_rope.freqs_cos"].add_(1.0), "not the 2-D rotary table"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path: Path, change, words: str) -> None:
    with pytest.raises(CheckpointError, match=words) as info:
        import_lightningdit(edited(tmp_path, change))
    assert info.value.field == "checkpoint" and "\n" not in info.value.message


def test_code_in_a_checkpoint_is_never_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"x": Path("/")}}, path)  # an object that only full unpickling can rebuild
    with pytest.raises(CheckpointError, match="not a readable weights-only"):
        import_lightningdit(path)


def test_vavae_decodes_as_the_reference_and_applies_the_statistics() -> None:
    vae = load_vavae(VAE, STATS)
    io = torch.load(VAE_IO, weights_only=True)
    with torch.no_grad():
        assert torch.allclose(vae.decode(io["z"]), io["out"], atol=1e-5)
        stats = torch.load(STATS, weights_only=True)
        normalized = (io["z"] - stats["mean"]) / stats["std"]
        assert torch.allclose(vae.decode_normalized(normalized), io["out"], atol=1e-4)
    c = vae.config
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels) == (32, (1, 1), 1, 4)
    assert c.encoder_attn_levels == (1,) and c.decoder_attn_levels == (1,)


def test_vavae_encoder_gives_a_posterior_of_the_latent_shape() -> None:
    mean, logvar = load_vavae(VAE).encode_moments(torch.zeros(1, 3, 32, 32))
    assert mean.shape == logvar.shape == (1, 4, 16, 16)


def test_bad_vavae_and_statistics_are_one_line(tmp_path: Path) -> None:
    payload = torch.load(VAE, weights_only=True)
    payload["state_dict"]["decoder.conv_out.bias"] = torch.zeros(7)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="wrong shape") as info:
        load_vavae(tmp_path / "bad.pt")
    assert info.value.field == "autoencoder"
    torch.save({"mean": torch.zeros(1, 3, 1, 1), "std": torch.ones(1, 4, 1, 1)}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="mean must be") as info:
        load_vavae(VAE, tmp_path / "s.pt")
    assert info.value.field == "latent_stats"
    torch.save({"mean": torch.zeros(4), "std": torch.zeros(4)}, tmp_path / "z.pt")
    with pytest.raises(CheckpointError, match="positive"):
        load_vavae(VAE, tmp_path / "z.pt")


def test_an_autoencoder_of_a_shape_the_layers_refuse_is_one_line(tmp_path: Path) -> None:
    """Shapes read off an untrusted file can pass the key checks yet be unbuildable (GroupNorm of 32
    groups over 16 channels): a CheckpointError naming the file, not a ValueError from torch."""
    state = {
        "encoder.conv_in.weight": torch.zeros(16, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": torch.zeros(16, 16, 3, 3),
        "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
        "decoder.conv_out.weight": torch.zeros(3, 16, 3, 3),
    }
    torch.save({"state_dict": state}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="not an autoencoder LowDiff can build") as info:
        load_vavae(tmp_path / "odd.pt")
    assert info.value.field == "autoencoder" and "odd.pt" in info.value.message
