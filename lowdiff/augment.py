"""EDM's non-leaking data augmentation for diffusion training, written from its description.

EDM (Karras et al. 2022, appendix F.2) trains on geometrically augmented images and tells the network
which transform it saw through *augment labels* (the ``map_augment`` input of the embedding): the
model learns the augmented distribution conditioned on the labels, and sampling with zero labels
(no transform) draws from the data distribution itself, so the augmentation does not leak into the
generated images. EDM's configuration (its train.py, ``--augment p``) enables, each independently:

* x-flip: every image is mirrored with probability ½ (this one does not depend on ``p``);
* y-flip: with probability ``p``, mirrored vertically with probability ½;
* isotropic scaling by 2^(0.2·w), w ~ N(0, 1), with probability ``p``;
* rotation by θ ~ U(−π, π), with probability ``p``;
* anisotropic scaling by 2^(0.2·w) along one axis and its inverse along the other, w ~ N(0, 1), in a
  frame rotated by r ~ U(−π, π) half of the time (else r = 0), with probability ``p``;
* translation by (w_x, w_y)·⅛ of the image size, w ~ N(0, 1), with probability ``p``.

The 9 labels, in EDM's order so that weights imported from EDM read them the same way: x-flip (0/1),
y-flip (0/1), w_scale, cos θ − 1, sin θ, w_aniso·cos r, w_aniso·sin r, w_x, w_y. Every label is 0
exactly when its transform was not applied. EDM's colour transforms (brightness, contrast, luma flip,
hue, saturation) are not part of its diffusion configuration and have no place in the 9 labels, so
they are not offered here.

The differences from EDM's own code are in the resampling, not in the distribution of transforms:
flips are exact pixel mirrors, and the geometric part is one bilinear ``grid_sample`` with reflection
at the borders (EDM pads by reflection and resamples through a 2× supersampled sym6 wavelet filter,
which alias less under down-scaling). Images that drew no geometric transform are returned untouched,
so p = 0 is exactly the identity.

Parameters are drawn for a whole (global) batch from a caller's generator (:meth:`AugmentPipe.sample`)
and applied separately (:meth:`AugmentPipe.apply`), so data-parallel ranks can each apply their slice
of one global draw and train exactly what one process would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowdiff.errors import ConfigError

AUGMENT_LABELS = 9  # the network's augment_dim that these labels fill (EDM's)

SCALE_STD = 0.2  # log2 standard deviation of isotropic scaling
ANISO_STD = 0.2  # log2 standard deviation of anisotropic scaling
ANISO_ROTATE_PROB = 0.5  # share of anisotropic scalings done in a randomly rotated frame
TRANSLATE_STD = 0.125  # translation standard deviation, relative to the image size

# Columns of the parameter tensor that :meth:`AugmentPipe.sample` returns.
_XFLIP, _YFLIP, _SCALE, _THETA, _ANISO, _ANISO_R, _TX, _TY = range(8)


@dataclass(frozen=True)
class AugmentPipe:
    """EDM's augmentation at overall probability ``p`` (0 = off)."""

    p: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"augmentation probability must be in [0, 1], got {self.p}", "augment_p")

    def sample(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Transform parameters [batch, 8] (float32): what each image gets; zeros = untouched."""
        device = device or (generator.device if generator is not None else torch.device("cpu"))

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=device)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=device)

        def gate(values: torch.Tensor) -> torch.Tensor:  # applied with probability p, else 0
            return torch.where(rand(*values.shape[-1:]) < self.p, values, torch.zeros_like(values))

        xflip = (rand(batch) < 0.5).float()  # EDM: xflip multiplier 1e8, i.e. always randomised
        yflip = gate((rand(batch) < 0.5).float())
        scale = gate(randn(batch))
        theta = gate((rand(batch) * 2 - 1) * math.pi)
        aniso = gate(randn(batch))
        aniso_r = (rand(batch) * 2 - 1) * math.pi
        aniso_r = torch.where(rand(batch) < ANISO_ROTATE_PROB, aniso_r, torch.zeros_like(aniso_r))
        aniso_r = torch.where(aniso != 0, aniso_r, torch.zeros_like(aniso_r))
        shift = randn(2, batch)
        on = rand(batch) < self.p
        tx, ty = (torch.where(on, s, torch.zeros_like(s)) for s in shift)
        if self.p == 0:  # nothing but x-flips could be drawn, and EDM disables the pipe at p = 0
            xflip = torch.zeros_like(xflip)
        return torch.stack([xflip, yflip, scale, theta, aniso, aniso_r, tx, ty], dim=1)

    @staticmethod
    def labels(params: torch.Tensor) -> torch.Tensor:
        """The 9 augment labels [batch, 9] for the network (EDM's order; all 0 for an untouched image)."""
        p = params.float()
        theta, aniso, r = p[:, _THETA], p[:, _ANISO], p[:, _ANISO_R]
        return torch.stack(
            [
                p[:, _XFLIP],
                p[:, _YFLIP],
                p[:, _SCALE],
                theta.cos() - 1,
                theta.sin(),
                aniso * r.cos(),
                aniso * r.sin(),
                p[:, _TX],
                p[:, _TY],
            ],
            dim=1,
        )

    @staticmethod
    def apply(images: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images, augment labels) for images [N, C, H, W] and parameters from :meth:`sample`."""
        if params.shape != (images.shape[0], 8):
            raise ValueError(f"parameters {tuple(params.shape)} do not fit {images.shape[0]} images")
        params = params.to(images.device, torch.float32)
        x = images
        x = torch.where(params[:, _XFLIP, None, None, None] > 0, x.flip(3), x)
        x = torch.where(params[:, _YFLIP, None, None, None] > 0, x.flip(2), x)
        geometric = params[:, _SCALE:].ne(0).any(dim=1)
        if bool(geometric.any()):
            warped = _warp(x, params)
            x = torch.where(geometric[:, None, None, None], warped, x)
        return x, AugmentPipe.labels(params)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw and apply in one go: (augmented images, labels)."""
        return self.apply(images, self.sample(images.shape[0], generator, images.device))


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=1).reshape(-1, 3, 3)


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], dim=1).reshape(-1, 3, 3)


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], dim=1).reshape(-1, 3, 3)


def _warp(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The geometric transforms as one affine resampling (output pixel → source pixel, centred pixels)."""
    _, _, height, width = images.shape
    s = torch.exp2(params[:, _SCALE] * SCALE_STD)
    a = torch.exp2(params[:, _ANISO] * ANISO_STD)
    r = params[:, _ANISO_R]
    # Inverse map, composed as EDM composes it: un-scale, un-rotate, un-stretch (in the frame rotated
    # by r), un-translate. Applied to an output pixel's position it gives where to read the input.
    inverse = (
        _scaling(1 / s, 1 / s)
        @ _rotation(params[:, _THETA])
        @ _rotation(-r)
        @ _scaling(1 / a, a)
        @ _rotation(r)
        @ _translation(-params[:, _TX] * width * TRANSLATE_STD, -params[:, _TY] * height * TRANSLATE_STD)
    )
    # Centred pixel coordinates → grid_sample's [−1, 1] (align_corners=False: a pixel is 2/size wide).
    to_unit = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], device=images.device))
    from_unit = torch.diag(torch.tensor([width / 2, height / 2, 1.0], device=images.device))
    theta = (to_unit @ inverse @ from_unit)[:, :2, :]
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
