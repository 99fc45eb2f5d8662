"""The unified multi-resolution U-Net (paper §3.3) on EDM's DDPM++ SongUNet backbone.

One network serves every stage of the cascade. Running resolution ``r`` activates only the
sub-network whose input is ``r``: the encoder levels from ``r`` down, the decoder levels back up
to ``r``, their skips, and ``r``'s own input convolution and output head. Resolution-specific I/O
layers and a resolution embedding (one-hot → linear, added to the noise/label embeddings) are the
only LowDiff additions; with a single resolution the network is exactly EDM's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SKIP_SCALE = math.sqrt(0.5)
INIT_ZERO_SCALE = 1e-5


def _xavier_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int, scale: float) -> None:
    bound = scale * math.sqrt(6 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_scale: float = 1.0):
        super().__init__(in_features, out_features, bias=bias)
        _xavier_uniform_(self.weight, in_features, out_features, init_scale)
        if bias:
            nn.init.zeros_(self.bias)


class Conv2d(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, init_scale: float = 1.0):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        _xavier_uniform_(self.weight, in_channels * kernel * kernel, out_channels * kernel * kernel, init_scale)
        nn.init.zeros_(self.bias)


def group_norm(channels: int) -> nn.GroupNorm:
    # EDM: at least 4 channels per group, at most 32 groups.
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=1e-6)


def resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Resampling with EDM's [1,1] filter: 2×2 average down, nearest ×2 up."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class UNetBlock(nn.Module):
    """EDM's DDPM++ residual block: GN-SiLU-conv, embedding bias, GN-SiLU-dropout-conv, optional attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resample_mode: str | None = None,
        attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample_mode = resample_mode
        self.dropout = dropout
        self.norm0 = group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_scale=INIT_ZERO_SCALE)
        # resample_proj: a 1×1 projection on the skip whenever shape or channels change.
        needs_proj = out_channels != in_channels or resample_mode is not None
        self.skip = Conv2d(in_channels, out_channels, 1) if needs_proj else None
        self.attention = attention
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_scale=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_scale=INIT_ZERO_SCALE)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = resample(F.silu(self.norm0(x)), self.resample_mode)
        x = self.conv0(x)
        x = x + self.affine(emb)[:, :, None, None]
        x = F.silu(self.norm1(x))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        skip = resample(orig, self.resample_mode)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (x + skip) * SKIP_SCALE
        if self.attention:
            batch, channels, height, width = x.shape
            # Channels of qkv are interleaved: q, k, v are channels 0,3,6… / 1,4,7… / 2,5,8….
            q, k, v = self.qkv(self.norm2(x)).reshape(batch, channels, 3, height * width).unbind(2)
            scores = torch.einsum("bcq,bck->bqk", q, k / math.sqrt(channels))
            weights = torch.softmax(scores.float(), dim=2).to(q.dtype)
            attended = torch.einsum("bqk,bck->bcq", weights, v)
            x = (self.proj(attended.reshape(batch, channels, height, width)) + x) * SKIP_SCALE
        return x


class OutputHead(nn.Module):
    """A resolution's output layers: GroupNorm → SiLU → 3×3 conv to image channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = group_norm(in_channels)
        self.conv = Conv2d(in_channels, out_channels, 3, init_scale=INIT_ZERO_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


def positional_embedding(values: torch.Tensor, channels: int, max_positions: int = 10000) -> torch.Tensor:
    """DDPM++'s sinusoidal noise embedding, [sin, cos] order."""
    half = channels // 2
    freqs = torch.arange(half, dtype=torch.float32, device=values.device) / (half - 1)
    freqs = (1.0 / max_positions) ** freqs
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@dataclass(frozen=True)
class NetworkConfig:
    img_resolution: int
    img_channels: int
    label_dim: int  # 0 = unconditional
    resolutions: tuple[int, ...]  # the cascade's stage resolutions, lowest first
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    augment_dim: int = 9
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def level_of(self, resolution: int) -> int:
        level = round(math.log2(self.img_resolution / resolution))
        if self.img_resolution >> level != resolution or not 0 <= level < len(self.channel_mult):
            raise ValueError(f"resolution {resolution} is not a level of this network")
        return level


