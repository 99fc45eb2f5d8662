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
    assert all(s["gflops_per_evaluation"] > 0 for s in stages)


def test_the_readme_lists_every_built_in_config_with_its_parameters() -> None:
    from pathlib import Path

    from lowdiff.configs import BUILTIN_CONFIGS
    from lowdiff.counting import describe

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("| config | params | precond |")
    rows = [line for line in readme[start:].split("\n\n")[0].splitlines()[2:]]
    listed = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in rows}
    assert set(listed) == set(BUILTIN_CONFIGS)
    for name in ("fashion32", "cifar10-cond"):
        assert listed[name] == f"{describe(BUILTIN_CONFIGS[name])['params']:,}"
