"""scripts/gpu_check.py --cpu-dry-run: the GPU check's every step, on the CPU with tiny sizes, in a subprocess.

``test_dry_run_of_two_steps`` (parity through its worker process, a cost table through ``lowdiff bench``,
the merge, the summary and the archive: 30–50 s on a loaded 2-core machine) runs always, and so does an
in-process check of the train-throughput and dit-ratio summaries; the whole dry run (``test_whole_dry_run``:
4–6 minutes there, most of it the two saturation sweeps) only with ``LOWDIFF_SLOW_TESTS=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lowdiff.bench.costs import read_cost_table

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
PNG = b"\x89PNG\r\n\x1a\n"
STEPS = [
    "environment", "parity", "profile", "cost-torch", "cost-cudagraph", "bench-base", "train-throughput",
    "dit-ratio", "scheduler-overlap", "compile-gate", "saturation-cudagraph", "bench-all", "cost-compile",
    "profile-compile", "parity-compile", "saturation-compile",
]  # fmt: skip


def run_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def check_files(out: Path) -> dict:
    """Every JSON file parses, every PNG is one; the report names every step."""
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    for path in out.rglob("*.png"):
        assert path.read_bytes()[:8] == PNG, path
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["steps"]) == STEPS and report["dry_run"] is True and report.get("finished") is True
    assert (out / "gpu_check.md").read_text().startswith("# GPU check (CPU dry run)")
    return report


def test_plan_estimate_fits_its_deadline_in_a_15_minute_window() -> None:
    """Without the compile steps the run fits the default deadline, and that leaves a 15-minute device
    window time for the machine's start and a rerun of a step or two."""
    proc = run_check("--out", "unused", "--plan", timeout=60)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"estimated ([\d.]+) min without the compile steps.*at most ([\d.]+) min", proc.stdout)
    assert match, proc.stdout
    estimate, deadline = float(match.group(1)), float(match.group(2))
    assert estimate <= deadline <= 9.5, proc.stdout
    for new_step in ("train-throughput", "dit-ratio", "scheduler-overlap"):
        assert re.search(rf"{new_step} +expected", proc.stdout), proc.stdout


def load_script():
    """scripts/gpu_check.py as a module (registered first: its dataclasses look their module up)."""
    if "gpu_check_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check_script"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check_script"]


def test_dit_ratio_and_training_tables(tmp_path: Path) -> None:
    """The two issue steps' summaries, from made-up results: the ratio with and without the decode, the
    training table (a model that failed gets its row and its note)."""
    gc = load_script()
    stages = {
        "lowdiff-dit-b1-imagenet256": [(8, 0.6), (16, 1.4), ("decode", 0.5)],
        "lightningdit-b1-imagenet256": [(16, 3.5), ("decode", 0.5)],
    }
    results = []
    for config, parts in stages.items():
        latency = sum(t for _, t in parts)
        results.append({
            "config": config, "engine": "torch", "precision": "bf16", "batch": 64, "latency_s_mean": latency,
            "throughput_img_s": 64 / latency, "nfe": 95,
            "stages": [{"resolution": 256 if r == "decode" else r, "latency_s_mean": t}
                       | ({"stage": "decode"} if r == "decode" else {}) for r, t in parts],
        })  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"results": results, "ratio": 4.0 / 2.5}))
    summary = gc.dit_ratio_summary(tmp_path / "bench.json")
    assert summary["ratio_with_decode"] == pytest.approx(1.6)
    assert summary["ratio_without_decode"] == pytest.approx(3.5 / 2.0)
    assert summary["cascade"]["decode_s_mean"] == pytest.approx(0.5)
    assert "**1.600×** with the decode, 1.750× without it (the paper: 1.65×)" in gc.dit_ratio_line(summary)
    assert gc.dit_ratio_summary(tmp_path / "missing.json") is None

    ok = {"model": "cifar10-cond", "config": "cifar10-cond", "device": "cuda", "gpu": "H100", "precision": "bf16",
          "batch": 512, "batch_gpu": 128, "parameters": 56e6, "steps": 10, "step_s_mean": 0.5,
          "images_per_s": 1024.0, "peak_memory_allocated_gib": 20.0, "days_for_edm_cifar_length": 2.26,
          "out_of_memory_at_batch_gpu": [256]}  # fmt: skip
    failed = {"model": "edm-cifar10-cond", "device": "cuda", "precision": "bf16", "error": "RuntimeError: x | y"}
    md = gc.train_throughput_markdown({"results": [ok, failed]})
    assert "| cifar10-cond | H100 | bf16 | 512 | 128 × 4 | 56.0 M | 0.500 (10 steps) | **1024.0** | 20.0 | 2.3 |" in md
    assert "out of memory at batch_gpu [256]" in md and "RuntimeError: x / y" in md


