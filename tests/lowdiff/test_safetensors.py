"""``.safetensors`` checkpoints: the weights as tensors, the config and metadata as JSON in the header,
chosen by the file name's extension; ``.pt`` unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowdiff.errors import CheckpointError
from lowdiff.model import CHECKPOINT_FORMAT, LowDiffModel, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_round_trip_keeps_weights_config_metadata_and_images(tiny_model: LowDiffModel, tmp_path: Path) -> None:
    tiny_model.metadata = {"step": 7, "note": "ünïcode"}
    path = tmp_path / "model.safetensors"
    tiny_model.save(path)
    again = load_model(path)
    assert again.config == tiny_model.config
    ours, theirs = tiny_model.denoiser.net.state_dict(), again.denoiser.net.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again.metadata["step"] == 7 and again.metadata["note"] == "ünïcode"
    assert torch.equal(again.generate([3], [1]), tiny_model.generate([3], [1]))


def test_the_file_is_plain_safetensors_that_other_tools_read(tiny_model: LowDiffModel, tmp_path: Path) -> None:
    """diffusers-style readers get the tensors by name; the header says what LowDiff needs."""
    path = tmp_path / "model.safetensors"
    tiny_model.save(path)
    tensors = load_file(path)
    assert set(tensors) == set(tiny_model.denoiser.net.state_dict())
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    meta = json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"]
    assert meta["format"] == CHECKPOINT_FORMAT
    assert json.loads(meta["config"])["name"] == tiny_model.config.name
    assert not path.read_bytes().startswith(b"PK")  # not torch.save's zip under another name


def test_pt_stays_torch_save(tiny_model: LowDiffModel, tmp_path: Path) -> None:
    tiny_model.save(tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes()[:2] == b"PK"


def test_safetensors_without_lowdiff_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a LowDiff checkpoint") as info:
        load_model(path)
    assert info.value.field == "checkpoint"


@pytest.mark.parametrize("content", [b"", b"\xff" * 64, b"{not json"])
def test_garbage_safetensors_is_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"not a readable \.safetensors file"):
        load_model(path)


def test_wrong_weights_in_a_safetensors_are_named(tiny_model: LowDiffModel, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tiny_model.save(path)
    tensors = load_file(path)
    tensors.pop("map_layer0.weight")
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    meta = json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing 1 .*map_layer0\.weight"):
        load_model(path)
