"""Per-stage ONNX export: parity with PyTorch, only the stage's weights in its file, the manifest."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lowdiff.engines import load_engine
from lowdiff.errors import ManifestError
from lowdiff.export.manifest import read_manifest
from lowdiff.export.onnx_stages import StageGraph, example_inputs, export_onnx, stage_parameter_count
from lowdiff.hashing import weights_sha256
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def perturbed_tiny(tiny_config, seed: int = 0, label_dim: int = 10) -> LowDiffModel:
    """A tiny model whose zero-initialised output layers are perturbed, so outputs depend on inputs."""
    torch.manual_seed(seed)
    model = LowDiffModel(tiny_config(label_dim=label_dim))
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def model(tiny_config) -> LowDiffModel:
    return perturbed_tiny(tiny_config)


@pytest.fixture(scope="module")
def exported(model: LowDiffModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out)
    return out


@pytest.mark.parametrize("stage_index", [0, 1, 2])
def test_stage_parity_with_pytorch(model: LowDiffModel, exported: Path, stage_index: int) -> None:
    resolution = model.config.resolutions[stage_index]
    session = ort.InferenceSession(str(exported / f"stage{resolution}.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    graph = StageGraph(model.denoiser, resolution, names).eval()
    gen = torch.Generator().manual_seed(stage_index)
    for batch in (1, 7, 64):
        inputs = example_inputs(model, stage_index, batch, gen)
        with torch.no_grad():
            expected = graph(*inputs).numpy()
        (got,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        assert got.shape == (batch, 1, resolution, resolution)
        assert np.abs(got - expected).max() <= 1e-4
        # Not vacuous: the denoiser is far from the identity on these inputs.
        assert np.abs(expected - inputs[0].numpy()).max() > 1e-2


def test_each_file_holds_only_its_stage_weights(model: LowDiffModel, exported: Path) -> None:
    total = sum(p.numel() for p in model.denoiser.parameters())
    net = model.denoiser.net
    used = {r: set(net.stage_modules(r)) | {"map_label"} for r in model.config.resolutions}
    for r in model.config.resolutions:
        graph = onnx.load(str(exported / f"stage{r}.onnx")).graph
        elements = sum(int(np.prod(i.dims)) for i in graph.initializer)
        expected = stage_parameter_count(model, r)
        # A few folded constants (σ-embedding frequencies, the stage's resolution embedding) may be added.
        assert expected <= elements <= expected + 4 * model.config.network.model_channels
        for init in graph.initializer:
            if init.name.startswith("denoiser.net."):
                module = init.name.removeprefix("denoiser.net.").rsplit(".", 1)[0]
                assert any(module == m or module.startswith(m + ".") for m in used[r]), init.name
    assert stage_parameter_count(model, 8) < stage_parameter_count(model, 32) < total


def test_manifest_describes_the_export(model: LowDiffModel, exported: Path) -> None:
    manifest = read_manifest(exported, expected_format="onnx")
    assert manifest["config_name"] == model.config.name
    assert manifest["schedule"] == model.config.schedule.to_dict()
    assert manifest["weights_sha256"] == weights_sha256(model.denoiser.net)
    assert manifest["precision"] == "fp32" and manifest["opset"] >= 17
    assert manifest["batch"] == {"dynamic": True, "min": 1, "max": 64}
    assert manifest["exporter"]["versions"]["torch"] == torch.__version__
    assert manifest["exporter"]["versions"]["onnxruntime"] == ort.__version__
    assert [s["resolution"] for s in manifest["stages"]] == list(model.config.resolutions)
    for k, stage in enumerate(manifest["stages"]):
        path = exported / stage["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == stage["sha256"]
        names = [i["name"] for i in stage["inputs"]]
        expected = ["x", "sigma", "class_labels"] + (["condition", "sigma_cond"] if k else [])
        assert names == expected
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == names
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in stage["outputs"]] == ["denoised"]
        r = stage["resolution"]
        assert stage["inputs"][0]["shape"] == ["batch", 1, r, r]
        assert stage["nfe"] == model.config.schedule.stages[k].nfe


def test_unconditional_model_has_no_label_input(tiny_config, tmp_path: Path) -> None:
    model = perturbed_tiny(tiny_config, label_dim=0)
    manifest = export_onnx(model, tmp_path)
    assert [i["name"] for i in manifest["stages"][0]["inputs"]] == ["x", "sigma"]
    engine = load_engine(model, "onnxruntime", engine_dir=tmp_path)
    diff = (engine.generate([0, 1, 2]).int() - model.generate([0, 1, 2]).int()).abs().max()
    assert diff <= 2


def test_onnx_cascade_matches_pytorch_image_for_image(model: LowDiffModel, exported: Path) -> None:
    engine = load_engine(model, "onnxruntime", engine_dir=exported, warmup=True)
    seeds = list(range(10, 19))
    labels = [s % 10 for s in seeds]
    got = engine.generate(seeds, labels).int()
    expected = model.generate(seeds, labels).int()
    assert (got - expected).abs().max() <= 2
    assert (expected[0] - expected[1]).abs().max() > 5  # distinct images, so the comparison means something


def test_engine_refuses_a_folder_from_other_weights(model: LowDiffModel, exported: Path) -> None:
    other = LowDiffModel(model.config, copy.deepcopy(model.denoiser))
    with torch.no_grad():
        next(other.denoiser.parameters()).add_(1.0)
    with pytest.raises(ManifestError, match="other weights"):
        load_engine(other, "onnxruntime", engine_dir=exported)
