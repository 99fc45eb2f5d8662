"""Make the EDM reference fixture (tests/fixtures/edm/) with NVlabs/edm's own code.

The import tests must show that ``lowdiff import-edm`` reads what EDM really writes and computes
what EDM really computes, so the snapshots and reference outputs here come from EDM itself, not
from a re-implementation: its networks and preconditioning (training/networks.py), a snapshot
pickled as training/training_loop.py pickles one (a dict of ``ema``, ``loss_fn``,
``augment_pipe``, ``dataset_kwargs`` with deep-copied, eval-mode, grad-free modules, through
``torch_utils.persistence``), and images from generate.py's ``edm_sampler`` with its
``StackedRandomGenerator`` rounded as generate.py rounds them.

The networks are tiny (a few hundred KB per pickle) and their weights are re-randomised after
construction: EDM initialises its last layers at 1e-5, so a fresh network's output would be ~0
and a wrong mapping could pass unnoticed.

Usage (EDM needs only its checkout plus numpy, click, tqdm, requests, pillow)::

    git --git-dir=/path/to/edm.git archive HEAD | tar -x -C /tmp/edm
    python scripts/make_edm_fixture.py --edm /tmp/edm --out tests/fixtures/edm/

The tests never import EDM; they read the files this writes.
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SIGMAS = (0.002, 0.05, 0.5, 2.0, 80.0)
SEEDS = (0, 1, 2, 3, 123456789)
IMAGES = ("edm-cond16", "vp-uncond16")  # the fixtures with reference outputs and images

# What EDM's train.py passes for DDPM++ (`--arch=ddpmpp`), at the fixtures' tiny width.
DDPMPP: dict[str, Any] = dict(
    use_fp16=False,
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=8,
)

# name → (precond class, constructor kwargs: DDPMPP plus each fixture's own).
FIXTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "edm-cond16": (
        "EDMPrecond",
        dict(
            DDPMPP,
            img_resolution=16,
            img_channels=3,
            label_dim=10,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[8],
            dropout=0.13,
            augment_dim=9,
        ),
    ),
    "vp-uncond16": (
        "VPPrecond",
        dict(
            DDPMPP,
            img_resolution=16,
            img_channels=1,
            label_dim=0,
            channel_mult=[1, 1, 1],
            num_blocks=1,
            attn_resolutions=[4],
            dropout=0.1,
            augment_dim=0,
        ),
    ),
    # Not importable by LowDiff on purpose: the tests expect one line naming what is unmapped.
    # songunet-extra8 is a SongUNet with one layer added after construction (as a LowDiff-modified
    # SongUNet would have, e.g. a resolution embedding), which a mapping must not silently drop.
    "songunet-extra8": (
        "EDMPrecond",
        dict(
            DDPMPP,
            img_resolution=8,
            img_channels=1,
            label_dim=0,
            channel_mult=[1, 1],
            num_blocks=1,
            attn_resolutions=[4],
            dropout=0.1,
            augment_dim=0,
        ),
    ),
    "dhariwal8": (
        "EDMPrecond",
        dict(
            img_resolution=8,
            img_channels=1,
            label_dim=0,
            use_fp16=False,
            model_type="DhariwalUNet",
            model_channels=8,
            channel_mult=[1, 1],
            channel_mult_emb=1,
            num_blocks=1,
            attn_resolutions=[4],
        ),
    ),
    "ncsnpp8": (
        "VEPrecond",
        dict(
            img_resolution=8,
            img_channels=1,
            label_dim=0,
            use_fp16=False,
            model_type="SongUNet",
            embedding_type="fourier",
            encoder_type="residual",
            decoder_type="standard",
            channel_mult_noise=2,
            resample_filter=[1, 3, 3, 1],
            model_channels=8,
            channel_mult=[1, 1],
            num_blocks=1,
            attn_resolutions=[4],
        ),
    ),
}


def randomise(net: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights of a plausible trained scale: N(0, 1/fan_in) for weights, small biases, GroupNorm ≈ 1."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif name.endswith("norm0.weight") or name.endswith("norm1.weight") or "norm" in name.split(".")[-2]:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def fit(net: torch.nn.Module, loss_fn: Any, label_dim: int, steps: int, gen: torch.Generator) -> None:
    """A few hundred Adam steps with EDM's own loss on smooth synthetic images (colour gradients), so
    that EDM's sampler draws images with a range of grey levels rather than saturated noise."""
    res, ch = net.img_resolution, net.img_channels
    grid = torch.linspace(-1, 1, res)
    net.train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        a = torch.rand(16, ch, 1, 1, generator=gen) * 2 - 1
        b = torch.rand(16, ch, 1, 1, generator=gen) * 2 - 1
        images = (a * grid[None, None, :, None] + b * grid[None, None, None, :]).clamp(-1, 1)
        labels = torch.eye(label_dim)[torch.randint(label_dim, (16,), generator=gen)] if label_dim else None
        loss = loss_fn(net=net, images=images, labels=labels).sum() / 16
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)


