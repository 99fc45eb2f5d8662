"""EDM snapshots (tests/fixtures/edm/, made by NVlabs/edm's own code with scripts/make_edm_fixture.py)
read as data and mapped onto LowDiff: EDM's outputs and images reproduced, nothing in a file ever run."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lowdiff.configs import ModelConfig
from lowdiff.edm_import import EDMImportError, import_snapshot, init_from_edm, lowdiff_name
from lowdiff.errors import CheckpointError
from lowdiff.model import FunctionStage, LowDiffModel, TorchStage, load_model
from lowdiff.network import UnifiedUNet
from lowdiff.sampler import initial_noise, to_uint8
from lowdiff.schedule import CascadeSchedule, StageSchedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "edm"
INDEX = json.loads((FIXTURES / "index.json").read_text())["fixtures"]
IMPORTABLE = ("edm-cond16", "vp-uncond16")


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}-reference.npz") as data:
        return dict(data)


def draws_edm_noise() -> bool:
    """Whether lowdiff's starting noise is EDM's per-seed float32 draw (issue 13, part 1)."""
    schedule = CascadeSchedule((StageSchedule(8, 2),))
    ours = initial_noise([5], schedule, 1)[0][0]
    edm = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5)).to(torch.float64)
    return torch.equal(ours, edm)


@pytest.mark.parametrize("name", IMPORTABLE)
def test_config_is_rebuilt_from_the_pickled_constructor_arguments(name: str) -> None:
    kwargs, ref = INDEX[name]["kwargs"], reference(name)
    model = load_model(FIXTURES / INDEX[name]["pickle"])
    net = model.config.network
    assert (net.img_resolution, net.img_channels, net.label_dim) == (
        kwargs["img_resolution"],
        kwargs["img_channels"],
        kwargs["label_dim"],
    )
    assert net.resolutions == (kwargs["img_resolution"],)
    assert (net.model_channels, list(net.channel_mult), net.num_blocks) == (
        kwargs["model_channels"],
        kwargs["channel_mult"],
        kwargs["num_blocks"],
    )
    assert list(net.attn_resolutions) == kwargs["attn_resolutions"]
    assert (net.dropout, net.augment_dim) == (kwargs["dropout"], kwargs["augment_dim"])
    assert model.config.preconditioning == {"EDMPrecond": "edm", "VPPrecond": "vp"}[INDEX[name]["precond"]]
    (stage,) = model.config.schedule.stages
    assert (stage.num_steps, stage.truncate_at) == (18, None)
    assert (stage.sigma_min, stage.sigma_max) == (float(ref["sampler_sigma_min"]), float(ref["sampler_sigma_max"]))
    assert model.metadata["edm_precond"] == INDEX[name]["precond"]


@pytest.mark.parametrize("name", IMPORTABLE)
def test_network_outputs_match_edm(name: str) -> None:
    """The SongUNet's own output F within 1e-5 of EDM's at σ from 0.002 to 80; D(x; σ) through the
    preconditioning too (for VP, c_out = −σ scales F's float32 error by σ, so 1e-5·σ)."""
    ref = reference(name)
    model = load_model(FIXTURES / INDEX[name]["pickle"])
    x, sigma = torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"])
    labels = torch.from_numpy(ref["labels"]) if model.config.conditional else None
    res = model.config.network.img_resolution
    denoiser = model.denoiser
    with torch.no_grad():
        _, _, c_in, c_noise = denoiser.coefficients(sigma)
        f = denoiser.net(c_in[:, None, None, None] * x, c_noise, labels, res)
        d = denoiser(x, sigma, labels, res)
    f_ref, d_ref = torch.from_numpy(ref["model_output"]), torch.from_numpy(ref["denoised"])
    assert f_ref.abs().amax() > 0.1  # a network that says something (the fixture's weights are randomised)
    assert (f - f_ref).abs().amax() <= 1e-5
    tolerance = 1e-5 * (sigma.clamp(min=1) if model.config.preconditioning == "vp" else torch.ones_like(sigma))
    assert ((d - d_ref).abs().flatten(1).amax(1) <= tolerance).all()


@pytest.mark.parametrize("name", IMPORTABLE)
def test_heun_from_edms_latents_draws_edms_images(name: str) -> None:
    """EDM's sampler trajectory from EDM's own starting noise: the same uint8 images within 1 level."""
    ref = reference(name)
    model = load_model(FIXTURES / INDEX[name]["pickle"])
    (stage,) = model.config.schedule.stages
    labels = torch.from_numpy(ref["image_labels"]) if model.config.conditional else None
    runner = FunctionStage(TorchStage(model.denoiser, stage.resolution))
    x = runner.run_stage(stage, torch.from_numpy(ref["latents"]).to(torch.float64), labels, None, None)
    ours = to_uint8(x).permute(0, 2, 3, 1).numpy().astype(int)
    edm = ref["images"].astype(int)
    assert np.abs(ours - edm).max() <= 1
    assert len(np.unique(edm)) > 20  # images, not a constant


@pytest.mark.skipif(not draws_edm_noise(), reason="starting noise is not EDM's per-seed float32 draw yet (part 1)")
@pytest.mark.parametrize("name", IMPORTABLE)
def test_generate_by_seed_draws_edms_images(name: str) -> None:
    ref = reference(name)
    model = load_model(FIXTURES / INDEX[name]["pickle"])
    labels = [int(v) for v in ref["image_labels"]] if model.config.conditional else None
    images = model.generate([int(s) for s in ref["seeds"]], labels)
    ours = images.permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(ours - ref["images"].astype(int)).max() <= 1


def test_saved_checkpoint_is_an_ordinary_lowdiff_checkpoint(tmp_path: Path) -> None:
    imported = import_snapshot(FIXTURES / "edm-cond16.pkl")
    model = LowDiffModel(imported.config)
    model.denoiser.net.load_state_dict(imported.state_dict)
    model.metadata = imported.metadata
    for suffix in (".pt", ".safetensors"):
        model.save(tmp_path / f"m{suffix}")
        again = load_model(tmp_path / f"m{suffix}")
        assert again.config == model.config
        for key, value in model.denoiser.net.state_dict().items():
            assert torch.equal(again.denoiser.net.state_dict()[key], value), key
        assert again.metadata["edm_snapshot_sha256"] == imported.metadata["edm_snapshot_sha256"]


@pytest.mark.parametrize(
    ("name", "names"),
    [
        ("dhariwal8", "DhariwalUNet"),
        ("ncsnpp8", "VEPrecond"),
        ("songunet-extra8", "map_resolution.weight"),
    ],
)
def test_networks_lowdiff_cannot_place_are_refused_naming_the_part(name: str, names: str) -> None:
    with pytest.raises(EDMImportError) as info:
        load_model(FIXTURES / INDEX[name]["pickle"])
    assert names in info.value.message and info.value.field == "checkpoint"
    assert "\n" not in info.value.one_line()


class RunsCode:
    """A pickle payload that, loaded by ``pickle``, runs a shell command (creates a file)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "network-snapshot-000000.pkl"
    evil.write_bytes(pickle.dumps({"ema": RunsCode(target)}))
    with pytest.raises(EDMImportError, match=r"refusing global (posix|os|nt)\.system"):
        load_model(evil)
    assert not target.exists()
    pickle.loads(evil.read_bytes())  # the payload is live: plain pickle runs it
    assert target.exists()


def edm_shaped_pickle(meta: dict, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Bytes as EDM's persistence writes them: a call of torch_utils.persistence._reconstruct_persistent_obj(meta)."""

    def reconstruct(meta: dict) -> None:  # what EDM's loader would do: exec(meta["module_src"])
        exec(meta["module_src"], {})

    reconstruct.__module__, reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = reconstruct  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)

    class Persistent:
        def __reduce__(self):
            return (reconstruct, (meta,))

    return pickle.dumps({"ema": Persistent()}, protocol=4)


