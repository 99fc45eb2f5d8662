"""lowdiff.model.load_config: a built-in name, a whole config as JSON, or a built-in base with overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowdiff.configs import BUILTIN_CONFIGS, get_config
from lowdiff.errors import ConfigError
from lowdiff.model import config_to_dict, load_config


def write(tmp_path: Path, data: object, name: str = "my.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_name_is_the_built_in_config() -> None:
    assert load_config("fashion32") == get_config("fashion32")


@pytest.mark.parametrize("name", list(BUILTIN_CONFIGS))
def test_every_built_in_config_round_trips_through_a_file(tmp_path: Path, name: str) -> None:
    original = get_config(name)
    assert load_config(write(tmp_path, config_to_dict(original))) == original


def test_a_base_with_overrides_merges_network_and_replaces_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, {
        "base": "fashion32", "name": "pets32", "class_names": ["cat", "dog", "rabbit"],
        "network": {"img_channels": 3, "label_dim": 3, "model_channels": 48},
    })  # fmt: skip
    config = load_config(path)
    base = get_config("fashion32")
    assert config.name == "pets32"
    assert config.class_names == ("cat", "dog", "rabbit") and config.num_classes == 3
    assert (config.network.img_channels, config.network.model_channels) == (3, 48)
    assert config.network.channel_mult == base.network.channel_mult  # merged, not replaced
    assert config.schedule == base.schedule and config.pad == base.pad


def test_changing_the_class_count_drops_the_base_names(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"base": "fashion32", "network": {"label_dim": 4}}))
    assert config.num_classes == 4 and config.class_names == ()
    same = load_config(write(tmp_path, {"base": "fashion32", "name": "renamed"}, "same.json"))
    assert same.class_names == get_config("fashion32").class_names


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"base": "fashion32", "colour": "blue"}, "unknown key(s) ['colour']"),
        ({"base": "nope"}, "base must be a built-in config"),
        ({"base": "fashion32", "class_names": ["a", "b"]}, "2 class names for 10 classes"),
        ({"base": "fashion32", "network": {"resolutions": [16, 32]}}, "schedule resolutions"),
        ({"base": "fashion32", "training": {"batch_size": 0}}, "batch size must be ≥ 1"),
        ([1, 2], "expected a JSON object"),
        # a hostile file must not make the loader allocate a network of 10^9 channels
        ({"base": "fashion32", "network": {"model_channels": 10**9}}, "network.model_channels must be an integer"),
        ({"base": "fashion32", "network": {"label_dim": "ten"}}, "network.label_dim must be an integer"),
        ({"base": "fashion32", "network": {"channel_mult": [1, 0]}}, "network.channel_mult must hold integers"),
        ({"base": "fashion32", "network": {"dropout": 2}}, "network.dropout must be a number in [0, 1)"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, data: object, words: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "config"
    assert str(path) in info.value.message and words in info.value.message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
