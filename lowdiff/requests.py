"""The one validator of a generation request — class label(s), seed range, image count.

Shared by ``lowdiff sample``, the HTTP service and :class:`lowdiff.engines.CascadeEngine`, so that the
same request is accepted or refused with the same message everywhere. Errors are
:class:`~lowdiff.errors.RequestError` naming the field (``class_label``, ``seed``, ``num_images``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lowdiff.errors import RequestError

# Seeds seed a torch.Generator per image; EDM's generate.py takes them modulo 2^32, we refuse larger.
MAX_SEED = 2**32 - 1
MAX_IMAGES_PER_REQUEST = 64


class ClassSpace(Protocol):
    """What label validation needs of a model (a ModelConfig or an engine's EngineInfo)."""

    @property
    def name(self) -> str: ...
    @property
    def conditional(self) -> bool: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def class_names(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class GenerationRequest:
    """Validated: one seed and one class label (None for unconditional models) per image."""

    seeds: tuple[int, ...]
    class_labels: tuple[int, ...] | None

    def __len__(self) -> int:
        return len(self.seeds)


def check_seeds(seeds: Sequence[int], field: str = "seed") -> tuple[int, ...]:
    for s in seeds:
        if isinstance(s, bool) or not 0 <= int(s) <= MAX_SEED:
            raise RequestError(f"seeds must be in 0…{MAX_SEED} (2^32 − 1), got {s}", field)
    return tuple(int(s) for s in seeds)


def class_index(config: ClassSpace, label: int | str) -> int:
    """A class label as its index: an integer in range, or one of the model's class names (any case)."""
    top = config.num_classes - 1
    if isinstance(label, str):
        wanted = label.strip().casefold()
        for k, name in enumerate(config.class_names):
            if name.casefold() == wanted:
                return k
        valid = ", ".join(f"{k} {n!r}" for k, n in enumerate(config.class_names)) or f"0…{top}"
        raise RequestError(f"unknown class {label!r}; valid: {valid}", "class_label")
    if isinstance(label, bool) or not 0 <= int(label) <= top:
        names = f" ({', '.join(config.class_names)})" if config.class_names else ""
        raise RequestError(f"{label} is out of range 0…{top}{names}", "class_label")
    return int(label)


def check_class_labels(
    config: ClassSpace, labels: Sequence[int | str | None] | None, count: int
) -> tuple[int, ...] | None:
    """One label per image for a conditional model (index or class name); none for an unconditional one."""
    if not config.conditional:
        if labels is not None and any(c is not None for c in labels):
            raise RequestError(f"{config.name} is unconditional and takes no class label", "class_label")
        return None
    top = config.num_classes - 1
    if labels is None or any(c is None for c in labels):
        raise RequestError(f"required for {config.name} (0…{top})", "class_label")
    if len(labels) != count:
        raise RequestError(f"{len(labels)} class labels for {count} images", "class_label")
    return tuple(class_index(config, c) for c in labels)  # type: ignore[arg-type]


def generation_request(
    config: ClassSpace,
    class_label: int | str | None,
    seed: int,
    num_images: int,
    max_images: int = MAX_IMAGES_PER_REQUEST,
) -> GenerationRequest:
    """``num_images`` images of one class; image k uses ``seed + k``."""
    if isinstance(num_images, bool) or not 1 <= num_images <= max_images:
        raise RequestError(f"must be in 1…{max_images}, got {num_images}", "num_images")
    check_seeds([seed])
    if seed + num_images - 1 > MAX_SEED:
        raise RequestError(f"seed + num_images − 1 must be ≤ {MAX_SEED} (2^32 − 1)", "seed")
    seeds = tuple(seed + k for k in range(num_images))
    labels = check_class_labels(config, [class_label] * num_images, num_images)
    return GenerationRequest(seeds, labels)


def labels_tensor(labels: Sequence[int] | None) -> torch.Tensor | None:
    return None if labels is None else torch.tensor(list(labels), dtype=torch.long)
