"""`lowdiff train` refuses an unknown config and missing data with exit 2, naming the flag."""

from __future__ import annotations

from pathlib import Path

from lowdiff.cli import main


def test_unknown_config_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["train", "--config", "nope", "--data", str(tmp_path / "x.npz"), "--run-dir", str(tmp_path)])
    assert code == 2 and "--config" in capsys.readouterr().err


def test_missing_data_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["train", "--config", "fashion32", "--data", str(tmp_path / "x.npz"), "--run-dir", str(tmp_path)])
    assert code == 2 and "--data" in capsys.readouterr().err
