"""lowdiff.configs: the paper's NFE per stage; every built-in config builds."""

from __future__ import annotations

from lowdiff.configs import BUILTIN_CONFIGS, get_config


def test_paper_nfe_per_stage() -> None:
    expected = {
        "cifar10-cond": (18, 13, 17),
        "cifar10-cond-2stage": (19, 17),
        "ffhq64": (22, 23, 23, 39),
        "ffhq64-2stage": (49, 39),
        "edm-cifar10-cond": (35,),
        "edm-ffhq64": (79,),
    }
    for name, nfe in expected.items():
        assert get_config(name).schedule.nfe == nfe, name


def test_all_builtin_configs_build() -> None:
    assert {"fashion32", "edm-fashion32", "cifar10-uncond", "edm-cifar10-uncond"} <= set(BUILTIN_CONFIGS)
    for config in BUILTIN_CONFIGS.values():
        assert config.schedule.resolutions == config.resolutions
