"""``compile``: each stage's denoiser evaluation compiled by ``torch.compile`` (inductor).

On the CPU, inductor generates fused C++/OpenMP kernels (GroupNorm + SiLU and the elementwise
preconditioning fused, convolutions through oneDNN); the stage function is the reference
:class:`lowdiff.model.TorchStage` with the compiled denoiser in place of the eager one, driven by the
shared Heun loop (:class:`FunctionStage`). Shapes are static: a batch is padded up to its bucket
(1, 2, 4, …, 64, as the CUDA-graph engine does; rows are independent, so padding never changes a
real image beyond float rounding), and each (stage, bucket) compiles once, on first use. Dynamic
batch shapes were tried first and dropped: with torch 2.13 on the CPU, ``dynamic=True`` failed in
inductor (symbolic image sizes) and a batch-only ``mark_dynamic`` raised a constraint violation
(a guard ``batch ≤ 15``).

On CUDA the compiled denoiser runs inside the project's own CUDA-graph capture
(:mod:`lowdiff.engines.cudagraph`, one graph per stage and batch bucket, static shapes): inductor's
Triton kernels are captured like any other, so launch overhead goes away as well. This path has not
run on a GPU yet (README, "Deployment").

Compiling costs seconds to minutes per graph, paid during warm-up (before ``/readyz`` turns 200) and
kept across restarts by inductor's on-disk cache: ``engine_dir`` (``--engine-dir``) becomes
``TORCHINDUCTOR_CACHE_DIR``: point it at a persistent volume (with the Helm chart, `settings.engineDir`
on the engine-cache volume) so that a restarted pod does not compile again.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from lowdiff.engines.cudagraph import DEFAULT_BUCKETS, bucket_for, cudagraph_runners
from lowdiff.engines.torch_eager import resolve_device
from lowdiff.errors import SettingsError
from lowdiff.model import PRECISIONS, LowDiffModel, TorchStage
from lowdiff.precond import Denoiser
from lowdiff.sampler import FunctionStage, StageRunner


def use_cache_dir(engine_dir: str | Path | None) -> None:
    """Point inductor's on-disk cache at ``engine_dir`` (process-wide; before the first compile)."""
    if engine_dir is not None:
        Path(engine_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(engine_dir).resolve())


def compile_denoiser(denoiser: Denoiser) -> Any:
    """The denoiser's forward compiled by inductor, static shapes (full graph: a graph break would be a
    silent slowdown). Every (resolution, batch bucket) is its own graph of the same forward, so dynamo's
    per-function recompile limit (8 by default; past it, it silently falls back to eager) is raised."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(denoiser, dynamic=False, fullgraph=True)


class BucketedStage:
    """A stage function that pads the batch up to a bucket, so that compiled graphs see few shapes."""

    def __init__(self, fn: TorchStage, buckets: tuple[int, ...]):
        self.fn = fn
        self.buckets = tuple(sorted(buckets))

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, largest = x.shape[0], self.buckets[-1]
        if batch > largest:
            parts = [
                self(
                    *(
                        None if t is None else t[i : i + largest]
                        for t in (x, sigma, class_labels, condition, sigma_cond)
                    )
                )
                for i in range(0, batch, largest)
            ]
            return torch.cat(parts)
        bucket = bucket_for(batch, self.buckets)
        if bucket == batch:
            return self.fn(x, sigma, class_labels, condition, sigma_cond)

        def pad(t: torch.Tensor | None, fill_from_first: bool = False) -> torch.Tensor | None:
            if t is None:
                return None
            extra = (
                t[:1].expand(bucket - batch, *t.shape[1:])
                if fill_from_first
                else t.new_zeros(bucket - batch, *t.shape[1:])
            )
            return torch.cat([t, extra])

        out = self.fn(pad(x), pad(sigma, True), pad(class_labels), pad(condition), pad(sigma_cond, True))
        return out[:batch]


def compiled_runners(
    model: LowDiffModel,
    device: str = "cpu",
    precision: str = "fp32",
    engine_dir: str | Path | None = None,
) -> dict[int, StageRunner]:
    if precision not in PRECISIONS:
        raise SettingsError(f"expected one of {', '.join(PRECISIONS)}, got {precision!r}", "precision")
    dev = resolve_device(device)
    if dev.type == "cpu" and precision == "fp16":
        raise SettingsError("the CPU runs fp32 or bf16 (fp16 is for CUDA)", "precision")
    use_cache_dir(engine_dir)
    if dev.type == "cuda":
        if model.config.latent:  # the CUDA-graph loop is Heun's; flow stages have none captured yet
            raise SettingsError("'compile' on CUDA runs pixel (Heun) cascades only; use --device cpu", "device")
        return cudagraph_runners(model, device, precision, transform=compile_denoiser)
    compiled = compile_denoiser(copy.deepcopy(model.denoiser).eval())
    null = model.config.null_label
    return {
        r: FunctionStage(BucketedStage(TorchStage(compiled, r, dev, precision), DEFAULT_BUCKETS), null_label=null)
        for r in model.config.resolutions
    }
