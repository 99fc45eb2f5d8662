"""scripts/gpu_check.py --cpu-dry-run: the GPU check's every step, on the CPU with tiny sizes, in a subprocess.

``test_dry_run_of_two_steps`` (parity through its worker process, a cost table through ``lowdiff bench``,
the merge, the summary and the archive: 30–50 s on a loaded 2-core machine) runs always; the whole dry run
(``test_whole_dry_run``: 4–6 minutes there, most of it the two saturation sweeps) only with
``LOWDIFF_SLOW_TESTS=1``.
"""

from __future__ import annotations

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
    "environment", "parity", "profile", "cost-torch", "cost-cudagraph", "bench-base", "compile-gate",
    "saturation-cudagraph", "bench-all", "cost-compile", "profile-compile", "parity-compile", "saturation-compile",
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


def test_plan_estimate_fits_two_runs_in_a_15_minute_window() -> None:
    proc = run_check("--out", "unused", "--plan", timeout=60)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"estimated ([\d.]+) min without the compile steps", proc.stdout)
    assert match and float(match.group(1)) <= 8.0, proc.stdout
    assert "at most 8.0 min (--deadline-s)" in proc.stdout


def test_dry_run_of_two_steps(tmp_path: Path) -> None:
    out = tmp_path / "check"
    steps = "parity,cost-torch"
    proc = run_check("--cpu-dry-run", "--out", str(out), "--only", steps, "--deadline-s", "120",
                     "--inductor-cache", str(tmp_path / "cache"), "--tar", str(tmp_path / "check.tgz"),
                     timeout=300)  # fmt: skip
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
