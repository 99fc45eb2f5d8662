"""lowdiff.augment: EDM's non-leaking augmentation — identity at p = 0, zero labels for untouched
images, the transforms' geometry, their frequencies, and a network that takes the labels."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lowdiff.augment import AUGMENT_LABELS, AugmentPipe
from lowdiff.errors import ConfigError
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int = 6, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _params(n: int, **columns: float) -> torch.Tensor:
    names = ("xflip", "yflip", "scale", "theta", "aniso", "aniso_r", "tx", "ty")
    params = torch.zeros(n, len(names))
    for name, value in columns.items():
        params[:, names.index(name)] = value
    return params


def test_p0_is_the_identity_with_zero_labels() -> None:
    x = _images()
    out, labels = AugmentPipe(0.0)(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, x)
    assert labels.shape == (6, AUGMENT_LABELS) and torch.count_nonzero(labels) == 0


def test_shapes_and_dtype() -> None:
    x = _images(5, 1, 32)
    out, labels = AugmentPipe(1.0)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert labels.shape == (5, 9) and labels.dtype == torch.float32
    assert AugmentPipe(1.0).sample(7, torch.Generator().manual_seed(0)).shape == (7, 8)


def test_labels_are_zero_exactly_for_untouched_images() -> None:
    pipe = AugmentPipe(0.3)
    x = _images(200, 1, 8)
    out, labels = pipe(x, torch.Generator().manual_seed(5))
    untouched = labels.eq(0).all(dim=1)
    assert 0 < int(untouched.sum()) < 200  # both kinds occur at p = 0.3
    assert torch.equal(out[untouched], x[untouched])
    assert all(not torch.equal(out[i], x[i]) for i in torch.nonzero(~untouched).flatten().tolist())


def test_flips_are_exact_mirrors() -> None:
    x = _images(2)
    out, labels = AugmentPipe.apply(x, _params(2, xflip=1))
    assert torch.equal(out, x.flip(3)) and labels[:, 0].eq(1).all() and labels[:, 1:].eq(0).all()
    out, labels = AugmentPipe.apply(x, _params(2, yflip=1))
    assert torch.equal(out, x.flip(2)) and labels[:, 1].eq(1).all()


def test_translation_by_one_pixel_moves_the_content_by_one_pixel() -> None:
    x = _images(1, 1, 16)
    w = 1 / (16 * 0.125)  # one pixel in units of the translation's standard deviation
    out, labels = AugmentPipe.apply(x, _params(1, tx=w))
    torch.testing.assert_close(out[..., :, 1:], x[..., :, :-1], atol=1e-5, rtol=0)  # +x: content moves right
    torch.testing.assert_close(labels[0, 7:], torch.tensor([w, 0.0]))
    out, _ = AugmentPipe.apply(x, _params(1, ty=w))
    torch.testing.assert_close(out[..., 1:, :], x[..., :-1, :], atol=1e-5, rtol=0)  # +y: content moves down


def test_half_turn_rotation_is_both_flips() -> None:
    x = _images(2, 1, 16)
    out, labels = AugmentPipe.apply(x, _params(2, theta=math.pi))
    torch.testing.assert_close(out, x.flip(2).flip(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(labels[:, 3:5], torch.tensor([[-2.0, 0.0]] * 2), atol=1e-6, rtol=0)


def test_scaling_magnifies_about_the_centre() -> None:
    """Isotropic scale 2^(0.2·w) with w = 5 doubles the image: the centre stays, a corner goes out."""
    _, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (x - 7.5)[None, None] / 8  # a horizontal ramp through the centre
    out, labels = AugmentPipe.apply(ramp, _params(1, scale=5.0))
    torch.testing.assert_close(out[0, 0, :, 4:12], ramp[0, 0, :, 4:12] / 2, atol=1e-5, rtol=0)
    assert labels[0, 2] == 5.0
    squeeze, _ = AugmentPipe.apply(ramp, _params(1, aniso=5.0))  # x stretched ×2, y squeezed ×½
    torch.testing.assert_close(squeeze[0, 0, :, 4:12], ramp[0, 0, :, 4:12] / 2, atol=1e-5, rtol=0)


def test_frequencies_follow_p() -> None:
    params = AugmentPipe(0.5).sample(20_000, torch.Generator().manual_seed(0))
    applied = params.ne(0).float().mean(dim=0)
    assert abs(applied[0] - 0.5) < 0.02  # x-flip: half of all images whatever p is
    assert abs(applied[1] - 0.25) < 0.02  # y-flip: p, then half of those
    for column in (2, 3, 4, 6):  # scale, rotation, anisotropy, translation: p
        assert abs(applied[column] - 0.5) < 0.02
    assert abs(applied[5] - 0.25) < 0.02  # anisotropy in a rotated frame: half of the anisotropic ones
    scales = params[:, 2][params[:, 2] != 0]
    assert abs(float(scales.std()) - 1) < 0.05


def test_the_network_takes_the_labels(tiny_config) -> None:
    base = tiny_config((32,))
    model = LowDiffModel(replace(base, network=replace(base.network, augment_dim=AUGMENT_LABELS)))
    x = _images(3, 1, 32)
    sigma = torch.full((3,), 1.5)
    _, labels = AugmentPipe(1.0)(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.denoiser.parameters():  # output layers start at zero: make the output depend on the input
            p.add_(torch.randn_like(p) * 0.02)
        plain = model.denoiser(x, sigma, torch.tensor([0, 1, 2]), 32)
        zero = model.denoiser(x, sigma, torch.tensor([0, 1, 2]), 32, augment_labels=torch.zeros(3, 9))
        augmented = model.denoiser(x, sigma, torch.tensor([0, 1, 2]), 32, augment_labels=labels)
    torch.testing.assert_close(plain, zero)  # zero labels = no augmentation: what sampling uses
    assert not torch.allclose(plain, augmented)


def test_probability_out_of_range() -> None:
    with pytest.raises(ConfigError) as caught:
        AugmentPipe(1.5)
    assert caught.value.field == "augment_p"
