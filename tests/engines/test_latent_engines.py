"""Latent (flow + decode) models through the engines: pixels, never latents; per-seed determinism;
the stage-at-a-time path of the service equals whole-cascade generation; engines without flow stages refuse."""

from __future__ import annotations

import pytest
import torch

from lowdiff.engines import load_engine
from lowdiff.errors import SettingsError
from lowdiff.sampler import to_uint8

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEEDS = [3, 11, 42, 7]
LABELS = [0, 5, 9, 5]


@pytest.fixture(scope="module")
def guided(tiny_latent_model):
    """The tiny latent cascade (4×4 → 8×8 latents, 16×16 RGB images) with guidance on."""
    return tiny_latent_model(guidance_scale=2.5)


def test_generate_returns_decoded_uint8_pixels_timed_per_stage(guided) -> None:
    engine = load_engine(guided, "torch")
    times: dict[int, float] = {}
    images = engine.generate(SEEDS, LABELS, on_stage=lambda r, s: times.setdefault(r, s))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)  # RGB 16×16, not 4×8×8 latents
    assert sorted(times) == [4, 8, 16]  # two latent stages, then the decode stage at the image's size
    assert images.float().std() > 5  # not a constant image
    info = engine.info()
    assert (info.image_channels, info.image_resolution) == (3, 16)
    # The engine's images are the model's reference images (eager, CPU), which decode the same latents.
    assert torch.equal(images, guided.generate(SEEDS, LABELS))


def test_an_image_depends_only_on_its_class_and_seed(guided) -> None:
    engine = load_engine(guided, "torch")
    together = engine.generate(SEEDS, LABELS)
    for i, (seed, label) in enumerate(zip(SEEDS, LABELS)):
        assert torch.equal(engine.generate([seed], [label])[0], together[i])
    assert not torch.equal(together[1], together[3])  # same class, other seed: other pixels


def test_stage_at_a_time_equals_whole_cascade(guided) -> None:
    """What the service's stage scheduler runs (stage_noise, run_stage per stage, to_uint8) gives the
    pixels of generate: the hand-off level is the flow time, the last stage decodes."""
    engine = load_engine(guided, "torch")
    noise = engine.stage_noise(SEEDS)
    x, level, times = None, None, []
    for k in range(len(guided.config.schedule.stages)):
        x, level = engine.run_stage(k, noise[k], LABELS, x, level, on_stage=lambda r, s: times.append(r))
        if k == 0:
            assert level == guided.config.schedule.stages[0].handoff_level and 0 < level < 1
    assert level is None and times == [4, 8, 16]
    assert torch.equal(to_uint8(x), engine.generate(SEEDS, LABELS))


def test_preview_of_a_flow_hand_off_is_a_decoded_image(guided) -> None:
    engine = load_engine(guided, "torch")
    noise = engine.stage_noise(SEEDS[:2])
    x, _ = engine.run_stage(0, noise[0], LABELS[:2], None, None)
    preview = engine.denoised_preview(0, x, LABELS[:2], None, None)
    assert preview.shape == (2, 3, 16, 16) and preview.dtype == torch.float64
    assert torch.isfinite(preview).all()


@pytest.mark.parametrize("kind", ["cudagraph", "tensorrt"])
def test_engines_without_flow_stages_refuse_a_latent_model(guided, kind: str) -> None:
    with pytest.raises(SettingsError, match="latent model runs on torch, onnxruntime, compile") as err:
        load_engine(guided, kind, "cuda")
    assert err.value.field == "engine"


def test_onnxruntime_engine_matches_torch(guided) -> None:
    """The exported DiT stages and decoder under ONNX Runtime: the same images as eager PyTorch, up to
    one level of rounding where fp32 kernels differ."""
    pytest.importorskip("onnxruntime")
    ort = load_engine(guided, "onnxruntime")
    times: dict[int, float] = {}
    images = ort.generate(SEEDS, LABELS, on_stage=lambda r, s: times.setdefault(r, s))
    reference = load_engine(guided, "torch").generate(SEEDS, LABELS)
    assert sorted(times) == [4, 8, 16]
    assert images.shape == reference.shape
    assert (images.int() - reference.int()).abs().max() <= 1
    assert torch.equal(ort.generate([SEEDS[2]], [LABELS[2]])[0], images[2])
