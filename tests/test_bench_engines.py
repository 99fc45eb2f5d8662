"""Engine selection errors, the TensorRT mismatch rule, CUDA-graph buckets, and `lowdiff bench` output."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from lowdiff.bench.measure import bench_model, effective_nfe, parse_engines
from lowdiff.cli import main
from lowdiff.engines import ENGINE_KINDS, load_engine
from lowdiff.engines.cudagraph import bucket_for, cudagraph_runners
from lowdiff.engines.onnxruntime_engine import providers_for
from lowdiff.engines.tensorrt_engine import EngineMismatch, check_engine_target, tensorrt_runners
from lowdiff.errors import EngineUnavailable, SettingsError
from lowdiff.export.tensorrt_build import engine_file_name
from lowdiff.model import LowDiffModel
from tests.conftest import tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these tiny models gain nothing from two, and on a busy 2-core machine
    OpenMP's two-thread barriers can make eager PyTorch many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def lowdiff(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in-process (a fresh interpreter costs seconds of imports on a busy CI machine)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: CUDA graphs are available")
def test_cudagraph_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(EngineUnavailable, match="needs an NVIDIA GPU"):
        load_engine(LowDiffModel(tiny_config()), "cudagraph", "cuda")
    with pytest.raises(EngineUnavailable, match="needs an NVIDIA GPU"):  # the runtime's own check too
        cudagraph_runners(LowDiffModel(tiny_config()), "cuda")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_without_library_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="'tensorrt' Python package"):
        tensorrt_runners(LowDiffModel(tiny_config()), tmp_path, "cuda", "fp16")


def test_onnxruntime_on_gpu_without_gpu_provider_is_a_clear_error() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider")
    with pytest.raises(EngineUnavailable, match="no CUDA or TensorRT execution provider"):
        providers_for("cuda")


def test_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(SettingsError, match="available: " + ", ".join(ENGINE_KINDS)):
        load_engine(LowDiffModel(tiny_config()), "tvm")


def test_cli_reports_a_missing_runtime_in_one_line() -> None:
    kind = "cudagraph" if not torch.cuda.is_available() else None
    if kind is None:
        pytest.skip("this machine has a GPU")
    proc = lowdiff("bench", "--config", "fashion32", "--engine", "cudagraph", "--device", "cuda", "--json", "x.json")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lowdiff bench: error: --engine: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_export_tensorrt_without_library_is_a_clear_error(tmp_path: Path) -> None:
    proc = lowdiff("export", "--config", "fashion32", "--format", "tensorrt", "--out", str(tmp_path / "trt"))
    assert proc.returncode == 2
    assert "TensorRT" in proc.stderr and "Traceback" not in proc.stderr


def test_tensorrt_engine_for_another_gpu_or_version_says_rebuild(tmp_path: Path) -> None:
    name = engine_file_name(8, (8, 9), "10.3.0", "fp16")
    assert name == "stage8.sm89.trt10.3.0.fp16.engine"
    manifest = {
        "precision": "fp16",
        "tensorrt": {"version": "10.3.0", "compute_capability": [8, 9]},
        "stages": [{"resolution": 8, "file": name}],
    }
    check_engine_target(manifest, (8, 9), "10.3.0", tmp_path)  # its own GPU and version: accepted
    for capability, version in (((9, 0), "10.3.0"), ((8, 9), "10.4.0")):
        with pytest.raises(EngineMismatch, match="rebuild"):
            check_engine_target(manifest, capability, version, tmp_path)


def test_batches_pad_to_the_next_bucket() -> None:
    buckets = (1, 2, 4, 8, 16, 32, 64)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 64, 64]


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


def test_bench_model_measures_every_stage() -> None:
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


def test_bench_cli_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = lowdiff(
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


def test_cudagraph_capture_function_reproduces_the_shared_loop() -> None:
    """What CUDA graphs capture, run eagerly on the CPU: padded bucket, σ from the schedule's table."""
    from lowdiff.engines.cudagraph import CudaGraphStage
    from lowdiff.model import TorchStage
    from lowdiff.sampler import heun_stage

    torch.manual_seed(0)
    model = LowDiffModel(tiny_config())
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    stage = model.config.schedule.stages[1]  # 16×16: conditioned, truncated
    runner = CudaGraphStage(model.denoiser, 16, 1, True, True, torch.device("cpu"), "fp32", (1, 2, 4), None)
    batch, bucket, sigma_cond = 3, 4, 1.7
    noise = torch.randn(batch, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([1, 5, 9])
    condition = torch.randn(batch, 1, 16, 16)
    expected = heun_stage(stage, TorchStage(model.denoiser, 16), noise, labels, condition, sigma_cond)

    pad = bucket - batch
    static_sigma_cond = torch.full((bucket,), sigma_cond)
    fn = runner.stage_fn(runner.sigma_table(stage, bucket), static_sigma_cond)
    with torch.no_grad():
        got = heun_stage(
            stage,
            fn,
            torch.cat([noise, torch.zeros(pad, 1, 16, 16, dtype=torch.float64)]),
            torch.cat([labels, torch.zeros(pad, dtype=torch.long)]),
            torch.cat([condition, torch.zeros(pad, 1, 16, 16)]),
            1.0,  # a placeholder, as in capture: the real σ_cond is the static buffer
        )
    assert len(runner.sigma_table(stage, bucket)) == len(stage.sigmas())
    assert (got[:batch] - expected).abs().max() <= 1e-4
    assert (expected - noise * stage.sigmas()[0]).abs().max() > 1e-2


def test_cpu_bf16_is_an_approximation_of_fp32_and_fp16_is_refused() -> None:
    torch.manual_seed(0)
    model = LowDiffModel(tiny_config())
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    seeds, labels = [0, 1, 2], [3, 4, 5]
    bf16 = load_engine(model, "torch", "cpu", "bf16").generate(seeds, labels).int()
    fp32 = model.generate(seeds, labels).int()
    diff = (bf16 - fp32).abs().float()
    assert diff.mean() < 2  # close on average; not the ≤ 2 levels per pixel of the fp32 engines
    assert diff.max() > 0  # and it really ran in bf16 (its rounding changes some pixels)
    with pytest.raises(SettingsError, match="fp32 or bf16"):
        load_engine(model, "torch", "cpu", "fp16")