def write_snapshot(path: Path, ema: torch.nn.Module, loss_fn: Any, augment_pipe: Any, dataset_kwargs: dict) -> None:
    """training/training_loop.py's snapshot step, line for line in effect."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            value = copy.deepcopy(value).eval().requires_grad_(False)
            data[key] = value.cpu()
        del value
    with open(path, "wb") as f:
        pickle.dump(data, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edm", type=Path, required=True, help="an NVlabs/edm checkout (its root folder)")
    ap.add_argument("--out", type=Path, required=True, help="fixture folder to write")
    args = ap.parse_args()
    sys.path.insert(0, str(args.edm.resolve()))
    import dnnlib  # EDM's code, from --edm
    from generate import StackedRandomGenerator, edm_sampler
    from training import loss as edm_loss
    from training import networks

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    edm_commit = (
        subprocess.run(
            ["git", "-C", str(args.edm), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown (not a git checkout; exported from NVlabs/edm HEAD 008a4e5)"
    )
    index: dict[str, Any] = {"edm_commit": edm_commit, "torch": torch.__version__, "fixtures": {}}
    for k, (name, (precond, kwargs)) in enumerate(FIXTURES.items()):
        torch.manual_seed(1000 + k)  # EDM's own weight_init draws from the global generator
        net = getattr(networks, precond)(**kwargs).eval().requires_grad_(False)
        if name == "songunet-extra8":
            net.model.map_resolution = networks.Linear(in_features=3, out_features=8, bias=False)
        randomise(net, torch.Generator().manual_seed(2000 + k))
        loss_cls = {"EDMPrecond": edm_loss.EDMLoss, "VPPrecond": edm_loss.VPLoss, "VEPrecond": edm_loss.VELoss}[precond]
        if name in IMAGES:
            fit(net, loss_cls(), kwargs["label_dim"], 300, torch.Generator().manual_seed(4000 + k))
        dataset_kwargs = dnnlib.EasyDict(
            class_name="training.dataset.ImageFolderDataset",
            path="datasets/tiny.zip",
            use_labels=kwargs["label_dim"] > 0,
            xflip=False,
            cache=True,
            resolution=kwargs["img_resolution"],
            max_size=1000,
        )
        pkl = args.out / f"{name}.pkl"
        write_snapshot(pkl, net, loss_cls(), None, dataset_kwargs)
        entry: dict[str, Any] = {"pickle": pkl.name, "precond": precond, "kwargs": kwargs, "bytes": pkl.stat().st_size}
        if name not in IMAGES:
            index["fixtures"][name] = entry
            continue

        # Network outputs at several σ: D(x; σ) through the preconditioning, and the raw model F.
        res, ch, label_dim = kwargs["img_resolution"], kwargs["img_channels"], kwargs["label_dim"]
        gen = torch.Generator().manual_seed(3000 + k)
        x = torch.randn(len(SIGMAS), ch, res, res, generator=gen) * torch.tensor(SIGMAS)[:, None, None, None]
        sigma = torch.tensor(SIGMAS, dtype=torch.float32)
        labels = torch.arange(len(SIGMAS)) % max(label_dim, 1)
        onehot = torch.eye(label_dim)[labels] if label_dim else None
        captured: list[torch.Tensor] = []  # F(c_in·x; c_noise), the SongUNet's own output
        hook = net.model.register_forward_hook(lambda _m, _i, out, keep=captured: keep.append(out.detach().clone()))
        with torch.no_grad():
            denoised = net(x, sigma, onehot)
        hook.remove()
        # Images: generate.py's path with an explicit class per seed (its --class option, per image).
        rnd = StackedRandomGenerator("cpu", SEEDS)
        latents = rnd.randn([len(SEEDS), ch, res, res], device="cpu")
        image_labels = torch.tensor([s % max(label_dim, 1) for s in SEEDS])
        class_labels = torch.eye(label_dim)[image_labels] if label_dim else None
        with torch.no_grad():
            images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like)
        images_np = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        np.savez_compressed(
            args.out / f"{name}-reference.npz",
            x=x.numpy(), sigma=sigma.numpy(), labels=labels.numpy() if label_dim else np.zeros(0, np.int64),
            denoised=denoised.numpy(), model_output=captured[0].numpy(), seeds=np.array(SEEDS, dtype=np.int64),
            image_labels=image_labels.numpy() if label_dim else np.zeros(0, np.int64),
            images=images_np, latents=latents.numpy(),
            sampler_sigma_min=np.float64(max(0.002, net.sigma_min)),
            sampler_sigma_max=np.float64(min(80, net.sigma_max)),
        )  # fmt: skip
        entry["reference"] = f"{name}-reference.npz"
        index["fixtures"][name] = entry
        print(f"{name}: {pkl.stat().st_size:,} bytes; images {images_np.shape}")
    (args.out / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
