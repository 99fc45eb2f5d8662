"""benchmarks/scheduler/sleep_engine.py with a real engine (``--model``): what a GPU session runs to measure
the schedulers' open-loop latency, here on a tiny model on the CPU (the numbers mean nothing; the rows,
the capacity burst and the overlapped batchers on a real engine are what is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scheduler" / "sleep_engine.py"


def test_real_engine_rows_for_every_scheduler(tmp_path: Path, tiny_fast_model) -> None:
    checkpoint = tmp_path / "tiny.pt"
    tiny_fast_model().save(checkpoint)
    out = tmp_path / "latency.json"
    cmd = [sys.executable, str(SCRIPT), "--model", str(checkpoint), "--engine", "torch:fp32", "--requests", "12",
           "--loads", "0.5", "--burst", "6", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["capacity_images_per_s"] > 0 and "real" in result["cost"]
    rows = result["rows"]
    names = ["cascade", "staged", "staged+overlap (held)", "staged+overlap (always)"]
    assert [r["scheduler"] for r in rows] == names
    assert all(r["load"] == 0.5 and 0 < r["p50_s"] <= r["p99_s"] and r["images_per_s"] > 0 for r in rows)
    assert "| 50% | staged+overlap (held) |" in proc.stdout


def test_the_sweeps_fashion32_schedule_is_the_embedded_checkpoints() -> None:
    """benchmarks/scheduler/run.py simulates fashion32 with its served schedule's evaluations per stage."""
    import importlib.util

    from lowdiff.model import load_model

    spec = importlib.util.spec_from_file_location("scheduler_run", SCRIPT.parent / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.FASHION32_NFE == tuple(load_model().config.schedule.nfe)
