"""`lowdiff bench` output: the JSON report, the Markdown table and the plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_cli_writes_json_markdown_and_plot(lowdiff_cli, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = lowdiff_cli(
        "bench", "--config", "fashion32", "--compare", "edm-fashion32", "--engine", "onnxruntime,torch",
        "--batch", "1", "--runs", "1", "--threads", "1", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"results", "ratio"}
    keys = {"config", "engine", "device", "batch", "latency_s_mean", "latency_s_p50", "latency_s_p90",
            "throughput_img_s", "stages"}  # fmt: skip
    for result in report["results"]:
        assert keys <= set(result)
        assert result["batch"] == 1 and result["runs"] == 1
    # Both engines for each model, measured round-robin; the ratio compares the models on the first engine.
    pairs = [(r["config"], r["engine"]) for r in report["results"]]
    assert pairs == [("fashion32", "onnxruntime"), ("fashion32", "torch"), ("edm-fashion32", "onnxruntime"),
                     ("edm-fashion32", "torch")]  # fmt: skip
    first, second = report["results"][0], report["results"][2]
    assert report["ratio"] == pytest.approx(first["throughput_img_s"] / second["throughput_img_s"])
    assert [s["nfe"] for s in first["stages"]] == [18, 13, 17]
    assert "| fashion32 |" in out.with_suffix(".md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_dir_defaults_outside_the_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowdiff.bench.report import results_dir

    repo = Path(__file__).resolve().parents[2]
    made = results_dir(None, "unit")
    try:
        assert made.is_dir() and made.name.startswith("lowdiff-unit-")
        assert repo not in made.resolve().parents
        assert f"results: {made}" in capsys.readouterr().out
    finally:
        made.rmdir()
    named = results_dir(tmp_path / "a" / "b", "unit")
    assert named == tmp_path / "a" / "b" and named.is_dir()
