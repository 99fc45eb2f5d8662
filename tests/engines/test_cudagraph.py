"""CUDA graphs without a GPU, batch buckets, and the captured function run eagerly on the CPU."""

from __future__ import annotations

import pytest
import torch

from lowdiff.engines import load_engine
from lowdiff.engines.cudagraph import bucket_for, bucket_ladder, cudagraph_runners
from lowdiff.errors import EngineUnavailable
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: CUDA graphs are available")
def test_cudagraph_without_gpu_is_a_clear_error(tiny_config) -> None:
    with pytest.raises(EngineUnavailable, match="needs an NVIDIA GPU"):
        load_engine(LowDiffModel(tiny_config()), "cudagraph", "cuda")
    with pytest.raises(EngineUnavailable, match="needs an NVIDIA GPU"):  # the runtime's own check too
        cudagraph_runners(LowDiffModel(tiny_config()), "cuda")


def test_batches_pad_to_the_next_bucket() -> None:
    buckets = (1, 2, 4, 8, 16, 32, 64)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 64, 64]


def test_a_stage_limit_gives_buckets_up_to_the_first_power_of_two_that_holds_it() -> None:
    assert bucket_ladder(512) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert bucket_ladder(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_ladder(100)[-2:] == (64, 128)
    assert bucket_ladder(1) == (1,)
    with pytest.raises(ValueError):
        bucket_ladder(0)


def test_cudagraph_capture_function_reproduces_the_shared_loop(tiny_config) -> None:
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
