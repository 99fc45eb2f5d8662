"""A latent checkpoint through the command line: `lowdiff sample` writes decoded RGB images, `lowdiff
bench` times the decode stage like a stage, `lowdiff export` lists the decoder; and `lowdiff.load`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lowdiff
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def latent_checkpoint(tiny_latent_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("latent") / "tiny-latent.pt"
    tiny_latent_model(guidance_scale=2.0).save(path)
    return path


def test_sample_writes_decoded_rgb_images(lowdiff_cli, latent_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = lowdiff_cli("sample", "--checkpoint", str(latent_checkpoint), "--class-label", "3", "--seed", "5",
                    "--num-images", "2", "--out-dir", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["class3_seed5.png", "class3_seed6.png"]
    with Image.open(files[0]) as img:
        assert img.size == (16, 16) and img.mode == "RGB"
        pixels = np.array(img)
    expected = LowDiffModel.load(latent_checkpoint).generate([5], [3])[0]
    assert torch.equal(torch.from_numpy(pixels).permute(2, 0, 1), expected)


def test_python_api_gives_pil_images(latent_checkpoint: Path) -> None:
    pipe = lowdiff.load(latent_checkpoint)
    (image,) = pipe.generate(class_labels=[4], seeds=[9])
    assert image.size == (16, 16) and image.mode == "RGB"
    tensor = pipe.generate(class_labels=[4], seeds=[9], output_type="tensor")
    assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), tensor[0])


def test_bench_times_the_decode_stage(lowdiff_cli, latent_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = lowdiff_cli("bench", "--checkpoint", str(latent_checkpoint), "--engine", "torch", "--batch", "2",
                    "--runs", "2", "--threads", "1", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(out.read_text())["results"]
    stages = result["stages"]
    assert [s["resolution"] for s in stages] == [4, 8, 16]
    assert stages[-1]["stage"] == "decode" and stages[-1]["nfe"] == 0 and stages[-1]["latency_s_mean"] > 0
    assert result["nfe"] == sum(LowDiffModel.load(latent_checkpoint).config.schedule.nfe)
    assert "16 decode:" in out.with_suffix(".md").read_text()


def test_export_lists_the_decoder(lowdiff_cli, latent_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    r = lowdiff_cli("export", "--checkpoint", str(latent_checkpoint), "--format", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "decoder.onnx" in r.stdout and (out / "decoder.onnx").is_file()
    r = lowdiff_cli("export", "--checkpoint", str(latent_checkpoint), "--format", "tensorrt", "--out",
                    str(tmp_path / "trt"))  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--format" in r.stderr
