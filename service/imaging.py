"""uint8 image tensors → PNG bytes: one image, or a near-square grid for several."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def _to_pil(array: np.ndarray) -> Image.Image:
    """[H, W, C] uint8 → grayscale (C=1) or RGB (C=3) image."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def png_bytes(image: torch.Tensor) -> bytes:
    """One uint8 [C, H, W] image as PNG."""
    buf = io.BytesIO()
    _to_pil(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def grid_png_bytes(images: Sequence[torch.Tensor]) -> bytes:
    """Images in row-major order on a ⌈√n⌉-column grid, black where the last row is short."""
    if len(images) == 1:
        return png_bytes(images[0])
    stacked = torch.stack(list(images)).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    n, h, w, c = stacked.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        canvas[r * h : (r + 1) * h, q * w : (q + 1) * w] = stacked[k]
    buf = io.BytesIO()
    _to_pil(canvas).save(buf, format="PNG")
    return buf.getvalue()


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of the grid :func:`grid_png_bytes` draws for ``count`` images."""
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols
