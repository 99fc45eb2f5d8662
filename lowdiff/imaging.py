"""uint8 image tensors → pictures: PNG bytes of one image or a near-square grid, tiled grids, PNG files.

The one place images are encoded: the HTTP service, ``lowdiff sample``, training's sample grids and
the benchmarks' grids all come through here, so the same tensor always gives the same PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] → a greyscale (C=1) or RGB (C=3) PIL image."""
    array = image.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def png_bytes(image: torch.Tensor) -> bytes:
    """One uint8 [C, H, W] image as PNG."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of the near-square grid for ``count`` images: ⌈√n⌉ columns."""
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def tile(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """uint8 [B, C, H, W] → one [C, rows·H, cols·W] image in row-major order, black where B < rows·cols."""
    b, c, h, w = images.shape
    if b < rows * cols:
        images = torch.cat([images, images.new_zeros(rows * cols - b, c, h, w)])
    return images.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def grid_png_bytes(images: Sequence[torch.Tensor] | torch.Tensor) -> bytes:
    """Images in row-major order on a ⌈√n⌉-column grid (one image: that image) as PNG."""
    if len(images) == 1:
        return png_bytes(images[0])
    stacked = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    rows, cols = grid_shape(len(stacked))
    return png_bytes(tile(stacked, rows, cols))


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """uint8 [C, H, W] → a PNG file."""
    to_pil(image).save(path, format="PNG")
