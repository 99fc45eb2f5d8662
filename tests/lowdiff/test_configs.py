"""lowdiff.configs: the paper's NFE per stage; every built-in config builds; the training recipe per config
and what checkpoints without one get."""

from __future__ import annotations

import pytest

from lowdiff.configs import BUILTIN_CONFIGS, SMALL_CPU_RECIPE, get_config
from lowdiff.errors import ConfigError
from lowdiff.model import config_from_dict, config_to_dict, load_model


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


def test_paper_configs_are_edm_with_edms_recipe() -> None:
    for name in ("edm-cifar10-cond", "cifar10-cond", "cifar10-uncond", "cifar10-cond-2stage", "ffhq64", "edm-ffhq64"):
        config = get_config(name)
        assert config.preconditioning == "edm" and config.network.augment_dim == 9, name
        recipe = config.training
        assert (recipe.grad_clip, recipe.loss_weighting, recipe.ema_halflife_kimg) == (0.0, "pixels", 500.0), name
        assert recipe.augment_p == (0.15 if "ffhq" in name else 0.12), name
    assert get_config("fashion32").training == SMALL_CPU_RECIPE


def test_a_checkpoint_config_without_a_recipe_gets_the_old_one() -> None:
    """The embedded fashion32.pt predates the field: it continues with the recipe it was trained with."""
    data = config_to_dict(get_config("cifar10-cond"))
    assert config_from_dict(data).training == get_config("cifar10-cond").training  # round trip
    del data["training"]
    assert config_from_dict(data).training == SMALL_CPU_RECIPE
    assert load_model().config.training == SMALL_CPU_RECIPE


def test_a_bad_recipe_in_a_checkpoint_is_a_config_error() -> None:
    data = config_to_dict(get_config("fashion32"))
    for bad in ({"loss_weighting": "cubes"}, {"batch_size": "many"}, {"augment_p": 0.5}, {"mystery": 1}):
        data["training"] = {**SMALL_CPU_RECIPE.to_dict(), **bad}
        with pytest.raises(ConfigError) as caught:
            config_from_dict(data)
        assert caught.value.field == "config", bad
