"""lowdiff.data: .npz, image-folder and CIFAR-10 tarball loaders; the hold-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowdiff.data import holdout_split, load_dataset
from lowdiff.errors import DataError


def test_loaders(tmp_path: Path) -> None:
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    x, y = load_dataset(tmp_path / "d.npz")
    assert x.shape == (6, 1, 28, 28) and y.tolist() == [0, 0, 1, 1, 2, 2]

    for label in range(3):
        (tmp_path / "folder" / f"class{label}").mkdir(parents=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(tmp_path / "folder" / f"class{label}" / f"{i}.png")
    fx, fy = load_dataset(tmp_path / "folder")
    assert torch.equal(fx, x) and torch.equal(fy, y)

    train, held = holdout_split(y, 1)
    assert held.tolist() == [1, 3, 5] and train.tolist() == [0, 2, 4]

    np.savez(tmp_path / "bad.npz", pictures=images)
    with pytest.raises(DataError, match="missing array"):
        load_dataset(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.npz")


def test_cifar10_tarball(tmp_path: Path) -> None:
    import io
    import pickle
    import tarfile

    rng = np.random.default_rng(0)
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for k in (1, 2):
            blob = pickle.dumps({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [k, 0, 9]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{k}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    x, y = load_dataset(path)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [1, 0, 9, 2, 0, 9]
