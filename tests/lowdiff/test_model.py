"""lowdiff.model: checkpoint load errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowdiff.errors import CheckpointError
from lowdiff.model import LowDiffModel


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        LowDiffModel.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        LowDiffModel.load(bad)
