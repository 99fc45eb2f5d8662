"""Fixtures for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowdiff.model import LowDiffModel


@pytest.fixture
def tiny_checkpoint(tiny_config, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    LowDiffModel(tiny_config()).save(path)
    return path