def test_persistent_source_code_is_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "from-module-src"
    meta = {
        "type": "class",
        "version": 6,
        "module_src": f"open({str(target)!r}, 'w').close()\nclass EDMPrecond: pass\n",
        "class_name": "EDMPrecond",
        "state": {"_modules": {}},
    }
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(edm_shaped_pickle(meta, monkeypatch))
    assert b"torch_utils.persistence" in path.read_bytes()
    with pytest.raises(EDMImportError, match="without a model network"):
        load_model(path)
    assert not target.exists()
    pickle.loads(path.read_bytes())  # EDM's way of loading it runs the source: the payload is live
    assert target.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01 not a pickle", "not a readable EDM snapshot"),
        (pickle.dumps({"weights": [1, 2, 3]}), "no 'ema' network"),
        (pickle.dumps([1.0, "x"]), "no 'ema' network"),
        (b"", "not a readable EDM snapshot"),
        (pickle.dumps({"s": {1, 2}, "b": b"\xff", "f": frozenset()}, protocol=2), "no 'ema' network"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00rot_13\x86R.", "_codecs.encode other"),
    ],
)
def test_files_that_are_not_snapshots_are_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_a_lowdiff_checkpoint_named_pkl_is_not_unpickled_as_code(tmp_path: Path, tiny_model: LowDiffModel) -> None:
    """torch.save's zip is not a plain pickle: refused (it is not EDM's), not loaded some other way."""
    path = tmp_path / "model.pkl"
    tiny_model.save(tmp_path / "model.pt")
    (tmp_path / "model.pt").rename(path)
    with pytest.raises(EDMImportError, match="not a readable EDM snapshot"):
        load_model(path)