class UnifiedUNet(nn.Module):
    """DDPM++ SongUNet with LowDiff's per-resolution I/O layers and resolution embedding.

    ``forward(x, noise_labels, class_labels, resolution, condition)`` runs only the sub-network of
    ``resolution``; ``condition`` (the upsampled lower-resolution image) is concatenated to ``x``
    for every stage but the first.
    """

    def __init__(self, config: NetworkConfig):
        # Long on purpose: the layers are built in EDM's order and with its names, so that checkpoints map
        # onto EDM's by name; splitting it would scatter that correspondence.
        super().__init__()
        self.config = config
        c = config
        noise_channels = c.model_channels
        emb_channels = c.model_channels * c.channel_mult_emb
        self.emb_channels = emb_channels
        self.noise_channels = noise_channels

        self.map_label = Linear(c.label_dim, noise_channels) if c.label_dim else None
        self.map_augment = Linear(c.augment_dim, noise_channels, bias=False) if c.augment_dim else None
        # One-hot stage index → embedding; absent for a single-resolution (EDM) network.
        self.map_resolution = Linear(len(c.resolutions), noise_channels, bias=False) if len(c.resolutions) > 1 else None
        # The one-hot resolution codes live on the module's device: building one per call would copy a
        # host value into device memory, which CUDA-graph capture forbids. Not saved (derived).
        self.register_buffer("resolution_onehots", torch.eye(len(c.resolutions)), persistent=False)
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder, EDM's names. `level_channels[l]` = channels entering level l's blocks.
        self.encoder = nn.ModuleDict()
        self.encoder_level: dict[str, int] = {}
        level_input_channels: list[int] = []
        skip_channels: list[int] = []
        cout = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            res = c.img_resolution >> level
            if level == 0:
                cout = c.model_channels
            else:
                name = f"{res}x{res}_down"
                self.encoder[name] = UNetBlock(cout, cout, emb_channels, "down", dropout=c.dropout)
                self.encoder_level[name] = level
            level_input_channels.append(cout)
            skip_channels.append(cout)  # the level's entry tensor (input conv or down block) is a skip
            for idx in range(c.num_blocks):
                cin, cout = cout, c.model_channels * mult
                name = f"{res}x{res}_block{idx}"
                self.encoder[name] = UNetBlock(
                    cin, cout, emb_channels, attention=res in c.attn_resolutions, dropout=c.dropout
                )
                self.encoder_level[name] = level
                skip_channels.append(cout)

        # Per-resolution input convolutions: they produce what the level's first block expects.
        self.inputs = nn.ModuleDict()
        for i, res in enumerate(c.resolutions):
            level = c.level_of(res)
            in_ch = c.img_channels * (2 if i > 0 else 1)
            self.inputs[str(res)] = Conv2d(in_ch, level_input_channels[level], 3)

        # Decoder, EDM's names; `skip_channels` pops in reverse order.
        self.decoder = nn.ModuleDict()
        self.decoder_level: dict[str, int] = {}
        pending = list(skip_channels)
        level_output_channels: dict[int, int] = {}
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            res = c.img_resolution >> level
            if level == len(c.channel_mult) - 1:
                for name, attn in ((f"{res}x{res}_in0", True), (f"{res}x{res}_in1", False)):
                    self.decoder[name] = UNetBlock(cout, cout, emb_channels, attention=attn, dropout=c.dropout)
                    self.decoder_level[name] = level
            else:
                name = f"{res}x{res}_up"
                self.decoder[name] = UNetBlock(cout, cout, emb_channels, "up", dropout=c.dropout)
                self.decoder_level[name] = level
            for idx in range(c.num_blocks + 1):
                cin, cout = cout + pending.pop(), c.model_channels * mult
                name = f"{res}x{res}_block{idx}"
                attn = idx == c.num_blocks and res in c.attn_resolutions
                self.decoder[name] = UNetBlock(cin, cout, emb_channels, attention=attn, dropout=c.dropout)
                self.decoder_level[name] = level
            level_output_channels[level] = cout

        self.outputs = nn.ModuleDict(
            {str(res): OutputHead(level_output_channels[c.level_of(res)], c.img_channels) for res in c.resolutions}
        )
        # ModuleDict keys of each resolution, looked up rather than built with str() in forward:
        # torch.compile (the `compile` engine) cannot trace str(int) in fullgraph mode.
        self.resolution_keys: dict[int, str] = {res: str(res) for res in c.resolutions}

    def embedding(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        stage_index: int,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = positional_embedding(noise_labels, self.noise_channels)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: class_labels are required")
            onehot = F.one_hot(class_labels.long(), self.config.label_dim).to(emb.dtype)
            emb = emb + self.map_label(onehot * math.sqrt(self.config.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        if self.map_resolution is not None:
            onehot = self.resolution_onehots[stage_index].to(emb.dtype)
            emb = emb + self.map_resolution(onehot)[None, :]
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        resolution: int,
        condition: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        stage_index = self.config.resolutions.index(resolution)
        level = self.config.level_of(resolution)
        emb = self.embedding(noise_labels, class_labels, stage_index, augment_labels)
        if stage_index > 0:
            if condition is None:
                raise ValueError(f"stage {resolution} is conditioned: a condition image is required")
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        x = self.inputs[self.resolution_keys[resolution]](x)
        skips = [x]
        for name, block in self.encoder.items():
            # The level's own down block is replaced by the input convolution.
            if self.encoder_level[name] < level or (name.endswith("_down") and self.encoder_level[name] == level):
                continue
            x = block(x, emb)
            skips.append(x)
        for name, block in self.decoder.items():
            if self.decoder_level[name] < level:
                continue
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.outputs[self.resolution_keys[resolution]](x)

    def stage_modules(self, resolution: int) -> list[str]:
        """Names of the submodules that running ``resolution`` uses (for tests and export)."""
        level = self.config.level_of(resolution)
        names = [f"inputs.{resolution}", f"outputs.{resolution}", "map_layer0", "map_layer1"]
        names += [
            f"encoder.{n}"
            for n, lv in self.encoder_level.items()
            if lv > level or (lv == level and not n.endswith("_down"))
        ]
        names += [f"decoder.{n}" for n, lv in self.decoder_level.items() if lv >= level]
        return names
