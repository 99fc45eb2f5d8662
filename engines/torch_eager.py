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

from lowdiff.model import LowDiffModel
from lowdiff.precond import Denoiser
from lowdiff.sampler import FunctionStage, StageRunner

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    from engines import EngineUnavailable

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable(f"device {device!r}: no CUDA GPU on this machine (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda'")
    return dev


class TorchEagerStage:
    """One stage function: runs the denoiser on the device (host σ tensors moved there), returns fp32 on
    the device."""

    def __init__(self, denoiser: Denoiser, resolution: int, device: torch.device, precision: str):
        self.denoiser = denoiser
        self.resolution = resolution
        self.device = device
        self.autocast_dtype = PRECISIONS[precision]

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device, non_blocking=True)

        xd = to(x)
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=enabled):
            out = self.denoiser(xd, to(sigma), to(class_labels), self.resolution, to(condition), to(sigma_cond))
        return out.float()


def torch_runners(model: LowDiffModel, device: str, precision: str) -> dict[int, StageRunner]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    if dev.type == "cpu" and precision == "fp16":
        # bf16 autocast on the CPU runs convolutions on AMX / AVX512-BF16 where the CPU has them
        # (about 2× fp32 on Sapphire Rapids, see benchmarks/); fp16 has no fast CPU kernels.
        raise ValueError("precision: the CPU path runs fp32 or bf16 (fp16 is for CUDA)")
    denoiser = model.denoiser if dev.type == "cpu" else copy.deepcopy(model.denoiser).to(dev)
    denoiser.eval()
    return {r: FunctionStage(TorchEagerStage(denoiser, r, dev, precision), dev) for r in model.config.resolutions}