def test_edm_names_map_onto_lowdiff_names() -> None:
    assert lowdiff_name("enc.32x32_conv.weight") == "inputs.32.weight"
    assert lowdiff_name("enc.16x16_down.conv0.bias") == "encoder.16x16_down.conv0.bias"
    assert lowdiff_name("dec.32x32_aux_norm.weight") == "outputs.32.norm.weight"
    assert lowdiff_name("dec.32x32_aux_conv.bias") == "outputs.32.conv.bias"
    assert lowdiff_name("dec.8x8_in0.qkv.weight") == "decoder.8x8_in0.qkv.weight"
    assert lowdiff_name("map_noise.freqs") is None


# --- LowDiff from EDM (--init-from-edm) ---------------------------------------------------------


def lowdiff_config_over(name: str, resolutions: tuple[int, ...], **changes) -> ModelConfig:
    """A multi-resolution LowDiff config whose shared U-Net is the EDM fixture's."""
    imported = load_model(FIXTURES / INDEX[name]["pickle"]).config
    stages = tuple(StageSchedule(r, 4, truncate_at=2 if r != resolutions[-1] else None) for r in resolutions)
    network = replace(imported.network, resolutions=resolutions, **changes)
    return replace(imported, name="tiny-from-edm", network=network, schedule=CascadeSchedule(stages))


def test_init_from_edm_copies_the_unet_and_keeps_resolution_layers_fresh() -> None:
    config = lowdiff_config_over("edm-cond16", (8, 16))
    torch.manual_seed(0)
    initial = UnifiedUNet(config.network).state_dict()
    start = init_from_edm(FIXTURES / "edm-cond16.pkl", config, initial)
    edm = import_snapshot(FIXTURES / "edm-cond16.pkl").state_dict
    assert set(start.copied) | set(start.fresh) == set(initial)
    assert {n.split(".")[0] for n in start.fresh} == {"inputs", "outputs", "map_resolution"}
    assert any(n.startswith("encoder.") for n in start.copied) and "map_label.weight" in start.copied
    for name in start.copied:
        assert torch.equal(start.state_dict[name], edm[name]), name
        assert not torch.equal(start.state_dict[name], initial[name]), name
    for name in start.fresh:
        assert torch.equal(start.state_dict[name], initial[name]), name
    net = UnifiedUNet(config.network)
    net.load_state_dict(start.state_dict)  # a complete, loadable LowDiff network


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("vp-uncond16", {}, "preconditioning VPPrecond vs the config's 'edm'"),
        ("edm-cond16", {"model_channels": 16}, "model_channels 8 vs the config's 16"),
        ("edm-cond16", {"attn_resolutions": (16,)}, "attn_resolutions"),
    ],
)
def test_init_from_edm_refuses_a_network_that_does_not_fit(name: str, changes: dict, message: str) -> None:
    config = lowdiff_config_over("edm-cond16", (8, 16), **changes)
    with pytest.raises(EDMImportError, match=re.escape(message)) as info:
        init_from_edm(FIXTURES / INDEX[name]["pickle"], config, UnifiedUNet(config.network).state_dict())
    assert info.value.field == "init_from_edm"
