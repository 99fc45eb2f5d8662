"""Fashion-MNIST's (or MNIST's) four IDX files → one .npz that ``lowdiff train``/``eval`` read.

Download the four ``*-ubyte.gz`` files of the official release into one folder
(https://github.com/zalandoresearch/fashion-mnist, "data/fashion"), then:

    python scripts/fashion_mnist_to_npz.py FOLDER fashion-mnist-70k.npz

The archive holds ``images`` (uint8 [70000, 28, 28]) and ``labels`` (uint8 [70000]): the 60,000
training images, then the 10,000 test images. The test set has 1,000 images per class and comes
last, so ``--holdout-per-class 1000`` (the default) holds out exactly the official test set.

The IDX header is checked (magic number, dimensions, length) before anything is read into memory:
a truncated or foreign file is refused with one line naming it.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned byte data, 3 or 1 dimensions


class IdxError(ValueError):
    pass


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file (gzip-compressed) as uint8 with ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise IdxError(f"{path}: not a readable .gz file ({exc})") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: too short for an IDX header")
    magic, *dims = struct.unpack(f">{1 + ndim}I", data[:header])
    if magic != MAGIC[ndim]:
        raise IdxError(f"{path}: magic number {magic:#010x}, expected {MAGIC[ndim]:#010x} (a {ndim}-d uint8 IDX file)")
    count = int(np.prod(dims))
    if len(data) - header != count:
        raise IdxError(f"{path}: holds {len(data) - header} bytes of data, its header says {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def convert(folder: Path, out: Path) -> tuple[int, int]:
    images, labels = [], []
    for split, (image_file, label_file) in FILES.items():
        x = read_idx(folder / image_file, 3)
        y = read_idx(folder / label_file, 1)
        if len(x) != len(y):
            raise IdxError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        images.append(x)
        labels.append(y)
    all_images, all_labels = np.concatenate(images), np.concatenate(labels)
    np.savez_compressed(out, images=all_images, labels=all_labels)
    return len(all_images), int(all_labels.max()) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fashion-MNIST/MNIST IDX files → .npz (images, labels)")
    parser.add_argument("folder", type=Path, help="folder with the four *-ubyte.gz files")
    parser.add_argument("out", type=Path, help="the .npz to write")
    args = parser.parse_args(argv)
    try:
        n, classes = convert(args.folder, args.out)
    except IdxError as exc:
        print(f"fashion_mnist_to_npz: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {n} images, {classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
