"""Training and reference data in the formats users have: NumPy archives, image folders, CIFAR-10.

Every loader returns ``(images, labels)``: uint8 [N, C, H, W] and int64 [N]. A missing or
malformed source raises :class:`DataError` with a message naming the file.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

from lowdiff.errors import DataError

# One default for train and eval: the last 1,000 images of each class are never trained on and are
# what `lowdiff eval` scores against (Fashion-MNIST: 7,000 per class, so 6,000 train).
DEFAULT_HOLDOUT_PER_CLASS = 1000

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _to_nchw(images: np.ndarray, source: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            return images.transpose(0, 3, 1, 2)
        return images
    raise DataError(f"{source}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {images.shape}")


def load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        archive = np.load(path)
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot parse is malformed
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    with archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise DataError(f"{path}: missing array(s) {sorted(missing)}; expected 'images' and 'labels'")
        images, labels = archive["images"], archive["labels"]
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(_to_nchw(images, path).copy()), torch.from_numpy(labels.astype(np.int64))


def image_folder_classes(path: Path) -> list[str]:
    """An image folder's class names: its subfolders' names, sorted; label i is the i-th name."""
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def load_image_folder(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    classes = [path / name for name in image_folder_classes(path)]
    if not classes:
        raise DataError(f"{path}: an image folder needs one subfolder per class")
    images, labels = [], []
    for label, folder in enumerate(classes):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    images.append(np.asarray(img.convert("L" if img.mode in ("L", "1", "P", "I") else "RGB")))
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"{file}: not a readable image ({exc})") from None
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images found in its class subfolders")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: images differ in size {sorted(shapes)}; resize them to one size first")
    return torch.from_numpy(_to_nchw(np.stack(images), path)), torch.tensor(labels, dtype=torch.int64)


# The only globals a CIFAR-10 python batch refers to: numpy's array reconstruction. Everything else
# in the stream must be plain data (dicts, lists, bytes, strings, numbers); any other global — os.system,
# builtins.eval, a class with a __reduce__ — is refused before anything runs.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # protocol ≤ 4 (the published files: Python 2, protocol 2)
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (a batch re-pickled by Python 3)
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2: str → bytes, nothing else
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR-10 batch holds only arrays and plain data")
        return super().find_class(module, name)


def _load_cifar_batch(stream: IO[bytes], source: str) -> tuple[np.ndarray, list[int]]:
    """One ``data_batch_*`` of the CIFAR-10 python tarball, unpickled without running anything."""
    try:
        batch = _CifarUnpickler(stream, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a CIFAR batch"
        raise DataError(f"{source}: not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{source}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{source}: b'data' must be a uint8 array of shape [N, 3072]")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(v) is int for v in labels):
        raise DataError(f"{source}: b'labels' must be a list of {len(data)} integers")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_tarball(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 python tarball (cifar-10-python.tar.gz): the five training batches."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc})") from None
    images, labels = [], []
    with tar:
        members = sorted(m for m in tar.getnames() if Path(m).name.startswith("data_batch_"))
        if not members:
            raise DataError(f"{path}: no data_batch_* files; expected the CIFAR-10 python tarball")
        for name in members:
            member = tar.extractfile(name)
            if member is None:
                raise DataError(f"{path}: cannot read {name}")
            batch = _load_cifar_batch(member, f"{path}:{name}")
            images.append(batch[0])
            labels.extend(batch[1])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def load_dataset(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return load_cifar10_tarball(path)
    raise DataError(f"{path}: unknown data format; use .npz, an image folder or the CIFAR-10 python tarball")


def holdout_split(labels: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held_out): the last ``per_class`` images of every class are held out."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        if per_class > 0:
            held[idx[-per_class:]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def prepare_images(images: torch.Tensor, pad: int, resolution: int, channels: int) -> torch.Tensor:
    """uint8 [N,C,H,W] → float32 in [−1, 1], black-padded by ``pad`` pixels a side."""
    if images.shape[1] != channels:
        raise DataError(f"images have {images.shape[1]} channels; the model expects {channels}")
    x = images.float() / 127.5 - 1
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        raise DataError(
            f"images are {tuple(x.shape[-2:])} after padding {pad}; the model expects {resolution}×{resolution}"
        )
    return x


def load_split(
    path: str | Path, holdout: int, pad: int, resolution: int | None = None, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, held-out images, train labels, held-out labels), images as [−1, 1] tensors.

    The last ``holdout`` images of every class are held out. ``resolution``/``channels`` are what the
    model expects; None takes them from the data (after padding)."""
    images, labels = load_dataset(path)
    train_idx, held_idx = holdout_split(labels, holdout)
    if len(held_idx) == 0:
        raise DataError(f"{path}: a hold-out of {holdout} per class leaves no held-out images", "holdout_per_class")
    res = resolution or images.shape[-1] + 2 * pad
    chans = channels or images.shape[1]
    train = prepare_images(images[train_idx], pad, res, chans)
    held = prepare_images(images[held_idx], pad, res, chans)
    return train, held, labels[train_idx], labels[held_idx]


def load_latents(
    path: Path, channels: int, resolution: int, autoencoder_sha256: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A latent config's training set: a ``.pt`` file ``{"latents": float [N, C, R, R], "labels": int [N]}``
    (labels optional) holding images already encoded by the model's autoencoder and normalised with its
    latent statistics. Read weights-only (tensors, never code); shape, finiteness and labels checked.

    A file written by ``lowdiff encode-latents`` also names the autoencoder file that encoded it
    (``autoencoder_sha256``); given the run's autoencoder's hash, a file from another autoencoder is
    refused, since its latents mean nothing to this decoder."""
    if not path.is_file():
        raise DataError(f"latents file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a latents file"
        raise DataError(f"{path}: not a readable weights-only .pt file ({type(exc).__name__})") from None
    latents = data.get("latents") if isinstance(data, dict) else None
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise DataError(f"{path}: expected a dict with a float tensor 'latents' [N, C, R, R]")
    if latents.ndim != 4 or tuple(latents.shape[1:]) != (channels, resolution, resolution) or len(latents) == 0:
        raise DataError(
            f"{path}: latents must be [N, {channels}, {resolution}, {resolution}] for this config, "
            f"got {tuple(latents.shape)}"
        )
    if not bool(torch.isfinite(latents).all()):
        raise DataError(f"{path}: latents must be finite")
    labels = data.get("labels")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != (len(latents),):
            raise DataError(f"{path}: labels must be an integer tensor [N] with N = {len(latents)}")
        if len(labels) and int(labels.min()) < 0:
            raise DataError(f"{path}: labels must be ≥ 0")
        labels = labels.long()
    encoded_by = data.get("autoencoder_sha256")
    if autoencoder_sha256 is not None and isinstance(encoded_by, str) and encoded_by != autoencoder_sha256:
        raise DataError(
            f"{path}: encoded by another autoencoder (sha256 {encoded_by[:12]}…, not {autoencoder_sha256[:12]}…); "
            "encode the data with this run's autoencoder (`lowdiff encode-latents`)"
        )
    return latents.float().contiguous(), labels
