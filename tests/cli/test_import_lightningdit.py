"""``lowdiff import-lightningdit``: the committed tiny LightningDiT + VA-VAE fixtures (written by the
reference code, scripts/make_latent_fixtures.py) become a checkpoint that computes the reference DiT,
decodes with the reference decoder, and samples, loads and serves as any latent model; bad files are
one line naming the flag, exit status 2, and nothing written."""

from __future__ import annotations

import base64
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lowdiff
from lowdiff.latent_import import load_vavae
from lowdiff.model import load_model
from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DIT, DIT_IO = FIXTURES / "lightningdit-tiny.pt", FIXTURES / "lightningdit-tiny-io.pt"
VAE, VAE_IO, STATS = FIXTURES / "vavae-tiny.pt", FIXTURES / "vavae-tiny-io.pt", FIXTURES / "latents_stats-tiny.pt"
COMMAND = "import-lightningdit"


def pair(out: Path, *extra: str, dit: Path = DIT, vae: Path = VAE, stats: Path = STATS) -> list[str]:
    return [COMMAND, "--dit", str(dit), "--vae", str(vae), "--stats", str(stats), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def imported(lowdiff_cli, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The baseline as .pt and the cascade as .safetensors (both formats, once each)."""
    folder = tmp_path_factory.mktemp("imported")
    paths = {"baseline": folder / "baseline.pt", "cascade": folder / "cascade.safetensors"}
    for kind, path in paths.items():
        result = lowdiff_cli(*pair(path, *(["--cascade"] if kind == "cascade" else [])))
        assert result.returncode == 0, result.stderr
        assert str(path) in result.stdout and "decoded to 16×16×3" in result.stdout
    return paths


def test_the_baseline_computes_lightningdits_forward_and_decodes_as_vavae(imported: dict[str, Path]) -> None:
    model = load_model(imported["baseline"])
    c = model.config
    assert c.resolutions == (8,) and c.preconditioning == "flow" and c.image_resolution == 16
    (stage,) = c.schedule.stages
    assert (stage.nfe, stage.shift, stage.guidance_scale, stage.guidance_start) == (100, 0.3, 10.0, 0.11)
    assert model.metadata["imported_from"] == "lightningdit" and model.metadata["dit_file"] == DIT.name
    dit_io = torch.load(DIT_IO, weights_only=True)
    with torch.no_grad():
        velocity = model.denoiser(dit_io["x"], dit_io["t"], dit_io["y"], 8)
    assert float((velocity - dit_io["out"]).abs().max()) <= 1e-5
    vae_io = torch.load(VAE_IO, weights_only=True)
    reference = load_vavae(VAE, STATS)
    assert c.autoencoder == model.decoder.config and c.autoencoder.z_channels == reference.config.z_channels
    with torch.no_grad():
        pixels = model.decoder(reference.normalize(vae_io["z"]))
    assert float((pixels - vae_io["out"]).abs().max()) <= 1e-4


def test_the_cascade_is_the_baseline_at_its_top_stage(lowdiff_cli, imported: dict[str, Path], tmp_path: Path) -> None:
    """Any condition, since the condition channels start at zero; the lower stage is fresh but the same
    on every import (a fixed seed), so an import is reproducible."""
    cascade, baseline = load_model(imported["cascade"]), load_model(imported["baseline"])
    assert cascade.config.resolutions == (4, 8) and [s.nfe for s in cascade.config.schedule.stages] == [45, 50]
    dit_io = torch.load(DIT_IO, weights_only=True)
    x, t, y = dit_io["x"], dit_io["t"], dit_io["y"]
    with torch.no_grad():
        top = cascade.denoiser(x, t, y, 8, torch.randn_like(x))
        assert torch.allclose(top, baseline.denoiser(x, t, y, 8), atol=1e-6)
        assert cascade.denoiser(x[:, :, :4, :4], t, y, 4).shape == (3, 4, 4, 4)
    again = tmp_path / "again.pt"
    assert lowdiff_cli(*pair(again, "--cascade")).returncode == 0
    for name, tensor in load_model(again).denoiser.state_dict().items():
        assert torch.equal(cascade.denoiser.state_dict()[name], tensor), name


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.array(image)


@pytest.mark.parametrize("kind", ["baseline", "cascade"])
def test_sample_gives_decoded_pixels_the_same_alone_or_in_a_batch(
    lowdiff_cli, imported: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    ckpt = str(imported[kind])
    common = ["--class-label", "3", "--threads", "1"]
    batch, alone = tmp_path / "batch", tmp_path / "alone"
    r = lowdiff_cli(
        "sample", "--checkpoint", ckpt, *common, "--seed", "5", "--num-images", "3", "--out-dir", str(batch)
    )
    assert r.returncode == 0, r.stderr
    r = lowdiff_cli("sample", "--checkpoint", ckpt, *common, "--seed", "6", "--out-dir", str(alone))
    assert r.returncode == 0, r.stderr
    images = [png_pixels(batch / f"class3_seed{s}.png") for s in (5, 6, 7)]
    assert images[0].shape == (16, 16, 3) and images[0].dtype == np.uint8
    assert not np.array_equal(images[0], images[1])
    np.testing.assert_array_equal(png_pixels(alone / "class3_seed6.png"), images[1])
    (image,) = lowdiff.load(imported[kind]).generate(class_labels=[3], seeds=[6])
    np.testing.assert_array_equal(np.array(image), images[1])


def test_serve_runs_the_imported_checkpoint(live_server, imported: dict[str, Path]) -> None:
    settings = ServeSettings(engine="torch", max_batch=2, checkpoint=imported["cascade"])
    with live_server(create_app(settings)) as srv, srv.wait_ready(120).client() as client:
        r = client.post("/generate", json={"class_label": 2, "seed": 4, "num_images": 1})
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["png_base64"]))) as png:
        served = np.array(png)
    expected = load_model(imported["cascade"]).generate([4], [2])[0]
    np.testing.assert_array_equal(served, expected.permute(1, 2, 0).numpy())


class RunsCode:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize(
    ("role", "kind"),
    [
        ("dit", "missing"),
        ("dit", "runs-code"),
        ("dit", "other-file"),
        ("dit", "edited"),
        ("vae", "other-file"),
        ("vae", "runs-code"),
        ("stats", "other-file"),
        ("stats", "wrong-channels"),
    ],
)
def test_refusals_are_one_line_naming_the_flag_exit_2_and_write_nothing(
    lowdiff_cli, tmp_path: Path, role: str, kind: str
) -> None:
    target = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    if kind == "runs-code":
        bad.write_bytes(pickle.dumps({"ema": RunsCode(target)}))
    elif kind == "other-file":
        bad = {"dit": VAE, "vae": DIT, "stats": VAE}[role]
    elif kind == "edited":
        payload = torch.load(DIT, weights_only=True)
        del payload["ema"]["blocks.1.attn.proj.bias"]
        torch.save(payload, bad)
    elif kind == "wrong-channels":
        torch.save({"mean": torch.zeros(1, 3, 1, 1), "std": torch.ones(1, 3, 1, 1)}, bad)
    out = tmp_path / "m.pt"
    result = lowdiff_cli(*pair(out, **{role: bad}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lowdiff {COMMAND}: error: --{role}: "), result.stderr
    assert not out.exists() and not target.exists()


def test_a_vae_of_other_latent_channels_is_refused(lowdiff_cli, tmp_path: Path) -> None:
    """The DiT's latents mean nothing to an autoencoder of another latent width: --vae, before writing."""
    payload = torch.load(DIT, weights_only=True)
    sd = payload["ema"]
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][:, :3].clone()
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:3].clone()
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"][:3].clone()
    dit = tmp_path / "dit3.pt"
    torch.save({"ema": sd}, dit)
    out = tmp_path / "m.pt"
    result = lowdiff_cli(*pair(out, dit=dit))
    assert result.returncode == 2 and not out.exists()
    assert "--vae: " in result.stderr and "4 latent channels" in result.stderr and "works on 3" in result.stderr


def test_out_must_be_pt_or_safetensors(lowdiff_cli, tmp_path: Path) -> None:
    result = lowdiff_cli(*pair(tmp_path / "m.onnx"))
    assert result.returncode == 2 and "--out:" in result.stderr and not (tmp_path / "m.onnx").exists()
