"""Engine folders are not trusted: stage files stay inside the folder and match their sha256."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lowdiff.engines import load_engine
from lowdiff.errors import ManifestError
from lowdiff.export.onnx_stages import export_onnx
from lowdiff.model import LowDiffModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[LowDiffModel, Path]:
    import torch

    from lowdiff.configs import ModelConfig, get_config
    from lowdiff.network import NetworkConfig

    torch.manual_seed(0)
    net = NetworkConfig(
        img_resolution=32, img_channels=1, label_dim=10, resolutions=(8, 16, 32), model_channels=8,
        channel_mult=(1, 1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0, augment_dim=0,
    )  # fmt: skip
    model = LowDiffModel(ModelConfig("tiny", net, get_config("fashion32").schedule, "edm", 2))
    folder = tmp_path_factory.mktemp("engines") / "onnx"
    export_onnx(model, folder)
    return model, folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_the_untouched_folder_loads(exported: tuple[LowDiffModel, Path]) -> None:
    model, folder = exported
    engine = load_engine(model, "onnxruntime", engine_dir=folder)
    assert set(engine.runners) == {8, 16, 32}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["stages"][0].update(file="../../../../etc/passwd"), "outside the engine folder"),
        (lambda m: m["stages"][0].update(file="/etc/passwd"), "outside the engine folder"),
        (lambda m: m["stages"][1].update(sha256="0" * 64), "stage16.onnx does not match its sha256"),
        (lambda m: m["stages"][1].pop("sha256"), "stage16.onnx has no sha256"),
        (lambda m: m["stages"][2].update(file="missing.onnx"), "missing.onnx is missing"),
        (lambda m: m.update(stages="nope"), "'stages' must be"),
    ],
    ids=["dotdot", "absolute", "zero-sha", "no-sha", "missing-file", "bad-stages"],
)
def test_a_tampered_manifest_is_refused(
    exported: tuple[LowDiffModel, Path], tmp_path: Path, edit, message: str
) -> None:
    model, folder = exported
    copy = _copy(folder, tmp_path)
    _edit_manifest(copy, edit)
    with pytest.raises(ManifestError, match=message) as caught:
        load_engine(model, "onnxruntime", engine_dir=copy)
    assert caught.value.field == "engine_dir"


def test_a_replaced_stage_file_is_refused(exported: tuple[LowDiffModel, Path], tmp_path: Path) -> None:
    model, folder = exported
    copy = _copy(folder, tmp_path)
    shutil.copy(copy / "stage16.onnx", copy / "stage32.onnx")  # another graph under the expected name
    with pytest.raises(ManifestError, match=r"stage32\.onnx does not match its sha256"):
        load_engine(model, "onnxruntime", engine_dir=copy)


def test_a_symlink_out_of_the_folder_is_refused(exported: tuple[LowDiffModel, Path], tmp_path: Path) -> None:
    model, folder = exported
    copy = _copy(folder, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / "stage8.onnx", outside)
    (copy / "stage8.onnx").symlink_to(outside)
    with pytest.raises(ManifestError, match="outside the engine folder"):
        load_engine(model, "onnxruntime", engine_dir=copy)
