"""The KL autoencoder of latent diffusion (LDM's "VQGAN-KL" layout, which VA-VAE keeps unchanged).

Written from the architecture, with LDM's module names (``encoder.down.{level}.block.{i}``,
``decoder.up.{level}.attn.{i}``, ``quant_conv``, ``post_quant_conv`` …) so that a released state dict
loads by name: residual blocks of GroupNorm(32)-SiLU-conv3×3 twice with a 1×1 shortcut when the width
changes, single-head attention blocks, strided-conv downsampling with (0, 1, 0, 1) padding, nearest ×2
+ conv upsampling, and a mid section of block-attention-block. The encoder's 2·z output is the
Gaussian posterior's (mean, log-variance); generation only needs the decoder, the encoder is here for
training a small latent model and for tests.

Latents are normalised per channel for the diffusion model (LightningDiT's ``latents_stats.pt``:
mean and std over the training set, multiplier 1 for VA-VAE): the diffusion model sees
(z − mean) / std · multiplier, and :meth:`KLAutoencoder.decode_normalized` undoes it before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AutoencoderConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    in_channels: int = 3
    out_channels: int = 3
    encoder_attn_levels: tuple[int, ...] = (4,)  # levels (0 = full resolution) with attention blocks
    decoder_attn_levels: tuple[int, ...] = (4,)
    latent_multiplier: float = 1.0  # the diffusion model sees (z − mean) / std · multiplier

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def image_resolution(self, latent_resolution: int) -> int:
        """The decoded image's side for a latent of side ``latent_resolution``."""
        return latent_resolution * self.downsampling


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: int, cin: int, cout: int, attention: bool) -> tuple[nn.Module, int]:
    level = nn.Module()
    level.block = nn.ModuleList()
    level.attn = nn.ModuleList()
    for _ in range(blocks):
        level.block.append(ResnetBlock(cin, cout))
        cin = cout
        if attention:
            level.attn.append(AttnBlock(cout))
    return level, cin


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = c.ch
        for i, mult in enumerate(c.ch_mult):
            level, cin = _level(c.num_res_blocks, cin, c.ch * mult, i in c.encoder_attn_levels)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = _mid(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = _run_level(level, h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        cin = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        levels: list[nn.Module] = []
        for i in reversed(range(len(c.ch_mult))):
            level, cin = _level(c.num_res_blocks + 1, cin, c.ch * c.ch_mult[i], i in c.decoder_attn_levels)
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by level, as LDM stores it
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            h = _run_level(self.up[i], h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        # Per-channel latent statistics (buffers: saved with the weights, not trained).
        self.register_buffer("latent_mean", torch.zeros(1, config.z_channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, config.z_channels, 1, 1))
        self.latent_multiplier = config.latent_multiplier

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance (clamped to [−30, 20], as LDM) for images in [−1, 1]."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → images in about [−1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean) / self.latent_std * self.latent_multiplier

    def decode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """What the diffusion model generates (normalised latents) → images: undo the statistics, decode."""
        return self.decode(x / self.latent_multiplier * self.latent_std + self.latent_mean)


class LatentDecoder(nn.Module):
    """The half of a :class:`KLAutoencoder` that generation needs, as the pipeline's decode stage:
    normalised latents (what the diffusion model generates) → images in about [−1, 1].

    Kept apart from the encoder so that a latent model's checkpoint carries only what serving runs
    (VA-VAE's encoder is as large as its decoder) and so that the decode stage exports to one ONNX graph
    by itself. Its state-dict names are the autoencoder's (``decoder.*``, ``post_quant_conv.*``,
    ``latent_mean``, ``latent_std``), so an autoencoder's weights load into it by name.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        self.register_buffer("latent_mean", torch.zeros(1, config.z_channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, config.z_channels, 1, 1))

    @classmethod
    def from_autoencoder(cls, autoencoder: KLAutoencoder) -> LatentDecoder:
        """The decoder of ``autoencoder`` with its statistics and multiplier (weights copied)."""
        config = replace(autoencoder.config, latent_multiplier=float(autoencoder.latent_multiplier))
        out = cls(config)
        own = set(out.state_dict())
        out.load_state_dict({k: v for k, v in autoencoder.state_dict().items() if k in own})
        return out.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x / self.config.latent_multiplier * self.latent_std + self.latent_mean
        return self.decoder(self.post_quant_conv(z))
