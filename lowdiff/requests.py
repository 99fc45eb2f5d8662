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


def check_class_labels(config: ClassSpace, labels: Sequence[int | None] | None, count: int) -> tuple[int, ...] | None:
    """One label per image for a conditional model (each in range); none for an unconditional one."""
    if not config.conditional:
        if labels is not None and any(c is not None for c in labels):
            raise RequestError(f"{config.name} is unconditional and takes no class label", "class_label")
        return None
    top = config.num_classes - 1
    if labels is None or any(c is None for c in labels):
        raise RequestError(f"required for {config.name} (0…{top})", "class_label")
    if len(labels) != count:
        raise RequestError(f"{len(labels)} class labels for {count} images", "class_label")
    out = []
    for c in labels:
        if isinstance(c, bool) or not 0 <= int(c) <= top:  # type: ignore[arg-type]
            raise RequestError(f"{c} is out of range 0…{top}", "class_label")
        out.append(int(c))  # type: ignore[arg-type]
    return tuple(out)


def generation_request(
    config: ClassSpace,
    class_label: int | None,
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
