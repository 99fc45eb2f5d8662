"""lowdiff.counting: parameter counts as in the paper and in EDM, FLOPs per stage."""

from __future__ import annotations

import pytest

from lowdiff.configs import get_config
from lowdiff.counting import build_denoiser, describe

PAPER_PARAMS_M = {
    "edm-cifar10-cond": 55.74,
    "cifar10-cond": 55.77,
    "cifar10-cond-2stage": 55.76,
    "edm-ffhq64": 61.80,
    "ffhq64": 61.86,
    "ffhq64-2stage": 61.82,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_paper(name: str) -> None:
    params = sum(p.numel() for p in build_denoiser(get_config(name), "meta").parameters())
    assert abs(params / 1e6 - PAPER_PARAMS_M[name]) <= 0.02


def test_edm_baseline_is_exactly_edm() -> None:
    # Counts measured from NVlabs/edm's own network (shared reference facts).
    assert sum(p.numel() for p in build_denoiser(get_config("edm-cifar10-cond"), "meta").parameters()) == 55_735_299
    assert sum(p.numel() for p in build_denoiser(get_config("edm-ffhq64"), "meta").parameters()) == 61_805_571


def test_flops_counted_per_stage_grow_with_resolution() -> None:
    info = describe(get_config("cifar10-cond"))
    gflops = [s["gflops_per_evaluation"] for s in info["stages"]]
    assert gflops == sorted(gflops) and gflops[0] > 0
    # The full-resolution sub-network costs what EDM's whole network costs (±0.1%).
    edm = describe(get_config("edm-cifar10-cond"))["stages"][0]["gflops_per_evaluation"]
    assert abs(gflops[-1] / edm - 1) < 1e-3
