"""`lowdiff serve` with bad flags: one line, exit 2, before anything loads."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_serve_cli_bad_flags_exit_2(tmp_path, capsys) -> None:
    from lowdiff.cli import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch: must be ≥ 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "--checkpoint: checkpoint not found" in capsys.readouterr().err
