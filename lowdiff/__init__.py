"""LowDiff: cascaded low-resolution diffusion, served. ``lowdiff.load(…)`` is the Python API
(:mod:`lowdiff.pipeline`); ``lowdiff``/``python -m lowdiff`` the command line (:mod:`lowdiff.cli`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowdiff.pipeline import Pipeline


def load(*args: Any, **kwargs: Any) -> Pipeline:
    """See :func:`lowdiff.pipeline.load` (imported on first use, so ``import lowdiff`` stays light)."""
    from lowdiff.pipeline import load as _load

    return _load(*args, **kwargs)
