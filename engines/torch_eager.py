"""PyTorch eager stage runners: fp32 (CPU, CUDA), bf16 autocast (CPU), bf16/fp16 autocast (CUDA).

Tensors stay in the default NCHW layout on CUDA too: on an H100 (benchmarks/gpu/) one paper-size
evaluation at batch 64 took 22.7 ms NCHW vs 29.3 ms channels-last in bf16 (26.0 vs 32.4 ms fp32), so
the channels-last conversion the engines first used was dropped.

The shared Heun loop runs on the runner's device (``FunctionStage(…, device)``): on CUDA a stage's
inputs go over once and its result comes back once.
"""

from __future__ import annotations

import copy

import torch

from lowdiff.errors import EngineUnavailable, SettingsError
from lowdiff.model import PRECISIONS, LowDiffModel, TorchDecode, TorchStage
from lowdiff.sampler import FunctionStage, StageRunner


def resolve_device(device: str) -> torch.device:
    """A torch device for ``device`` ('cpu', 'cuda', 'cuda:N'); a missing GPU is :class:`EngineUnavailable`."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SettingsError(f"expected 'cpu' or 'cuda', got {device!r}", "device") from None
    if dev.type not in ("cpu", "cuda"):
        raise SettingsError(f"expected 'cpu' or 'cuda', got {device!r}", "device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable(f"no CUDA GPU on this machine (torch {torch.__version__}); use --device cpu", "device")
    return dev


def torch_runners(model: LowDiffModel, device: str, precision: str) -> dict[int, StageRunner]:
    """The reference stage function (:class:`lowdiff.model.TorchStage`) on ``device`` with the shared Heun loop."""
    if precision not in PRECISIONS:
        raise SettingsError(f"expected one of {', '.join(PRECISIONS)}, got {precision!r}", "precision")
    dev = resolve_device(device)
    if dev.type == "cpu" and precision == "fp16":
        # bf16 autocast on the CPU runs convolutions on AMX / AVX512-BF16 where the CPU has them
        # (about 2× fp32 on Sapphire Rapids, see benchmarks/); fp16 has no fast CPU kernels.
        raise SettingsError("the CPU runs fp32 or bf16 (fp16 is for CUDA)", "precision")
    denoiser = model.denoiser if dev.type == "cpu" else copy.deepcopy(model.denoiser).to(dev)
    denoiser.eval()
    null = model.config.null_label
    return {
        r: FunctionStage(TorchStage(denoiser, r, dev, precision), dev, null_label=null)
        for r in model.config.resolutions
    }


def torch_decoder(model: LowDiffModel, device: str, precision: str) -> TorchDecode | None:
    """A latent model's decode stage in eager PyTorch on ``device`` (None for a pixel model)."""
    if model.decoder is None:
        return None
    dev = resolve_device(device)
    decoder = model.decoder if dev.type == "cpu" else copy.deepcopy(model.decoder).to(dev)
    return TorchDecode(decoder.eval(), model.config.resolutions[-1], dev, precision)