def test_scheduler_overlap_table() -> None:
    """The overlap step's table, from made-up results: ratios to cascade, the lanes' overlap, an engine
    that failed gets its row and its note."""
    gc = load_script()
    rows = [("cascade", 100.0, 0.0), ("staged", 105.0, 0.0), ("staged+overlap", 120.0, 2.5)]
    ok = {
        "engine": "cudagraph:bf16", "model": "cifar10-cond", "max_batch": 64, "limits": {"8": 512}, "outstanding": 256,
        "warm_s": 1.5, "window_s": 3.5,
        "results": [{"scheduler": name, "images_per_s": rate, "vs_cascade": rate / 100, "both_lanes_busy_s": both,
                     "run_s": 5.0, "max_levels_vs_cascade": 1.0, "same_seed_images": 512}
                    for name, rate, both in rows],
    }  # fmt: skip
    failed = {"engine": "torch:bf16", "error": "RuntimeError: x | y"}
    md = gc.overlap_markdown({"model": "cifar10-cond", "results": [ok, failed]})
    assert "| cudagraph:bf16 | staged+overlap | 120.0 | **1.200** | 50 % | 1 (512 images) |  |" in md
    assert "| cudagraph:bf16 | staged | 105.0 | **1.050** | – |" in md
    assert "RuntimeError: x / y" in md and "256 single-image requests outstanding" in md


def test_dry_run_of_two_steps(tmp_path: Path) -> None:
    out = tmp_path / "check"
    steps = "parity,cost-torch"
    proc = run_check("--cpu-dry-run", "--out", str(out), "--only", steps, "--deadline-s", "420",
                     "--inductor-cache", str(tmp_path / "cache"), "--tar", str(tmp_path / "check.tgz"),
                     timeout=480)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = check_files(out)
    for name in STEPS:
        expected = "ok" if name in steps.split(",") else "skipped (--skip/--only)"
        assert report["steps"][name]["status"] == expected, (name, report["steps"][name])
    parity = {e["name"]: e for e in report["parity"]["results"]}
    assert parity["torch fp32"]["max_levels"] == 0 and parity["torch fp32"]["same_batch_twice_identical"]
    assert "GPU" in parity["cudagraph fp32"]["unavailable"]
    assert (out / "parity.png").exists()
    costs = read_cost_table(out / "costs.json")
    points = costs["configs"]["tiny-lowdiff"]["engines"]["torch:fp32"]["resolutions"]["32"]
    assert [p["batch"] for p in points] == [1, 2]
    assert set(costs["configs"]) == {"tiny-lowdiff", "tiny-edm"}
    assert "## Cost table" in (out / "gpu_check.md").read_text()
    with tarfile.open(tmp_path / "check.tgz") as tar:
        assert "check/gpu_check.json" in tar.getnames()


@pytest.mark.skipif(os.environ.get("LOWDIFF_SLOW_TESTS") != "1", reason="4–6 min; set LOWDIFF_SLOW_TESTS=1")
def test_whole_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "check"
    proc = run_check("--cpu-dry-run", "--out", str(out), "--deadline-s", "540",
                     "--inductor-cache", str(tmp_path / "cache"), timeout=720)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = check_files(out)
    assert {name: step["status"] for name, step in report["steps"].items()} == dict.fromkeys(STEPS, "ok")
    assert report["compile_gate"] == "passed"
    assert report["environment"]["torch"] and report["environment"]["cuda_available"] is False
    profile = json.loads((out / "profile.json").read_text())
    assert [p["engine"] for p in profile["profiles"]] == ["torch", "cudagraph"]
    assert profile["profiles"][0]["categories"]["convolution"]["share"] > 0
    names = [e["name"] for e in report["parity"]["results"]]
    assert names == ["torch fp32", "cudagraph fp32", "onnxruntime fp32", "compile fp32", "compile bf16"]
    for bench, engines in (("bench-base", ["torch"]), ("bench-all", ["torch", "compile"])):
        results = json.loads((out / f"{bench}.json").read_text())["results"]
        assert [r["engine"] for r in results] == engines * 2
    costs = read_cost_table(out / "costs.json")
    assert set(costs["configs"]["tiny-lowdiff"]["engines"]) == {"torch:fp32", "cudagraph:fp32", "compile:fp32"}
    for sweep in ("saturation-cudagraph", "saturation-compile"):
        assert (out / sweep / "summary.json").exists() and (out / sweep / "README.md").exists()
    training = json.loads((out / "train-throughput.json").read_text())["results"]
    assert [e["config"] for e in training] == ["tiny-lowdiff", "tiny-edm"]
    assert all(e["steps"] == 2 and e["batch"] == 2 and e["images_per_s"] > 0 for e in training)
    dit = report["dit_ratio"]
    assert [dit["cascade"]["config"], dit["baseline"]["config"]] == ["tiny-latent-lowdiff", "tiny-latent-base"]
    assert dit["ratio_with_decode"] > 0 and dit["cascade"]["decode_s_mean"] > 0
    overlap = json.loads((out / "scheduler-overlap.json").read_text())["results"]
    assert [e["engine"] for e in overlap] == ["torch:fp32"]
    assert [r["scheduler"] for r in overlap[0]["results"]] == list(load_script().OVERLAP_SCHEDULERS)
    assert all(r["max_levels_vs_cascade"] in (0, None) for r in overlap[0]["results"])
    md = (out / "gpu_check.md").read_text()
    assert "## scheduler-overlap" in md
    assert "## train-throughput" in md and "## dit-ratio" in md and "with the decode" in md
