"""lowdiff.bench.measure: engine lists, effective NFE (appendix B), per-stage measurement."""

from __future__ import annotations

import math

import pytest

from lowdiff.bench.measure import bench_model, effective_nfe, parse_engines
from lowdiff.errors import SettingsError
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_engine_lists_parse_with_precisions() -> None:
    assert parse_engines("torch,onnxruntime,torch:bf16", "fp32") == [
        ("torch", "fp32"),
        ("onnxruntime", "fp32"),
        ("torch", "bf16"),
    ]
    with pytest.raises(SettingsError, match="unknown engine 'tvm'"):
        parse_engines("torch,tvm", "fp32")
    with pytest.raises(SettingsError, match="twice"):
        parse_engines("torch,torch:fp32", "fp32")


def test_effective_nfe_follows_appendix_b() -> None:
    stages = [
        {"nfe": 18, "step_latency_s": 0.3},
        {"nfe": 13, "step_latency_s": 0.5},
        {"nfe": 17, "step_latency_s": 1.0},
    ]
    # 18·0.3 + 13·0.5 + 17 = 28.9 → 29
    assert effective_nfe(stages) == math.ceil(18 * 0.3 + 13 * 0.5 + 17)
    assert effective_nfe([{"nfe": 35, "step_latency_s": 0.02}]) == 35


def test_bench_model_measures_every_stage(tiny_config) -> None:
    model = LowDiffModel(tiny_config())
    # ONNX Runtime with one thread: fast and steady on a loaded 2-core CI machine.
    result = bench_model(model, "onnxruntime", batch=2, runs=2, warmup_runs=1, threads=1)
    assert len(result["latency_s_all"]) == 2
    assert [s["resolution"] for s in result["stages"]] == [8, 16, 32]
    assert [s["nfe"] for s in result["stages"]] == list(model.config.schedule.nfe)
    stage_sum = sum(s["latency_s_mean"] for s in result["stages"])
    assert 0 < stage_sum <= result["latency_s_mean"] * 1.05
    assert result["throughput_img_s"] == pytest.approx(2 / result["latency_s_mean"])
    assert result["latency_s_p50"] <= result["latency_s_p90"]
    assert result["effective_nfe"] == effective_nfe(result["stages"])
