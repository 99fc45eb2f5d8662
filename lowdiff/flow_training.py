"""Algorithm 1 of the paper with LightningDiT's flow loss, for the latent (DiT) configs.

Per stage resolution r (all stages, summed, as the pixel cascade): the clean latent brought to r by
average pooling, t from LightningDiT's logit-normal (sigmoid of N(0, 1)), x_t = t·x + (1 − t)·ε, target
velocity x − ε, loss = mean squared error + LightningDiT's cosine term (1 − cos along channels), each a
mean over elements. A conditioned stage also gets the latent at the previous resolution, noised with
independent ε' at its own logit-normal time t_c and upsampled (nearest) — truncation augmentation, as
the pixel cascade draws σ_cond from its training distribution. Labels are replaced by the null class
with the config's ``label_dropout`` (0.1), which is what makes guidance possible.

The loop around it (optimiser, EMA, checkpoints) is lowdiff/training.py's; wiring this loss into it
is a later, small change (that module is being reworked for distributed training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowdiff.configs import ModelConfig
from lowdiff.dit import DiTConfig
from lowdiff.precond import Denoiser
from lowdiff.sampler import upsample_condition


def logit_normal(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.sigmoid(torch.randn(batch, generator=generator, device=device))


def flow_cascade_loss(
    denoiser: Denoiser,
    config: ModelConfig,
    latents: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[int, float]]:
    """The summed loss over stages and each stage's value; every draw from ``generator``."""
    if not isinstance(config.network, DiTConfig):
        raise ValueError(f"{config.name} is not a latent (DiT) config")
    net = config.network
    batch, device = latents.shape[0], latents.device
    if labels is not None and net.label_dropout > 0:
        drop = torch.rand(batch, generator=generator, device=device) < net.label_dropout
        labels = torch.where(drop, torch.full_like(labels, net.label_dim), labels)
    total = torch.zeros((), device=device)
    per_stage: dict[int, float] = {}
    for k, r in enumerate(config.resolutions):
        x1 = F.avg_pool2d(latents, latents.shape[-1] // r) if latents.shape[-1] > r else latents
        t = logit_normal(batch, generator, device)
        eps = torch.randn(x1.shape, generator=generator, device=device)
        tb = t[:, None, None, None]
        xt, target = tb * x1 + (1 - tb) * eps, x1 - eps
        condition = t_cond = None
        if k > 0:
            prev = config.resolutions[k - 1]
            low = F.avg_pool2d(latents, latents.shape[-1] // prev)
            t_cond = logit_normal(batch, generator, device)
            noise = torch.randn(low.shape, generator=generator, device=device)
            tc = t_cond[:, None, None, None]
            condition = upsample_condition(tc * low + (1 - tc) * noise, r)
        v = denoiser(xt, t, labels, r, condition, t_cond)
        loss = (v - target).square().mean() + (1 - F.cosine_similarity(v, target, dim=1)).mean()
        per_stage[r] = float(loss.detach())
        total = total + loss
    return total, per_stage
