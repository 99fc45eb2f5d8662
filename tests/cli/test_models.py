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


def test_models_json_gives_preconditioning_and_recipe(capsys) -> None:
    """The paper configs are EDMPrecond with EDM's recipe; fashion32 keeps the recipe it was trained with."""
    assert main(["models", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert all(info["preconditioning"] in ("edm", "vp", "flow") for info in table.values())
    paper = ("cifar10-cond", "cifar10-uncond", "cifar10-cond-2stage", "ffhq64", "ffhq64-2stage", "edm-cifar10-cond")
    for name in paper:
        info = table[name]
        assert info["preconditioning"] == "edm", name
        assert info["training"]["loss_weighting"] == "pixels" and info["training"]["grad_clip"] == 0, name
        assert info["training"]["ema_halflife_kimg"] == 500 and info["training"]["lr_rampup_kimg"] == 10_000, name
    cifar, ffhq = table["cifar10-cond"]["training"], table["ffhq64"]["training"]
    assert (cifar["augment_p"], cifar["batch_size"], cifar["lr"]) == (0.12, 512, 1e-3)
    assert (ffhq["augment_p"], ffhq["batch_size"], ffhq["lr"]) == (0.15, 256, 2e-4)  # EDM's FFHQ-64 recipe
    small = table["fashion32"]["training"]
    assert small["loss_weighting"] == "equal" and small["augment_p"] == 0 and small["batch_size"] == 64


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
