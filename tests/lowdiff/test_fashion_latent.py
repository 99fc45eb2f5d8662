"""The latent path end to end on a tiny scale: `lowdiff train-autoencoder` → `lowdiff encode-latents` →
`lowdiff train --autoencoder` on fashion32-latent shrunk by a JSON override → a checkpoint that
`LowDiffModel.load` turns into 32×32 grey images; plus the one-line refusals along the way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowdiff.autoencoder import LatentDecoder
from lowdiff.autoencoder_training import load_autoencoder, save_autoencoder
from lowdiff.configs import FASHION_AE_F4C4, get_config
from lowdiff.errors import CheckpointError
from lowdiff.hashing import file_sha256
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLOW = {"solver": "flow_euler", "shift": 1.0, "guidance_scale": 1.5, "guidance_start": 0.1, "guidance_channels": None}
TINY_AE = {
    "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "z_channels": 4, "in_channels": 1, "out_channels": 1,
    "encoder_attn_levels": [], "decoder_attn_levels": [],
}  # fmt: skip


def tiny_config(path: Path, autoencoder: dict | None = None) -> Path:
    """fashion32-latent with a width-32 one-block DiT, a tiny f4 autoencoder and 2 + 3 Euler steps."""
    path.write_text(json.dumps({
        "base": "fashion32-latent", "name": "tiny-fashion-latent",
        "network": {"hidden_size": 32, "depth": 1, "num_heads": 2},
        "autoencoder": autoencoder or TINY_AE,
        "schedule": {"stages": [dict(resolution=4, num_steps=4, truncate_at=2, **FLOW),
                                dict(resolution=8, num_steps=3, **FLOW)]},
        "training": {"batch_size": 8, "lr_rampup_kimg": 0.0, "ema_halflife_kimg": 0.001},
    }))  # fmt: skip
    return path


def one_line_error(result, flag: str, words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{flag}: " in lines[0] and words in lines[0], lines[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, lowdiff_cli) -> dict[str, Path]:
    """The three commands run once (3 steps each): 40 random 28×28 images, the last of each class held out."""
    root = tmp_path_factory.mktemp("latent-e2e")
    rng = np.random.default_rng(0)
    data = root / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), labels=np.repeat(np.arange(10), 4))
    config = tiny_config(root / "tiny.json")
    ae, latents, final = root / "ae" / "autoencoder.pt", root / "latents.pt", root / "final.pt"
    common = ("--holdout-per-class", "1", "--threads", "1", "--quiet")
    r = lowdiff_cli("train-autoencoder", "--config", str(config), "--data", str(data), "--run-dir", str(root / "ae"),
                    "--kimg", "0.024", "--batch-size", "8", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(ae)
    r = lowdiff_cli("encode-latents", "--autoencoder", str(ae), "--data", str(data), "--out", str(latents), *common)
    assert r.returncode == 0, r.stderr
    r = lowdiff_cli("train", "--config", str(config), "--data", str(latents), "--autoencoder", str(ae),
                    "--run-dir", str(root / "run"), "--kimg", "0.024", "--grid-every", "0", "--threads", "1",
                    "--export", str(final), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {"root": root, "data": data, "config": config, "ae": ae, "latents": latents, "final": final}


def test_the_autoencoder_file_holds_statistics_and_reconstruction_error(pipeline: dict[str, Path]) -> None:
    source = load_autoencoder(pipeline["ae"])
    meta = source.metadata
    assert (source.pad, source.image_resolution) == (2, 32)
    assert (meta["step"], meta["training_images"], meta["train_images"], meta["held_out_images"]) == (3, 24, 30, 10)
    assert set(meta["held_out_reconstruction"]) == {"l1", "mse", "psnr_db"}
    assert meta["held_out_reconstruction"]["l1"] > 0
    assert meta["latent_std"] == pytest.approx(source.autoencoder.latent_std.flatten().tolist(), rel=1e-4)
    assert meta["recipe"]["kl_weight"] == 1e-4 and meta["data"] == "tiny.npz"


def test_encoded_latents_are_the_training_split_normalised(pipeline: dict[str, Path]) -> None:
    data = torch.load(pipeline["latents"], weights_only=True)
    latents, labels = data["latents"], data["labels"]
    assert latents.shape == (30, 4, 8, 8) and latents.dtype == torch.float32
    assert torch.equal(labels, torch.repeat_interleave(torch.arange(10), 3))  # the last of each class held out
    assert data["autoencoder_sha256"] == file_sha256(pipeline["ae"])
    # The statistics were taken over these very images: each channel comes out with mean 0 and std 1.
    per_channel = latents.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(per_channel.std(dim=1, unbiased=False), torch.ones(4), atol=1e-3)


def test_the_trained_latent_model_decodes_with_the_trained_autoencoder(pipeline: dict[str, Path]) -> None:
    model = LowDiffModel.load(pipeline["final"])
    assert model.config.name == "tiny-fashion-latent" and model.metadata["step"] == 3
    assert model.metadata["autoencoder_sha256"] == file_sha256(pipeline["ae"])
    expected = LatentDecoder.from_autoencoder(load_autoencoder(pipeline["ae"]).autoencoder).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.decoder.state_dict().items())
    images = model.generate([0, 1], [3, 7])
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 32, 32)
    assert torch.equal(images, LowDiffModel.load(pipeline["final"]).generate([0, 1], [3, 7]))  # same seeds
    assert not torch.equal(images[0], model.generate([2], [3])[0])  # another seed, another image


def test_sample_writes_32_pixel_pngs(pipeline: dict[str, Path], lowdiff_cli, tmp_path: Path) -> None:
    from PIL import Image

    r = lowdiff_cli("sample", "--checkpoint", str(pipeline["final"]), "--class-label", "2", "--num-images", "1",
                    "--out-dir", str(tmp_path), "--threads", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "class2_seed0.png") as png:
        assert png.size == (32, 32) and png.mode == "L"


def test_serve_answers_with_32_pixel_grey_images(pipeline: dict[str, Path], live_server) -> None:
    import base64
    import io

    from PIL import Image

    from lowdiff.service.app import create_app
    from lowdiff.service.settings import ServeSettings

    model = LowDiffModel.load(pipeline["final"])
    with live_server(create_app(ServeSettings(engine="torch", max_batch=2), model=model)) as srv:
        with srv.wait_ready(120).client() as client:
            info = client.get("/v1/models").json()
            r = client.post("/generate", json={"class_label": 4, "seed": 9, "num_images": 1})
    assert (info["image_channels"], info["image_resolution"]) == (1, 32)
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["png_base64"]))) as png:
        pixels = np.asarray(png)
    assert pixels.shape == (32, 32)
    np.testing.assert_array_equal(pixels, model.generate([9], [4])[0, 0].numpy())


def test_eval_scores_the_decoded_images_of_a_latent_model(
    pipeline: dict[str, Path], lowdiff_cli, tmp_path: Path
) -> None:
    """`lowdiff eval` scores what the pipeline returns (1×32² pixels) with the 1×32² Fashion classifier,
    not the 4×8² latent grid (which the classifier would refuse)."""
    out = tmp_path / "eval.json"
    r = lowdiff_cli("eval", "--checkpoint", str(pipeline["final"]), "--reference", str(pipeline["data"]),
                    "--holdout-per-class", "1", "--num-samples", "10", "--batch-size", "5", "--threads", "1",
                    "--json", str(out), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-fashion-latent" and report["num_samples"] == 10
    assert report["nfe"] == [2, 3] and 0.0 <= report["class_agreement"] <= 1.0
    assert np.isfinite(report["fd"]) and report["fd"] > 0


def test_autoencoder_training_resumes_exactly(pipeline: dict[str, Path], lowdiff_cli, tmp_path: Path) -> None:
    def run(run_dir: Path, kimg: str, *extra: str):
        return lowdiff_cli("train-autoencoder", "--config", str(pipeline["config"]), "--data", str(pipeline["data"]),
                           "--run-dir", str(run_dir), "--holdout-per-class", "1", "--kimg", kimg, "--threads", "1",
                           "--quiet", *extra)  # fmt: skip

    # Started with batch 8 and stopped after 2 steps, resumed without the flag: the stored recipe goes on.
    assert run(tmp_path / "split", "0.016", "--batch-size", "8").returncode == 0
    one_line_error(run(tmp_path / "split", "0.024"), "--run-dir", "--resume")
    assert run(tmp_path / "split", "0.024", "--resume").returncode == 0
    resumed = torch.load(tmp_path / "split" / "autoencoder.pt", weights_only=True)
    straight = torch.load(pipeline["ae"], weights_only=True)
    assert resumed["metadata"]["step"] == 3
    assert all(torch.equal(v, straight["state_dict"][k]) for k, v in resumed["state_dict"].items())


def test_a_latent_run_must_name_its_autoencoder(pipeline: dict[str, Path], lowdiff_cli, tmp_path: Path) -> None:
    args = ("train", "--config", str(pipeline["config"]), "--data", str(pipeline["latents"]), "--kimg", "0.008",
            "--grid-every", "0", "--threads", "1", "--quiet")  # fmt: skip
    one_line_error(lowdiff_cli(*args, "--run-dir", str(tmp_path / "a")), "--autoencoder", "latent config")
    # An autoencoder file other than the one that encoded the latents (here: same weights, other metadata).
    other = tmp_path / "other.pt"
    source = load_autoencoder(pipeline["ae"])
    save_autoencoder(source.autoencoder, other, source.pad, source.image_resolution, {"note": "another run"})
    r = lowdiff_cli(*args, "--run-dir", str(tmp_path / "b"), "--autoencoder", str(other))
    one_line_error(r, "--data", "encoded by another autoencoder")
    # An autoencoder of another shape than the config's.
    wider = tiny_config(tmp_path / "wider.json", TINY_AE | {"ch": 64})
    r = lowdiff_cli("train", "--config", str(wider), "--data", str(pipeline["latents"]), "--kimg", "0.008",
                    "--grid-every", "0", "--threads", "1", "--quiet", "--run-dir", str(tmp_path / "c"),
                    "--autoencoder", str(pipeline["ae"]))  # fmt: skip
    one_line_error(r, "--autoencoder", "is not the one tiny-fashion-latent is built for")
    r = lowdiff_cli("train-autoencoder", "--config", "fashion32", "--data", str(pipeline["data"]),
                    "--run-dir", str(tmp_path / "d"), "--quiet")  # fmt: skip
    one_line_error(r, "--config", "pixel config")


def _nan_weight(payload: dict) -> None:
    payload["state_dict"]["decoder.conv_out.bias"] = torch.full_like(payload["state_dict"]["decoder.conv_out.bias"],
                                                                     float("nan"))  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: p.update(format="something-else"), "not a LowDiff autoencoder file"),
        (lambda p: p["state_dict"].pop("decoder.conv_out.weight"), "missing 1"),
        (lambda p: p["autoencoder"].update(ch=33), "multiple of 32"),
        (_nan_weight, "not finite"),
        (lambda p: p["state_dict"]["latent_std"].zero_(), "std must be positive"),
        (lambda p: p.update(pad=-1), "pad must be"),
        (lambda p: p.update(image_resolution=30), "image_resolution must be"),
    ],
)
def test_a_bad_autoencoder_file_is_one_line(
    pipeline: dict[str, Path], lowdiff_cli, tmp_path: Path, damage, words: str
) -> None:
    payload = torch.load(pipeline["ae"], weights_only=True)
    damage(payload)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError) as caught:
        load_autoencoder(bad)
    assert caught.value.field == "autoencoder" and words in caught.value.message
    r = lowdiff_cli("encode-latents", "--autoencoder", str(bad), "--data", str(pipeline["data"]),
                    "--out", str(tmp_path / "x.pt"), "--quiet")  # fmt: skip
    one_line_error(r, "--autoencoder", words)


def test_fashion32_latent_configs() -> None:
    cascade, baseline = get_config("fashion32-latent"), get_config("fashion32-latent-baseline")
    assert cascade.schedule.nfe == (16, 16) and baseline.schedule.nfe == (32,)
    assert cascade.schedule.stages[0].handoff_level == 0.5
    assert cascade.resolutions == (4, 8) and baseline.resolutions == (8,)
    same = ("img_resolution", "img_channels", "label_dim", "hidden_size", "depth", "num_heads", "mlp_ratio")
    assert all(getattr(cascade.network, f) == getattr(baseline.network, f) for f in same)
    for config in (cascade, baseline):
        assert config.autoencoder == FASHION_AE_F4C4 and config.latent and config.conditional
        assert (config.image_resolution, config.image_channels, config.pad) == (32, 1, 2)
        assert config.class_names == get_config("fashion32").class_names
