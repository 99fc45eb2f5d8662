"""The unified multi-resolution DiT (paper §4.1, latent system) on LightningDiT's backbone.

One transformer serves every stage of the latent cascade, as the U-Net of :mod:`lowdiff.network` does
in pixel space. Transformer blocks are resolution-agnostic (they see a sequence of tokens), so the
only per-resolution parts are the ones that know the grid: the patch embedding (the first stage's takes
the noisy latent; a later stage's takes the latent concatenated with the upsampled condition, twice the
channels), the fixed sin-cos position table, the 2-D rotary frequencies (buffers, derived) and the
final layer. A resolution embedding (one learned vector per stage) is added to the timestep + class
vector that drives adaLN. With a single resolution the network is LightningDiT: same layers, same
shapes, and the same state-dict names except that the per-resolution parts are keyed by resolution
(``x_embedder`` → ``inputs.16``, ``pos_embed`` → ``pos_embed.16``, ``final_layer`` → ``outputs.16``;
:mod:`lowdiff.latent_import` maps them).

Block recipe, read from LightningDiT (models/lightningdit.py and the B/1 config): pre-norm RMSNorm
(eps 1e-6, learned scale), adaLN modulation with shift, scale and gate (6·D outputs from SiLU(c)),
multi-head attention with a biased qkv projection and 2-D RoPE on queries and keys (no q/k norm), a
SwiGLU MLP of hidden width int(2/3 · 4·D), and a final layer of RMSNorm + adaLN shift/scale + linear.
The timestep enters as DiT's [cos, sin] frequency embedding of t ∈ [0, 1] (t = 1 is data) through a
2-layer MLP; labels through a table with one extra row, the null class used for guidance.

Initialisation follows LightningDiT (xavier-uniform linears with zero biases, patch embedding
initialised as a linear, label table N(0, 0.02²), timestep MLP N(0, 0.02²), zero adaLN and output
layers). The resolution embedding starts at zero, so that a cascade initialised from a single-stage
checkpoint computes exactly the checkpoint's function at the shared resolution until it is trained.

Position choice for a lower resolution (not stated in the paper): each resolution uses its own grid,
0 … g−1, for both the sin-cos table and RoPE — what a LightningDiT built for that latent size uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 10000.0
TIME_FREQUENCIES = 256  # size of the timestep frequency embedding (DiT's)


@dataclass(frozen=True)
class DiTConfig:
    """A unified DiT's shape. ``img_*`` name the latent (so code written for pixel networks reads the
    same fields); ``label_dim`` classes plus one null class (index ``label_dim``) for guidance."""

    img_resolution: int  # the final latent grid (16 for 256×256 images through VA-VAE)
    img_channels: int  # latent channels (32 for VA-VAE f16d32)
    label_dim: int  # 0 = unconditional
    resolutions: tuple[int, ...]  # the cascade's stage resolutions, lowest first
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 1
    label_dropout: float = 0.1  # training: probability of replacing a label by the null class
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    architecture = "dit"  # class constant: tells a DiT config from a U-Net one (not a field)

    @property
    def augment_dim(self) -> int:
        """No EDM augmentation labels (pixel-space networks have them; kept so shared code can ask)."""
        return 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(2 / 3 * int(self.hidden_size * self.mlp_ratio))

    def grid(self, resolution: int) -> int:
        return resolution // self.patch_size

    def check(self) -> None:
        """Shape constraints; ValueError naming the field (model.py turns it into a ConfigError)."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head size {self.head_dim} must be divisible by 4 (2-D rotary embedding)")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by 4 (2-D sin-cos position table)")
        if not self.resolutions or list(self.resolutions) != sorted(set(self.resolutions)):
            raise ValueError(f"resolutions must rise, got {list(self.resolutions)}")
        if self.resolutions[-1] != self.img_resolution:
            raise ValueError(f"resolutions must end at img_resolution {self.img_resolution}")
        for r in self.resolutions:
            if r % self.patch_size:
                raise ValueError(f"resolution {r} is not a multiple of patch_size {self.patch_size}")
        for lo, hi in zip(self.resolutions[:-1], self.resolutions[1:]):
            if hi % lo:
                raise ValueError(f"resolution {hi} is not a whole multiple of {lo} (nearest upsampling)")


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin, cos] of positions at ``dim // 2`` frequencies 10000^(−i/(dim/2)), computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """The fixed position table, [grid², dim] float32, tokens in row-major order. As LightningDiT
    (MAE's layout), the first half of the channels encodes the column index, the second the row."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [grid², head_dim] of the 2-D rotary embedding (EVA-02's, as LightningDiT).

    The first half of a head's channels rotates with the token's row, the second with its column;
    within each half, channel pairs (2i, 2i+1) share frequency θ^(−4i/head_dim)."""
    quarter = head_dim // 4
    freqs = 1.0 / ROPE_THETA ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (head_dim // 2))
    angles = torch.arange(grid).float()[:, None] * freqs[None, :]  # [grid, quarter]
    angles = angles.repeat_interleave(2, dim=1)  # pairs share a frequency
    half = angles.shape[1]
    table = torch.cat(
        [angles[:, None, :].expand(grid, grid, half), angles[None, :, :].expand(grid, grid, half)], dim=-1
    ).reshape(grid * grid, 2 * half)
    return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, …) → (−x1, x0, −x3, x2, …): the 90° rotation of each channel pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def timestep_embedding(t: torch.Tensor, dim: int = TIME_FREQUENCIES, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's frequency embedding of t ([cos, sin] order), float32 as LightningDiT computes it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """x / rms(x) · w, the normalisation done in float32 whatever the input's precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """One fused input projection to (gate, value), SiLU(gate) · value, output projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        cos, sin = (t.to(q.dtype) for t in rope)
        q = q * cos + rotate_pairs(q) * sin
        k = k * cos + rotate_pairs(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = RMSNorm(d)
        self.attn = Attention(d, config.num_heads)
        self.norm2 = RMSNorm(d)
        self.mlp = SwiGLU(d, config.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """A resolution's output: RMSNorm, adaLN shift/scale, linear to patch² · channels."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.norm_final = RMSNorm(d)
        self.linear = nn.Linear(d, config.patch_size**2 * config.img_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """p×p patches → tokens by a strided convolution (the layout of timm's PatchEmbed: ``proj``)."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the null class

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels.long())


class UnifiedDiT(nn.Module):
    """LightningDiT with LowDiff's per-resolution I/O, position tables and resolution embedding.

    ``forward(x, t, class_labels, resolution, condition)`` returns the velocity at ``resolution``;
    ``condition`` (the upsampled lower-resolution latent) is concatenated to ``x`` in every stage but
    the first; ``class_labels`` may hold the null class ``label_dim`` (guidance's unconditional half).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.check()
        self.config = c = config
        d = c.hidden_size
        self.inputs = nn.ModuleDict(
            {str(r): PatchEmbed(c.img_channels * (2 if i else 1), d, c.patch_size) for i, r in enumerate(c.resolutions)}
        )
        # Fixed tables are parameters without gradient, as in LightningDiT (so they are saved, counted
        # in the parameter total — the paper's 130.56 M includes the 16×16 table — and loaded).
        self.pos_embed = nn.ParameterDict(
            {str(r): nn.Parameter(torch.zeros(1, c.grid(r) ** 2, d), requires_grad=False) for r in c.resolutions}
        )
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(c.label_dim, d) if c.label_dim else None
        self.map_resolution = nn.Embedding(len(c.resolutions), d) if len(c.resolutions) > 1 else None
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.depth))
        self.outputs = nn.ModuleDict({str(r): FinalLayer(c) for r in c.resolutions})
        for r in c.resolutions:  # derived from the shape alone: not saved
            cos, sin = rope_tables(c.head_dim, c.grid(r))
            self.register_buffer(f"rope_cos_{r}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{r}", sin, persistent=False)
        # Looked up rather than built with str() in forward (torch.compile's fullgraph cannot trace it).
        self.resolution_keys: dict[int, str] = {r: str(r) for r in c.resolutions}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for key, table in self.pos_embed.items():
                table.copy_(sincos_2d(self.config.hidden_size, self.config.grid(int(key)))[None])
        for embed in self.inputs.values():
            weight = embed.proj.weight
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.map_resolution is not None:
            nn.init.zeros_(self.map_resolution.weight)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for final in self.outputs.values():
            for layer in (final.adaLN_modulation[-1], final.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def rope(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"rope_cos_{resolution}"), getattr(self, f"rope_sin_{resolution}")

    def embedding(self, t: torch.Tensor, class_labels: torch.Tensor | None, stage_index: int) -> torch.Tensor:
        c = self.t_embedder(t.reshape(-1))
        if self.y_embedder is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: class_labels are required")
            c = c + self.y_embedder(class_labels)
        if self.map_resolution is not None:
            c = c + self.map_resolution.weight[stage_index][None, :]
        return c

    def unpatchify(self, x: torch.Tensor, resolution: int) -> torch.Tensor:
        p, ch, g = self.config.patch_size, self.config.img_channels, self.config.grid(resolution)
        x = x.reshape(x.shape[0], g, g, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], ch, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None,
        resolution: int,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        stage_index = self.config.resolutions.index(resolution)
        key = self.resolution_keys[resolution]
        if stage_index > 0:
            if condition is None:
                raise ValueError(f"stage {resolution} is conditioned: a condition latent is required")
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        h = self.inputs[key](x) + self.pos_embed[key]
        c = self.embedding(t, class_labels, stage_index)
        rope = self.rope(resolution)
        for block in self.blocks:
            h = block(h, c, rope)
        return self.unpatchify(self.outputs[key](h, c), resolution)

    def stage_modules(self, resolution: int) -> list[str]:
        """Names of the submodules that running ``resolution`` uses (for tests and export)."""
        names = [f"inputs.{resolution}", f"outputs.{resolution}", "t_embedder", "blocks"]
        names += ["y_embedder"] if self.y_embedder is not None else []
        names += ["map_resolution"] if self.map_resolution is not None else []
        return names
