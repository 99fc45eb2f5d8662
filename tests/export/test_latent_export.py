"""A latent model's ONNX export: one graph per DiT stage plus the decode stage, listed (with sha256) in
the manifest; each graph equals eager PyTorch to 1e-4; a folder whose decoder was replaced is refused."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lowdiff.engines import load_engine
from lowdiff.errors import ManifestError
from lowdiff.export.manifest import read_manifest
from lowdiff.export.onnx_stages import StageGraph, example_inputs, export_onnx
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_latent_model) -> LowDiffModel:
    return tiny_latent_model(guidance_scale=2.0)


@pytest.fixture(scope="module")
def exported(model: LowDiffModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-latent")
    export_onnx(model, out)
    return out


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_manifest_lists_the_dit_stages_and_the_decoder(model: LowDiffModel, exported: Path) -> None:
    manifest = read_manifest(exported, expected_format="onnx")
    assert [s["file"] for s in manifest["stages"]] == ["stage4.onnx", "stage8.onnx"]
    # A flow stage takes the flow time as "sigma" and has no "sigma_cond" (the DiT has no such input).
    assert [i["name"] for i in manifest["stages"][1]["inputs"]] == ["x", "sigma", "class_labels", "condition"]
    decoder = manifest["decoder"]
    assert decoder["file"] == "decoder.onnx" and decoder["resolution"] == 16 and decoder["latent_resolution"] == 8
    assert decoder["sha256"] == hashlib.sha256((exported / "decoder.onnx").read_bytes()).hexdigest()
    assert decoder["parameters"] == sum(p.numel() for p in model.decoder.parameters())
    assert decoder["outputs"][0]["shape"] == ["batch", 3, 16, 16]


@pytest.mark.parametrize("stage_index", [0, 1])
def test_dit_stage_parity_with_pytorch(model: LowDiffModel, exported: Path, stage_index: int) -> None:
    resolution = model.config.resolutions[stage_index]
    sess = session(exported / f"stage{resolution}.onnx")
    names = [i.name for i in sess.get_inputs()]
    graph = StageGraph(model.denoiser, resolution, names).eval()
    gen = torch.Generator().manual_seed(stage_index)
    for batch in (1, 5, 16):
        inputs = example_inputs(model, stage_index, batch, gen)
        with torch.no_grad():
            expected = graph(*inputs).numpy()
        (got,) = sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        assert got.shape == (batch, 4, resolution, resolution)
        assert np.abs(expected).max() > 0.1  # a velocity that depends on the input, not zeros
        assert np.abs(got - expected).max() <= 1e-4


def test_decoder_parity_with_pytorch(model: LowDiffModel, exported: Path) -> None:
    sess = session(exported / "decoder.onnx")
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 6):
        latents = torch.randn(batch, 4, 8, 8, generator=gen)
        with torch.no_grad():
            expected = model.decoder(latents).numpy()
        (got,) = sess.run(None, {"latents": latents.numpy()})
        assert got.shape == (batch, 3, 16, 16)
        assert np.abs(got - expected).max() <= 1e-4


def test_folder_with_a_replaced_decoder_is_refused(model: LowDiffModel, exported: Path, tmp_path: Path) -> None:
    # Other decoder weights, same DiT: the manifest's decoder fingerprint differs.
    other = LowDiffModel(model.config, model.denoiser, copy.deepcopy(model.decoder))
    with torch.no_grad():
        next(other.decoder.parameters()).add_(1.0)
    with pytest.raises(ManifestError, match="decoder"):
        load_engine(other, "onnxruntime", engine_dir=exported)
    # A modified decoder file: its bytes no longer match the manifest's sha256.
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in exported.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    with open(folder / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        load_engine(model, "onnxruntime", engine_dir=folder)
