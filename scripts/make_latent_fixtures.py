"""Make the latent-format test fixtures with the reference code (hustvl/LightningDiT), once.

    .venv/bin/python scripts/make_latent_fixtures.py /path/to/LightningDiT-checkout tests/fixtures

Writes, from LightningDiT's own classes with random weights (shrunk; key names exact):
* ``lightningdit-tiny.pt``: ``{"model", "ema", "opt"}`` as LightningDiT's train.py saves it, of a
  LightningDiT (SwiGLU, RoPE, RMSNorm, as the released configs) of width 32, depth 2, 2 heads, on
  8×8×4 latents, 10 classes; every weight perturbed so that no layer is zero (LightningDiT zeroes
  adaLN and the output at initialisation);
* ``lightningdit-tiny-io.pt``: an input (x, t, y) and the reference forward's output for it;
* ``vavae-tiny.pt``: ``{"state_dict": …}`` of the tokenizer's AutoencoderKL with a small encoder and
  decoder (ch 32, ch_mult (1, 1), one block, attention at 16×16 of a 32×32 input, z 4), plus a
  ``loss.*`` entry as a training checkpoint has; ``vavae-tiny-io.pt``: a latent and its decoding;
* ``latents_stats-tiny.pt``: ``{"mean", "std"}`` of shape [1, 4, 1, 1], as LightningDiT computes them.

The tests read only these files; they never need the reference code. The reference imports timm
for ``PatchEmbed``/``Mlp`` (timm needs a torchvision matching torch, not available here); a stand-in
module with timm's layout (``proj`` convolution, flatten, transpose) is registered instead — the
released state-dict names (``x_embedder.proj.*``) are timm's and are unchanged by it. torch.compile
decorators are disabled (eager gives the same numbers). ``torchvision``, ``requests`` and ``tqdm``,
imported by the tokenizer module but not used by the autoencoder's layers, are empty stand-ins too.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch
from torch import nn


def _timm_stand_in() -> None:
    class PatchEmbed(nn.Module):
        def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
            super().__init__()
            self.patch_size = (patch_size, patch_size)
            self.num_patches = (img_size // patch_size) ** 2
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)
            self.norm = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    module = types.ModuleType("timm.models.vision_transformer")
    module.PatchEmbed = PatchEmbed  # type: ignore[attr-defined]
    module.Mlp = nn.Module  # type: ignore[attr-defined]  # only used by the GELU variant
    for name in ("timm", "timm.models"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["timm.models.vision_transformer"] = module


def main(reference: Path, out: Path) -> None:
    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    torch._dynamo.config.disable = True  # type: ignore[attr-defined]
    _timm_stand_in()
    sys.modules.setdefault("fairscale", types.ModuleType("fairscale"))  # models/rmsnorm.py imports it unused
    for name in ("fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize"):
        sys.modules.setdefault(name, types.ModuleType(name))
    layers = types.ModuleType("fairscale.nn.model_parallel.layers")
    layers.ColumnParallelLinear = layers.ParallelEmbedding = layers.RowParallelLinear = object  # type: ignore[attr-defined]
    sys.modules["fairscale.nn.model_parallel.layers"] = layers
    for name in ("torchvision", "requests", "tqdm"):  # imported by tokenizer/autoencoder.py, unused by the model
        stub = types.ModuleType(name)
        stub.transforms = types.ModuleType("transforms")  # type: ignore[attr-defined]
        stub.tqdm = object  # type: ignore[attr-defined]
        sys.modules.setdefault(name, stub)
    sys.path.insert(0, str(reference))
    from models.lightningdit import LightningDiT  # type: ignore[import-not-found]
    from tokenizer.autoencoder import AutoencoderKL, Decoder, Encoder  # type: ignore[import-not-found]

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(18)
    dit = LightningDiT(
        input_size=8, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
        use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=False, wo_shift=False,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-4, betas=(0.9, 0.95))
    state = dit.state_dict()
    torch.save({"model": state, "ema": state, "opt": opt.state_dict()}, out / "lightningdit-tiny.pt")
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.05, 0.5, 0.9]), torch.tensor([0, 7, 10])  # 10 = null
    with torch.no_grad():
        torch.save({"x": x, "t": t, "y": y, "out": dit(x, t, y)}, out / "lightningdit-tiny-io.pt")

    torch.manual_seed(19)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 1))
    small = {"ch": 32, "ch_mult": (1, 1), "num_res_blocks": 1, "attn_resolutions": (16,), "resolution": 32}
    vae.encoder = Encoder(z_channels=4, in_channels=3, **small)
    vae.decoder = Decoder(z_channels=4, out_ch=3, **small)
    vae.eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = dict(vae.state_dict())
    sd["loss.logvar"] = torch.zeros(())  # a training checkpoint's extra entry, skipped by loaders
    torch.save({"state_dict": sd}, out / "vavae-tiny.pt")
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.save({"z": z, "out": vae.decode(z)}, out / "vavae-tiny-io.pt")
    torch.save(
        {"mean": torch.randn(1, 4, 1, 1) * 0.3, "std": torch.rand(1, 4, 1, 1) + 0.5}, out / "latents_stats-tiny.pt"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
