"""benchmarks/quality/run.py end to end on tiny random-weight models (the real run takes hours)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from lowdiff.configs import get_config
from lowdiff.model import LowDiffModel

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality" / "run.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_sweep_points_have_the_intended_nfe() -> None:
    quality = load_script()
    points = {
        p.name: p for p in quality.sweep_points(get_config("fashion32").schedule, get_config("edm-fashion32").schedule)
    }
    nfe = {name: p.schedule.nfe for name, p in points.items()}
    assert nfe["lowdiff-paper"] == (18, 13, 17)
    assert nfe["lowdiff-trunc8-t7"] == (14, 13, 17) and nfe["lowdiff-trunc16-t5"] == (18, 9, 17)
    assert nfe["lowdiff-32steps6"] == (18, 13, 11) and nfe["lowdiff-8x1"] == (1, 13, 17)
    assert nfe["lowdiff-late"] == (22, 17, 17) and nfe["lowdiff-late-32from10"] == (22, 17, 11)
    assert nfe["lowdiff-late-32n7from10"] == (22, 17, 13) and nfe["lowdiff-8x1-late16"] == (1, 17, 17)
    assert nfe["lowdiff-8x1-late16-32n7from10"] == (1, 17, 13)
    assert nfe["lowdiff-c8n10t6-16n10t7"] == (12, 13, 17) and nfe["lowdiff-c8n8t5-16n8t6"] == (10, 11, 17)
    assert nfe["lowdiff-c8n10t6-16n8t6"] == (12, 11, 17) and nfe["lowdiff-c8n10t6-16n10t7-32n8"] == (12, 13, 15)
    # coarse grids hand off near the late schedule's σ with fewer low-resolution evaluations
    late = points["lowdiff-late"].schedule.stages
    coarse = points["lowdiff-c8n10t6-16n8t6"].schedule.stages
    assert 0.5 < float(coarse[0].sigmas()[-1]) / float(late[0].sigmas()[-1]) < 1.0
    for name in ("lowdiff-late-32from10", "lowdiff-late-32n7from10", "lowdiff-8x1-late16-32n7from10"):
        assert points[name].schedule.stages[-1].sigma_max == 10.0
    # the one-evaluation 8×8 stage still hands off at the paper's σ
    paper_handoff = float(points["lowdiff-paper"].schedule.stages[0].sigmas()[-1])
    for name in ("lowdiff-8x1", "lowdiff-8x1-late16"):
        assert float(points[name].schedule.stages[0].sigmas()[-1]) == pytest.approx(paper_handoff)
    assert nfe["edm-35"] == (35,) and nfe["edm-25"] == (25,) and nfe["edm-19"] == (19,) and nfe["edm-15"] == (15,)
    assert sorted(nfe[name][0] for name in nfe if name.startswith("edm-")) == [
        15,
        17,
        19,
        21,
        23,
        25,
        27,
        31,
        35,
    ]
    assert [p.name for p in points.values() if p.headline] == ["lowdiff-paper", "edm-35"]


def test_quality_run_end_to_end_and_reuses_its_cache(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 8)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (80, 28, 28), dtype=np.uint8), labels=labels)
    LowDiffModel(tiny_config()).save(tmp_path / "lowdiff.pt")
    LowDiffModel(tiny_config((32,))).save(tmp_path / "edm.pt")
    args = [
        "--data", str(data), "--holdout-per-class", "4",
        "--lowdiff", str(tmp_path / "lowdiff.pt"), "--edm", str(tmp_path / "edm.pt"),
        "--num-samples", "20", "--sweep-samples", "10", "--rounds", "1", "--batch", "4", "--threads", "1",
        "--points", "lowdiff-paper,lowdiff-8x1,edm-35,edm-15",
        "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    quality = load_script()
    threads = torch.get_num_threads()
    try:
        quality.main(args)
    finally:
        torch.set_num_threads(threads)

    report = json.loads((tmp_path / "out" / "results.json").read_text())
    by_name = {p["name"]: p for p in report["points"]}
    assert set(by_name) == {"lowdiff-paper", "lowdiff-8x1", "edm-35", "edm-15"}
    paper = by_name["lowdiff-paper"]
    assert paper["full"]["num_samples"] == 20 and paper["sweep"]["num_samples"] == 10
    assert by_name["lowdiff-8x1"]["full"] is None
    for p in report["points"]:
        assert np.isfinite(p["sweep"]["fd"]) and 0 <= p["sweep"]["class_agreement"] <= 1
        assert len(p["sweep"]["class_agreement_per_class"]) == 10
        assert p["throughput_img_s"] > 0 and p["gflops_per_image"] > 0
        assert (tmp_path / "out" / "grids" / f"{p['name']}.png").is_file()
    # fewer NFE, fewer counted FLOPs
    assert by_name["edm-15"]["gflops_per_image"] < by_name["edm-35"]["gflops_per_image"]
    assert by_name["lowdiff-8x1"]["gflops_per_image"] < paper["gflops_per_image"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| tiny | lowdiff-paper: paper's 3-stage schedule (Table 2) | 18@8 / 13@16 / 17@32 |" in table
    assert (tmp_path / "out" / "fd_vs_throughput.png").is_file()
    # every LowDiff point is read against EDM-35 and EDM's curve; the selection is recorded
    assert report["seeds"] == [0, 20]
    assert set(paper["vs_edm"]) == {"throughput_ratio", "cpu_s_ratio", "fd_minus_baseline",
                                    "edm_fd_at_equal_throughput"}  # fmt: skip
    assert report["selection"]["baseline"] == "edm-35" and "Selection (" in table

    # Extending a cache generates only the missing seeds, in chunks, and gives the images a fresh run gives.
    point = next(p for p in quality.sweep_points(get_config("fashion32").schedule, get_config("edm-fashion32").schedule)
                 if p.name == "lowdiff-8x1")  # fmt: skip
    model = LowDiffModel.load(tmp_path / "lowdiff.pt")
    extended = quality.cached_samples(point, model, 13, tmp_path / "cache", chunk=2)
    fresh = model.with_schedule(point.schedule).generate(list(range(13)), [s % 10 for s in range(13)]).numpy()
    assert extended.shape == fresh.shape
    assert np.abs(extended.astype(int) - fresh.astype(int)).max() <= 1  # batch composition differs: ≤ 1 level

    # Another seed range (the confirmation run) is cached apart and draws those seeds.
    offset = quality.cached_samples(point, model, 3, tmp_path / "cache", seed0=1000)
    fresh = model.with_schedule(point.schedule).generate([1000, 1001, 1002], [0, 1, 2]).numpy()
    assert np.abs(offset.astype(int) - fresh.astype(int)).max() <= 1
    (tmp_path / "cache" / quality.cache_name(point, model, 1000)).unlink()

    # One cache file per point; a rerun generates nothing.
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4

    def no_generation(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("regenerated cached samples")

    monkeypatch.setattr(quality, "generate_images", no_generation)
    try:
        quality.main([*args, "--samples-only"])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--points", "nope*"], "--points"),
        ([], "--data"),
        (["--lowdiff", "missing.pt"], "--lowdiff"),
        (["--edm", "LOWDIFF"], "--edm"),  # a 3-stage model where the single-stage baseline belongs
        (["--sweep-samples", "5"], "--sweep-samples"),
        (["--confirm", "edm-35"], "--confirm"),  # confirmation is of a LowDiff point
        (["--confirm", "lowdiff-nope"], "--confirm"),
    ],
)
def test_quality_run_rejects_bad_arguments_before_generating(
    tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    LowDiffModel(tiny_config()).save(tmp_path / "lowdiff.pt")
    LowDiffModel(tiny_config((32,))).save(tmp_path / "edm.pt")
    quality = load_script()
    argv = ["--data", str(tmp_path / "missing.npz"), "--lowdiff", str(tmp_path / "lowdiff.pt"),
            "--edm", str(tmp_path / "edm.pt"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    extra = [str(tmp_path / "lowdiff.pt") if a == "LOWDIFF" else a for a in extra]
    with pytest.raises(SystemExit) as exc:
        quality.main(argv + extra)
    assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def _point(name: str, family: str, throughput: float, fd: float, cpu_s: float = 1.0, gflops: float = 0.0) -> dict:
    """A scored point; its counted GFLOP per image default to matching its measured speed (100 / images/s)."""
    return {"name": name, "family": family, "throughput_img_s": throughput, "cpu_s_mean": cpu_s,
            "gflops_per_image": gflops or 100.0 / throughput, "sweep": {"fd": fd, "class_agreement": 0.8}}  # fmt: skip


def test_edm_curve_is_interpolated_at_equal_throughput_and_never_extrapolated() -> None:
    quality = load_script()
    edm = [
        _point("edm-35", "EDM", 10.0, 50.0),
        _point("edm-25", "EDM", 14.0, 60.0),
        _point("edm-15", "EDM", 20.0, 90.0),
    ]
    assert quality.edm_at_equal_throughput(12.0, edm) == pytest.approx(55.0)
    assert quality.edm_at_equal_throughput(17.0, edm) == pytest.approx(75.0)
    assert quality.edm_at_equal_throughput(20.0, edm) == pytest.approx(90.0)
    assert quality.edm_at_equal_throughput(25.0, edm) is None and quality.edm_at_equal_throughput(9.0, edm) is None


def test_selection_takes_the_best_fd_at_the_target_speed() -> None:
    quality = load_script()
    points = [
        _point("edm-35", "EDM", 10.0, 50.0), _point("edm-15", "EDM", 20.0, 90.0),
        _point("lowdiff-a", "LowDiff", 16.0, 48.0),  # better than EDM-35 but only 1.6×… qualifies
        _point("lowdiff-b", "LowDiff", 15.5, 45.0),  # 1.55×, best FD among the fast ones: chosen
        _point("lowdiff-c", "LowDiff", 12.0, 40.0, gflops=6.25),  # best FD, measured 1.2×, 1.6× by FLOPs
        _point("lowdiff-d", "LowDiff", 19.0, 70.0),  # fastest, worse than EDM-35
    ]  # fmt: skip
    selection = quality.compare_with_edm(points, "edm-35")
    # the same rule on counted FLOPs (no load skews them) takes lowdiff-c
    assert selection["candidates_by_flops"] == ["lowdiff-a", "lowdiff-b", "lowdiff-c", "lowdiff-d"]
    assert selection["chosen_by_flops"] == "lowdiff-c" and selection["chosen_by_flops_beats_baseline"] is True
    assert selection["candidates"] == ["lowdiff-a", "lowdiff-b", "lowdiff-d"]
    assert selection["chosen"] == "lowdiff-b" and selection["chosen_beats_baseline"] is True
    assert selection["fastest_point_better_than_baseline"] == "lowdiff-a"
    b = next(p for p in points if p["name"] == "lowdiff-b")["vs_edm"]
    assert b["throughput_ratio"] == pytest.approx(1.55) and b["fd_minus_baseline"] == pytest.approx(-5.0)
    assert b["edm_fd_at_equal_throughput"] == pytest.approx(50.0 + 40.0 * 5.5 / 10.0)
    slow = [_point("edm-35", "EDM", 10.0, 50.0), _point("lowdiff-c", "LowDiff", 12.0, 40.0)]
    none = quality.compare_with_edm(slow, "edm-35")
    assert none["chosen"] is None and none["chosen_beats_baseline"] is False
    assert quality.compare_with_edm([_point("lowdiff-c", "LowDiff", 12.0, 40.0)], "edm-35") is None


def test_a_confirmation_reports_the_named_point_and_selects_nothing() -> None:
    quality = load_script()
    points = [
        _point("edm-35", "EDM", 10.0, 50.0), _point("edm-15", "EDM", 20.0, 90.0),
        _point("lowdiff-b", "LowDiff", 15.5, 52.0),  # the point chosen on other seeds: worse here
        _point("lowdiff-e", "LowDiff", 16.0, 30.0),  # better on these seeds, but nothing is chosen here
    ]  # fmt: skip
    confirmation = quality.compare_with_edm(points, "edm-35", confirm="lowdiff-b")
    assert confirmation["confirmed"] == "lowdiff-b" and "chosen" not in confirmation
    assert confirmation["fd"] == 52.0 and confirmation["beats_baseline"] is False
    assert confirmation["reaches_target_speed"] is True and confirmation["throughput_ratio"] == pytest.approx(1.55)
    assert confirmation["edm_fd_at_equal_throughput"] == pytest.approx(72.0)
    table = quality.markdown({
        "sweep_samples": 10, "num_samples": 10, "batch": 4, "baseline": "edm-35", "seeds": [1000, 1010],
        "floors": {"fd_real_sweep": 1.0, "fd_real_full": 1.0, "fd_real_full_samples": 10,
                   "classifier_accuracy_real": 0.9},
        "points": [{**p, "model_config": "m", "note": "n", "stages": [{"resolution": 32, "nfe": 1}],
                    "latency_s_mean": 1.0, "gflops_per_image": 1.0} for p in points],
        "confirmation": confirmation,
    })  # fmt: skip
    assert "Confirmation of **lowdiff-b**" in table and "does not beat it" in table and "Selection" not in table
