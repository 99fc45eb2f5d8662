"""`lowdiff models --json`: parameters, stages, NFE and FLOPs per stage."""

from __future__ import annotations

import json

from lowdiff.cli import main


def test_models_json(capsys) -> None:
    assert main(["models", "--json", "fashion32", "cifar10-cond"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["cifar10-cond"]["params"] == 55_775_241
    stages = table["cifar10-cond"]["stages"]
    assert [s["resolution"] for s in stages] == [8, 16, 32] and [s["nfe"] for s in stages] == [18, 13, 17]
    assert all(s["gflops_per_image"] > 0 for s in stages)
