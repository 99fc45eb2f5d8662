"""lowdiff.network: a stage runs (and trains) only its own sub-network; conditioned stages need a condition."""

from __future__ import annotations

import pytest
import torch

from lowdiff.counting import build_denoiser


def _used_modules(denoiser: torch.nn.Module, run) -> set[str]:
    used: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: used.add(name))
        for name, m in denoiser.net.named_modules()
        if name and not list(m.children())
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return used


ROUTED = ("encoder", "decoder", "inputs", "outputs")


def _routed(names: set[str] | list[str]) -> set[str]:
    """`encoder.16x16_block0.conv0` → `encoder.16x16_block0`; other modules are not routed by resolution."""
    return {".".join(n.split(".")[:2]) for n in names if n.split(".")[0] in ROUTED}


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_only_the_stage_subnetwork_runs(tiny_config, resolution: int) -> None:
    denoiser = build_denoiser(tiny_config())
    x = torch.randn(2, 1, resolution, resolution)
    cond = torch.randn_like(x) if resolution > 8 else None
    sc = torch.ones(2) if cond is not None else None
    used = _routed(
        _used_modules(denoiser, lambda: denoiser(x, torch.ones(2), torch.tensor([1, 2]), resolution, cond, sc))
    )
    assert used == _routed(denoiser.net.stage_modules(resolution))
    # Nothing above the stage's resolution runs, and only its own I/O layers do.
    for name in used:
        kind, key = name.split(".")
        if kind in ("encoder", "decoder"):
            assert int(key.split("x")[0]) <= resolution, name
        else:
            assert key == str(resolution), name
    # …and everything at or below it does (the sub-network is whole).
    all_blocks = {f"{k}.{n}" for k in ("encoder", "decoder") for n in getattr(denoiser.net, k)}
    below = {n for n in all_blocks if int(n.split(".")[1].split("x")[0]) < resolution}
    assert below <= used


def test_stage_loss_reaches_only_its_parameters(tiny_config) -> None:
    config = tiny_config()
    denoiser = build_denoiser(config)
    out = denoiser(torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([0, 1]), 8)
    out.square().mean().backward()
    with_grad = {n for n, p in denoiser.net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("inputs.8.") for n in with_grad)
    for name in with_grad:
        assert not name.startswith(
            (
                "inputs.16",
                "inputs.32",
                "outputs.16",
                "outputs.32",
                "encoder.32x32",
                "encoder.16x16",
                "decoder.32x32",
                "decoder.16x16",
            )
        ), name


def test_condition_is_required_for_conditioned_stages(tiny_config) -> None:
    denoiser = build_denoiser(tiny_config())
    with pytest.raises(ValueError, match="condition"):
        denoiser(torch.randn(1, 1, 16, 16), torch.ones(1), torch.tensor([0]), 16)
