"""Data from outside is not trusted: a CIFAR-10 tarball cannot run code."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lowdiff.data import load_dataset
from lowdiff.errors import DataError


def _tarball(path: Path, blobs: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_of_any_protocol_load(tmp_path: Path, protocol: int) -> None:
    data = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)
    blob = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=protocol)
    x, y = load_dataset(_tarball(tmp_path / "c.tar.gz", {"data_batch_1": blob}))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 4]
    assert np.array_equal(x.numpy().reshape(2, -1), data)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR-10 batch .*refusing"):
        load_dataset(_tarball(tmp_path / "evil.tar.gz", {"data_batch_1": blob}))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2, 3],
        {b"data": b"abc", b"labels": [0]},
        {b"data": np.zeros((1, 3072), dtype=np.float32), b"labels": [0]},
        {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0]},
        {b"data": np.zeros((1, 3072), dtype=np.uint8), b"labels": ["cat"]},
    ],
    ids=["list", "bytes-data", "float-data", "count-mismatch", "string-label"],
)
def test_wrong_batch_layouts_are_clear_errors(tmp_path: Path, payload: object) -> None:
    blob = pickle.dumps(payload)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset(_tarball(tmp_path / "bad.tar.gz", {"data_batch_1": blob}))
