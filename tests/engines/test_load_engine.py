"""engines.load_engine: unknown names, a missing GPU provider, CPU bf16 (and fp16 refused)."""

from __future__ import annotations

import pytest
import torch

from lowdiff.engines import ENGINE_KINDS, load_engine
from lowdiff.engines.onnxruntime_engine import providers_for
from lowdiff.errors import EngineUnavailable, SettingsError
from lowdiff.model import LowDiffModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_onnxruntime_on_gpu_without_gpu_provider_is_a_clear_error() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider")
    with pytest.raises(EngineUnavailable, match="no CUDA or TensorRT execution provider"):
        providers_for("cuda")


def test_unknown_engine_names_the_known_ones(tiny_config) -> None:
    with pytest.raises(SettingsError, match="available: " + ", ".join(ENGINE_KINDS)):
        load_engine(LowDiffModel(tiny_config()), "tvm")


def test_cpu_bf16_is_an_approximation_of_fp32_and_fp16_is_refused(tiny_config) -> None:
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
