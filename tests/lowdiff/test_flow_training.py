"""The latent cascade's flow loss (Algorithm 1 with LightningDiT's loss)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowdiff.flow_training import flow_cascade_loss


def test_the_loss_covers_every_stage_and_trains_the_tiny_dit(tiny_latent_model: Callable) -> None:
    torch.manual_seed(0)
    model = tiny_latent_model()
    denoiser = model.denoiser.train()
    latents = torch.randn(8, 4, 8, 8) * 0.5 + torch.linspace(-1, 1, 4)[None, :, None, None]
    labels = torch.arange(8) % 10
    opt = torch.optim.Adam([p for p in denoiser.parameters() if p.requires_grad], lr=1e-2)

    def loss_at(step: int) -> tuple[torch.Tensor, dict[int, float]]:
        return flow_cascade_loss(denoiser, model.config, latents, labels, torch.Generator().manual_seed(step))

    first, per_stage = loss_at(0)
    assert set(per_stage) == {4, 8} and all(v > 0 for v in per_stage.values())
    first.backward()
    grads = {n for n, p in denoiser.net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"inputs.4.proj.weight", "inputs.8.proj.weight", "map_resolution.weight"} <= grads
    opt.zero_grad()
    for _ in range(12):  # the same draws each step: the loss on them must fall
        loss, _ = loss_at(0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss_at(0)[0].detach()) < 0.9 * float(first.detach())


def test_the_loss_is_a_function_of_the_generator(tiny_latent_model: Callable) -> None:
    model = tiny_latent_model()
    latents, labels = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4])
    a = flow_cascade_loss(model.denoiser, model.config, latents, labels, torch.Generator().manual_seed(5))[0]
    b = flow_cascade_loss(model.denoiser, model.config, latents, labels, torch.Generator().manual_seed(5))[0]
    c = flow_cascade_loss(model.denoiser, model.config, latents, labels, torch.Generator().manual_seed(6))[0]
    assert float(a) == float(b) and float(a) != float(c)
