"""Preconditioning (EDM's VP and EDM forms) around the unified network, one stage at a time.

``Denoiser.forward(x, sigma, class_labels, resolution, condition, sigma_cond)`` returns D(x; σ),
the denoised image. A conditioned stage's condition is itself a noisy image (the previous stage's
truncated output, or in training the downsampled clean image with independent noise), so it is
scaled by the same c_in rule at its own noise level ``sigma_cond``: without that, a condition at
σ = 80 would swamp the input convolution.

That scaling is ours, not the paper's (which only says the noisy low-resolution image is upsampled and
concatenated). It is EDM's own reason for c_in applied to the second input: c_in(σ) = 1/√(σ² + σ_data²)
gives the noisy input unit variance at every σ, and the condition is a noisy image of the same kind
(data plus noise at σ_cond), so scaled the same way it too reaches the first convolution with unit
variance whether σ_cond is 0.01 or 80 — four orders of magnitude apart unscaled. It costs one
multiply per evaluation, and the ONNX/TensorRT stages carry it inside, so no runtime can forget it.

``kind="flow"`` wraps a latent :class:`~lowdiff.dit.UnifiedDiT` trained by rectified flow
(LightningDiT's recipe): no preconditioning at all. Its "σ" argument is the flow time t ∈ [0, 1]
(t = 1 is data) and it returns the velocity, not a denoised image; the flow Euler loop of
:mod:`lowdiff.sampler` knows that. The condition's level (``sigma_cond``, the hand-off time) is not an
input of the DiT: latents are normalised to unit variance, so x_t = t·x + (1 − t)·ε keeps a variance
between ½ and 1 at every t and needs no c_in-style rescaling, and the paper's parameter count (131.86 M)
leaves no room for a second timestep embedder — the network reads the condition's noise from the
condition itself.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lowdiff.dit import DiTConfig, UnifiedDiT
from lowdiff.network import NetworkConfig, UnifiedUNet

Preconditioning = Literal["vp", "edm", "flow"]
PRECONDITIONINGS = ("vp", "edm", "flow")


class Denoiser(nn.Module):
    def __init__(
        self,
        net: UnifiedUNet | UnifiedDiT,
        kind: Preconditioning = "vp",
        sigma_data: float = 0.5,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        vp_m: int = 1000,
        epsilon_t: float = 1e-5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        super().__init__()
        if kind not in PRECONDITIONINGS:
            raise ValueError(f"unknown preconditioning {kind!r}: expected 'vp', 'edm' or 'flow'")
        if (kind == "flow") != isinstance(net, UnifiedDiT):
            raise ValueError("'flow' goes with a UnifiedDiT and only with it")
        self.net = net
        self.kind = kind
        self.sigma_data = sigma_data
        self.beta_d, self.beta_min, self.vp_m, self.epsilon_t = beta_d, beta_min, vp_m, epsilon_t
        self.p_mean, self.p_std = p_mean, p_std

    @classmethod
    def build(cls, network: NetworkConfig | DiTConfig, kind: Preconditioning) -> Denoiser:
        """A fresh denoiser for a network config: the U-Net or the DiT, whichever it describes."""
        net = UnifiedDiT(network) if isinstance(network, DiTConfig) else UnifiedUNet(network)
        return cls(net, kind=kind)

    # --- VP helpers (EDM's formulation) ---
    def _vp_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def _vp_sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        data_var = 1.0 if self.kind == "vp" else self.sigma_data**2
        return 1 / (sigma**2 + data_var).sqrt()

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for a [B] tensor of σ."""
        if self.kind == "vp":
            c_skip = torch.ones_like(sigma)
            c_out = -sigma
            c_noise = (self.vp_m - 1) * self._vp_sigma_inv(sigma)
        else:
            sd2 = self.sigma_data**2
            c_skip = sd2 / (sigma**2 + sd2)
            c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
            c_noise = sigma.log() / 4
        return c_skip, c_out, self.input_scale(sigma), c_noise

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        resolution: int,
        condition: torch.Tensor | None = None,
        sigma_cond: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(self.net, UnifiedDiT):  # flow: velocity at time t = sigma, no preconditioning
            return self.net(x.float(), sigma.float().reshape(-1), class_labels, resolution, condition).float()
        x = x.float()
        sigma = sigma.float().reshape(-1)
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in self.coefficients(sigma))
        if condition is not None:
            if sigma_cond is None:
                raise ValueError("a condition needs its noise level sigma_cond")
            scale = self.input_scale(sigma_cond.float().reshape(-1))[:, None, None, None]
            condition = condition.float() * scale
        out = self.net(c_in * x, c_noise.flatten(), class_labels, resolution, condition, augment_labels)
        return c_skip * x + c_out * out.float()

    # --- training ---
    def sample_training_sigma(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """σ drawn from the training distribution (VP: t ~ U(ε_t, 1); EDM: ln σ ~ N(P_mean, P_std²))."""
        device = generator.device if generator is not None else None
        if self.kind == "vp":
            t = torch.rand(batch, generator=generator, device=device) * (1 - self.epsilon_t) + self.epsilon_t
            return self._vp_sigma(t)
        return (torch.randn(batch, generator=generator, device=device) * self.p_std + self.p_mean).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.kind == "vp":
            return 1 / sigma**2
        sd2 = self.sigma_data**2
        return (sigma**2 + sd2) / (sigma * self.sigma_data) ** 2
