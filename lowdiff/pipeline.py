"""The Python API: ``lowdiff.load(…)`` gives a :class:`Pipeline`, ``pipe.generate(…)`` gives PIL images.

    import lowdiff

    pipe = lowdiff.load("fashion32")                       # the embedded trained model, PyTorch on the CPU
    images = pipe.generate(class_labels=[7, "Sneaker"], seeds=[0, 1])   # two PIL images
    images[0].save("sneaker.png")
    tensor = pipe.generate(class_labels=[9], seeds=[0], output_type="tensor")  # uint8 [1, C, H, W]

The same (class, seed) gives the same pixels as ``lowdiff sample`` and the HTTP service, on the same
engine. ``lowdiff.load(path, engine="onnxruntime")`` serves a checkpoint of yours on another engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from lowdiff.engines import CascadeEngine, load_engine
from lowdiff.errors import CheckpointError
from lowdiff.imaging import to_pil
from lowdiff.model import EMBEDDED_MODELS, load_model, resolve_checkpoint
from lowdiff.requests import check_class_labels, check_seeds


class Pipeline:
    """A model bound to an engine, loaded and warmed once; :meth:`generate` is all a user needs."""

    def __init__(self, engine: CascadeEngine):
        self.engine = engine
        self.config = engine.model.config

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def generate(
        self,
        class_labels: Sequence[int | str] | int | str | None = None,
        seeds: Sequence[int] | int | None = None,
        output_type: Literal["pil", "tensor"] = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """One image per seed (default: seed 0…n−1, n = number of labels). A single label is used for
        every seed; labels are class indices or class names (``"Sneaker"``)."""
        if isinstance(seeds, int):
            seeds = [seeds]
        if isinstance(class_labels, int | str):
            class_labels = [class_labels] * (len(seeds) if seeds is not None else 1)
        if seeds is None:
            seeds = list(range(len(class_labels) if class_labels is not None else 1))
        seeds = check_seeds(seeds)
        labels = check_class_labels(self.config, class_labels, len(seeds))
        images = self.engine.generate(seeds, labels)
        if output_type == "tensor":
            return images
        return [to_pil(image) for image in images]


def load(
    model: str | Path | None = None,
    *,
    engine: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    engine_dir: str | Path | None = None,
    threads: int | None = None,
) -> Pipeline:
    """``model``: the name of an embedded model (``"fashion32"``, the default, ``"edm-fashion32"``,
    ``"fashion32-latent"``, …: :data:`lowdiff.model.EMBEDDED_MODELS`) or the path of a LowDiff checkpoint.
    ``engine``/``device``/``precision``/``engine_dir`` as for ``lowdiff serve``."""
    path = resolve_checkpoint(model)
    if not path.is_file():
        raise CheckpointError(
            f"{str(model)!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a checkpoint file",
            "model",
        )
    return Pipeline(load_engine(load_model(path), engine, device, precision, engine_dir=engine_dir, threads=threads))
