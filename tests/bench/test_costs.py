"""lowdiff.bench.costs (cost table) and lowdiff.bench.profiling (profile summary), on the CPU with a tiny model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowdiff.bench.costs import (
    DEFAULT_BATCHES,
    SCHEMA,
    check_cost_table,
    cost_table,
    merge_cost_tables,
    read_cost_table,
    seconds_per_evaluation,
    stage_call,
    time_calls,
    write_cost_outputs,
)
from lowdiff.bench.profiling import CATEGORY_NAMES, OpTime, category_of, profile_engine, profile_markdown, summarize
from lowdiff.cli.commands.bench import DEFAULT_BATCHES as CLI_DEFAULT_BATCHES

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def table(tiny_fast_model) -> dict:
    model = tiny_fast_model()
    return cost_table(
        [(model, "tiny")], [("torch", "fp32"), ("cudagraph", "fp32")], batches=(1, 2), warmup=1, repeats=2
    )


def test_cost_table_follows_the_schema(table, tiny_fast_model) -> None:
    assert check_cost_table(table) is table
    assert table["schema"] == SCHEMA and table["batches"] == [1, 2]
    config = table["configs"]["tiny"]
    assert config["resolutions"] == [8, 16, 32]
    assert config["nfe"] == {str(s.resolution): s.nfe for s in tiny_fast_model().config.schedule.stages}
    torch_entry = config["engines"]["torch:fp32"]
    assert torch_entry["method"] == "evaluation" and torch_entry["error"] is None
    assert set(torch_entry["resolutions"]) == {"8", "16", "32"}
    for points in torch_entry["resolutions"].values():
        assert [p["batch"] for p in points] == [1, 2]
        for p in points:
            assert len(p["seconds_all"]) == 2 and p["seconds"] == pytest.approx(statistics.median(p["seconds_all"]))
            assert p["seconds"] > 0
    # An engine this machine lacks is recorded with its reason, not raised.
    graph = config["engines"]["cudagraph:fp32"]
    assert graph["resolutions"] == {} and "GPU" in graph["error"]


def test_outputs_and_reading_back(table, tmp_path: Path) -> None:
    json_path, md, png = write_cost_outputs(table, tmp_path / "costs.json")
    assert read_cost_table(json_path) == json.loads(json.dumps(table))
    text = md.read_text()
    assert "### torch:fp32 — method evaluation" in text and "| 32×32 (5) |" in text
    assert "needs an NVIDIA GPU" in text
    if png is not None:
        assert png.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="schema"):
        check_cost_table({"schema": "other"})
    bad = json.loads(json.dumps(table))
    bad["configs"]["tiny"]["engines"]["torch:fp32"]["resolutions"]["8"][0]["seconds"] = -1.0
    with pytest.raises(ValueError, match=r"resolutions\.8"):
        check_cost_table(bad)


def test_lookup_interpolates_in_log_log() -> None:
    points = [{"batch": 1, "seconds": 0.001}, {"batch": 4, "seconds": 0.004}, {"batch": 16, "seconds": 0.008}]
    engine = {"engine": "torch", "precision": "fp32", "method": "evaluation", "resolutions": {"32": points}}
    t = {"schema": SCHEMA, "configs": {"m": {"nfe": {"32": 5}, "engines": {"torch:fp32": engine}}}}
    assert check_cost_table(t)
    assert seconds_per_evaluation(t, "m", "torch:fp32", 32, 4) == 0.004
    assert seconds_per_evaluation(t, "m", "torch:fp32", 32, 2) == pytest.approx(0.002)  # on the log-log line
    assert seconds_per_evaluation(t, "m", "torch:fp32", 32, 8) == pytest.approx(0.004 * 2**0.5)
    assert seconds_per_evaluation(t, "m", "torch:fp32", 32, 64) == pytest.approx(0.032)  # above: ∝ batch


def test_merge_unites_engines_and_batches(table) -> None:
    other = json.loads(json.dumps(table))
    other["batches"] = [4]
    other["configs"]["tiny"]["engines"] = {"compile:bf16": {**table["configs"]["tiny"]["engines"]["torch:fp32"],
                                                            "engine": "compile", "precision": "bf16"}}  # fmt: skip
    other["configs"]["edm"] = json.loads(json.dumps(table["configs"]["tiny"]))
    merged = check_cost_table(merge_cost_tables([table, other]))
    assert merged["batches"] == [1, 2, 4]
    assert set(merged["configs"]["tiny"]["engines"]) == {"torch:fp32", "cudagraph:fp32", "compile:bf16"}
    assert set(merged["configs"]) == {"tiny", "edm"}


def test_stage_runners_are_timed_per_stage_and_divided_by_nfe(tiny_fast_model) -> None:
    """The cudagraph path (a runner that owns its loop), without a GPU: a fake runner records its calls."""
    model = tiny_fast_model()

    class LoopRunner:
        buckets = (1, 2, 4)

        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def run_stage(self, stage, noise, class_labels, condition, sigma_cond):
            self.calls.append((stage, noise, class_labels, condition, sigma_cond))
            return noise

    runners = {r: LoopRunner() for r in model.config.resolutions}
    engine = SimpleNamespace(model=model, runners=runners)
    first, second = stage_call(engine, 8, 3), stage_call(engine, 16, 3)
    assert (first.method, first.evaluations) == ("stage/nfe", model.config.schedule.stages[0].nfe)
    assert second.evaluations == model.config.schedule.stages[1].nfe
    times = time_calls(second.call, cuda=False, warmup=1, repeats=2)
    assert len(times) == 2 and len(runners[16].calls) == 3
    stage, noise, labels, condition, sigma_cond = runners[16].calls[0]
    assert stage is model.config.schedule.stages[1]
    assert noise.dtype == torch.float64 and noise.shape == (3, 1, 16, 16)
    assert labels.tolist() == [0, 1, 2] and condition.shape == (3, 1, 16, 16) and sigma_cond == 0.5
    first.call()
    assert runners[8].calls[0][3] is None and runners[8].calls[0][4] is None  # the first stage is unconditioned


def test_cli_default_batches_match() -> None:
    assert CLI_DEFAULT_BATCHES == ",".join(map(str, DEFAULT_BATCHES))


# ---------------------------------------------------------------------------- profile
def test_categories_of_cpu_ops_and_cuda_kernel_names() -> None:
    names = {
        "aten::mkldnn_convolution": "convolution",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw_tilesize128x128x64": "convolution",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false, true>": "convolution",
        "aten::native_group_norm": "groupnorm",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float)": "groupnorm",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl<at::native::(anonymous namespace)"
        "::GroupNormKernelImplInternal<float, float>(…)::{lambda(float)#1}>": "groupnorm",
        "triton_per_fused_native_group_norm_silu_3": "groupnorm",
        "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel>": "silu",
        "aten::silu": "silu",
        "void (anonymous namespace)::softmax_warp_forward<float, float, float, 8, false>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": "attention",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64": "attention",
        "aten::bmm": "attention",
        "aten::addmm": "attention",
        "triton_poi_fused_add_mul_4": "elementwise",
        "Memcpy HtoD (Pageable -> Device)": "elementwise",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>": "elementwise",
        "aten::add": "elementwise",
        "aten::avg_pool2d": "elementwise",
        "aten::empty": "other",
    }
    assert {n: category_of(n) for n in names} == names


def test_summary_shares_and_top_per_evaluation() -> None:
    ops = [OpTime("conv_kernel_fprop", 0.6, 10), OpTime("aten::silu", 0.3, 5), OpTime("mystery", 0.1, 1)]
    s = summarize(ops, evaluations=2, top=2)
    assert s["total_s_per_evaluation"] == pytest.approx(0.5)
    assert s["categories"]["convolution"] == {"seconds": pytest.approx(0.3), "share": pytest.approx(0.6)}
    assert s["categories"]["other"]["share"] == pytest.approx(0.1)
    assert sum(c["share"] for c in s["categories"].values()) == pytest.approx(1.0)
    assert [t["name"] for t in s["top"]] == ["conv_kernel_fprop", "aten::silu"]
    assert s["top"][0]["calls"] == 5 and s["top"][0]["seconds"] == pytest.approx(0.3)


def test_profile_of_one_evaluation_on_the_cpu(tiny_fast_model) -> None:
    model = tiny_fast_model()
    entry = profile_engine(model, "torch", batch=2, warmup=1)
    assert (entry["resolution"], entry["batch"], entry["activity"], entry["method"]) == (32, 2, "cpu", "evaluation")
    assert set(entry["categories"]) == set(CATEGORY_NAMES)
    assert sum(c["share"] for c in entry["categories"].values()) == pytest.approx(1.0)
    for category in ("convolution", "groupnorm", "silu", "attention"):  # the network has all of them
        assert entry["categories"][category]["share"] > 0, category
    shares = [t["share"] for t in entry["top"]]
    assert shares == sorted(shares, reverse=True) and entry["top"][0]["category"] == "convolution"
    missing = profile_engine(model, "cudagraph", batch=2)
    assert "GPU" in missing["error"]
    assert profile_engine(model, "torch", resolution=64)["error"].endswith("no 64×64 stage")
    md = profile_markdown({"profiles": [entry, missing]})
    assert "| torch:fp32 (evaluation) | cpu |" in md and "error: " in md


def test_bench_cli_cost_table_and_profile(lowdiff_cli, tiny_fast_model, tmp_path: Path) -> None:
    model = tiny_fast_model()
    model.save(tmp_path / "tiny.pt")
    model.save(tmp_path / "other.pt")
    out = tmp_path / "costs.json"
    proc = lowdiff_cli(
        "bench", "--cost-table", "--checkpoint", str(tmp_path / "tiny.pt"), "--compare", str(tmp_path / "other.pt"),
        "--engine", "torch", "--batches", "2,1", "--repeats", "1", "--warmup-runs", "0", "--threads", "1",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = read_cost_table(out)
    assert table["batches"] == [1, 2] and table["repeats"] == 1
    assert table["configs"]["tiny"]["weights"].startswith("checkpoint ")
    assert out.with_suffix(".md").exists()
    bad = lowdiff_cli("bench", "--cost-table", "--config", "fashion32", "--batches", "0,x", "--json", str(out))
    assert bad.returncode == 2 and "--batches" in bad.stderr
    prof = tmp_path / "profile.json"
    proc = lowdiff_cli(
        "bench", "--profile", "--checkpoint", str(tmp_path / "tiny.pt"), "--engine", "torch", "--batch", "2",
        "--resolution", "16", "--threads", "1", "--json", str(prof),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(prof.read_text())
    assert report["profiles"][0]["resolution"] == 16 and "categories" in report["profiles"][0]
    assert "| torch:fp32 (evaluation) | cpu |" in prof.with_suffix(".md").read_text()
