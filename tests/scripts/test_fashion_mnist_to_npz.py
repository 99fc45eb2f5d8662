"""scripts/fashion_mnist_to_npz.py: IDX files in the official layout → the .npz that `lowdiff train` reads."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from lowdiff.data import holdout_split, load_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fashion_mnist_to_npz.py"
spec = importlib.util.spec_from_file_location("fashion_mnist_to_npz", SCRIPT)
assert spec is not None and spec.loader is not None
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    ndim = array.ndim
    header = struct.pack(f">{1 + ndim}I", magic if magic is not None else 0x800 + ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_release(folder: Path, train_per_class: int = 3, test_per_class: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y_train = np.tile(np.arange(10), train_per_class)
    y_test = np.tile(np.arange(10), test_per_class)
    x_train = rng.integers(0, 256, (len(y_train), 28, 28))
    x_test = rng.integers(0, 256, (len(y_test), 28, 28))
    write_idx(folder / "train-images-idx3-ubyte.gz", x_train)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y_train)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x_test)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y_test)
    return x_test, y_test


def test_converts_and_the_holdout_is_the_test_set(tmp_path: Path) -> None:
    x_test, y_test = fake_release(tmp_path)
    out = tmp_path / "fm.npz"
    assert tool.main([str(tmp_path), str(out)]) == 0
    images, labels = load_dataset(out)
    assert images.shape[0] == 50 and labels.tolist()[-20:] == y_test.tolist()
    assert np.array_equal(images[-20:].reshape(20, 28, 28).numpy(), x_test)
    _, held = holdout_split(labels, 2)
    assert sorted(held.tolist()) == list(range(30, 50))  # exactly the test images


def test_bad_files_are_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_release(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((20, 28, 28)))  # images where labels belong
    assert tool.main([str(tmp_path), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "t10k-labels-idx1-ubyte.gz" in err and "magic number" in err
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2I", 0x801, 99) + bytes(5))  # header says 99 labels, 5 present
    assert tool.main([str(tmp_path), str(tmp_path / "x.npz")]) == 2
    assert "header says 99" in capsys.readouterr().err
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    assert tool.main([str(tmp_path), str(tmp_path / "x.npz")]) == 2
    assert "not a readable .gz file" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
