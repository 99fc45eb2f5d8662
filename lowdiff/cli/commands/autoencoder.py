"""``lowdiff train-autoencoder`` and ``lowdiff encode-latents``: the two steps before a latent config's
``lowdiff train`` (README, "Latent models"): the KL autoencoder the model generates in, then the
dataset as that autoencoder's normalised latents."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lowdiff.cli.args import (
    HelpFormatter,
    add_quiet,
    add_threads,
    apply_threads,
    nonnegative_int,
    positive_float,
    positive_int,
    progress_stream,
    seed,
)
from lowdiff.cli.commands.train import nonnegative_float, resolve_device
from lowdiff.data import DEFAULT_HOLDOUT_PER_CLASS
from lowdiff.errors import ConfigError, DataError, SettingsError

DEFAULT_AUTOENCODER_CONFIG = "fashion32-latent"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train-autoencoder",
        help="train a latent config's KL autoencoder on an image dataset",
        formatter_class=HelpFormatter,
        description="Train the KL autoencoder of a latent config (its `autoencoder`, padding and image size) on "
        "the training split of a dataset (the loaders and hold-out of `lowdiff train`), with L1 reconstruction + "
        "--kl-weight × KL and Adam. The run folder holds checkpoint.pt (every --checkpoint-every steps, every "
        "--checkpoint-minutes and on Ctrl-C/SIGTERM); --resume continues it exactly. At the end the per-channel "
        "latent mean and std over the training images and the held-out reconstruction error are computed and "
        "the autoencoder file is written to --out, for `lowdiff encode-latents` and `lowdiff train --autoencoder`.",
    )
    p.add_argument(
        "--config",
        default=DEFAULT_AUTOENCODER_CONFIG,
        help="a latent config (built-in name or JSON file) whose autoencoder to train",
    )
    p.add_argument("--data", type=Path, required=True, help=".npz (images, labels), image folder or CIFAR-10 tarball")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for checkpoint.pt (and autoencoder.pt)")
    p.add_argument(
        "--out", type=Path, default=None, help="the autoencoder file to write (default RUN_DIR/autoencoder.pt)"
    )
    p.add_argument(
        "--holdout-per-class",
        type=nonnegative_int,
        default=DEFAULT_HOLDOUT_PER_CLASS,
        help="hold out the last N images of every class (not trained on; the reconstruction error is measured on them)",
    )
    p.add_argument("--kimg", type=positive_float, default=60.0, help="training images, thousands")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per Adam step (default 64)")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate (default 5e-4)")
    p.add_argument(
        "--kl-weight", type=nonnegative_float, default=None, help="weight of the KL term (default 1e-4; LDM's is 1e-6)"
    )
    p.add_argument("--seed", type=seed, default=None, help="seed of initialisation, data order and noise (default 0)")
    p.add_argument("--checkpoint-every", type=positive_int, default=250, help="steps between checkpoints")
    p.add_argument("--checkpoint-minutes", type=positive_float, default=10.0, help="minutes between checkpoints")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when a GPU is visible"
    )
    add_threads(p)
    add_quiet(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    group.add_argument("--overwrite", action="store_true", help="start afresh even if RUN_DIR holds a checkpoint")
    p.set_defaults(func=run_train)


def register_encode_latents(sub: Any) -> None:
    p = sub.add_parser(
        "encode-latents",
        help="encode a dataset's training split into the latents file a latent config trains on",
        formatter_class=HelpFormatter,
        description="Encode the training split of a dataset (the last --holdout-per-class images of each class "
        "left out, as `lowdiff train` leaves them out) with an autoencoder from `lowdiff train-autoencoder`: "
        "the posterior's mean, normalised with the autoencoder's latent statistics. Writes the .pt that "
        "`lowdiff train --config LATENT --data` reads: {'latents': [N, C, R, R], 'labels': [N]}, plus the "
        "autoencoder file's sha256 so that train can refuse latents of another autoencoder.",
    )
    p.add_argument("--autoencoder", type=Path, required=True, help="the file `lowdiff train-autoencoder` wrote")
    p.add_argument("--data", type=Path, required=True, help=".npz (images, labels), image folder or CIFAR-10 tarball")
    p.add_argument("--out", type=Path, required=True, help="the latents file to write (.pt)")
    p.add_argument(
        "--holdout-per-class",
        type=nonnegative_int,
        default=DEFAULT_HOLDOUT_PER_CLASS,
        help="leave out the last N images of every class (as train and eval do)",
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per encoder pass")
    add_threads(p)
    add_quiet(p)
    p.set_defaults(func=run_encode_latents)


def run_train(args: argparse.Namespace) -> None:
    from lowdiff.autoencoder_training import (
        AutoencoderRecipe,
        AutoencoderRunOptions,
        AutoencoderTrainer,
        finish_autoencoder,
        with_overrides,
    )
    from lowdiff.data import load_split
    from lowdiff.model import load_config

    config = load_config(args.config)
    if config.autoencoder is None:
        raise ConfigError(f"{config.name} is a pixel config: it has no autoencoder to train", "config")
    checkpoint = args.run_dir / "checkpoint.pt"
    if checkpoint.exists() and not (args.resume or args.overwrite):
        raise SettingsError(
            f"{args.run_dir} already holds a training checkpoint; pass --resume to continue it or --overwrite "
            "to start afresh",
            "run_dir",
        )
    resuming = args.resume and checkpoint.exists()
    base = AutoencoderTrainer.stored_recipe(checkpoint) if resuming else AutoencoderRecipe()
    recipe = with_overrides(base, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight, seed=args.seed)
    ae = config.autoencoder
    side = config.image_resolution
    train, held, _, _ = load_split(args.data, args.holdout_per_class, config.pad, side, ae.in_channels)
    threads = apply_threads(args)
    options = AutoencoderRunOptions(
        total_kimg=args.kimg, checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes
    )
    trainer = AutoencoderTrainer(
        ae, recipe, options, args.run_dir, name=config.name, pad=config.pad, image_resolution=side,
        device=resolve_device(args.device),
    )  # fmt: skip
    if resuming and trainer.resume():
        print(f"resumed from {checkpoint} at {trainer.nimg / 1000:.1f} kimg", file=sys.stderr)
    print(
        f"training the autoencoder of {config.name} ({ae.downsampling}× down to {ae.z_channels} channels) on "
        f"{len(train)} images from {args.data} into {args.run_dir} ({trainer.device}, {threads} thread(s), batch "
        f"{recipe.batch_size}, lr {recipe.lr:g}, KL weight {recipe.kl_weight:g})",
        file=sys.stderr,
    )
    log = progress_stream(args)
    if trainer.fit(train, log=log):
        print(f"interrupted at step {trainer.step}; checkpoint: {checkpoint}", file=sys.stderr)
        raise SystemExit(130)
    out = args.out or args.run_dir / "autoencoder.pt"
    source = {"data": args.data.name, "holdout_per_class": args.holdout_per_class}
    written = finish_autoencoder(trainer, train, held, out, source, log=log)
    errors = written["held_out_reconstruction"]
    print(
        f"done at step {trainer.step} ({trainer.nimg / 1000:.1f} kimg); held-out L1 {errors.get('l1')}, "
        f"PSNR {errors.get('psnr_db')} dB; latent std {written['latent_std']}",
        file=sys.stderr,
    )
    print(out)


def run_encode_latents(args: argparse.Namespace) -> None:
    from lowdiff.autoencoder_training import encode_dataset, load_autoencoder
    from lowdiff.data import holdout_split, load_dataset, prepare_images
    from lowdiff.model import atomic_torch_save

    if args.out.suffix != ".pt":
        raise SettingsError(f"expected a .pt file name, got {args.out.name!r}", "out")
    source = load_autoencoder(args.autoencoder)
    images, labels = load_dataset(args.data)
    train_idx, _ = holdout_split(labels, args.holdout_per_class)
    if len(train_idx) == 0:
        raise DataError(f"{args.data}: the hold-out of {args.holdout_per_class} per class leaves nothing to encode")
    channels = source.autoencoder.config.in_channels
    x = prepare_images(images[train_idx], source.pad, source.image_resolution, channels)
    threads = apply_threads(args)
    print(f"encoding {len(x)} images from {args.data} with {args.autoencoder} ({threads} thread(s))", file=sys.stderr)
    latents = encode_dataset(source, x, args.batch_size, progress_stream(args))
    atomic_torch_save(
        {
            "latents": latents,
            "labels": labels[train_idx].clone(),
            "autoencoder_sha256": source.sha256,
            "holdout_per_class": args.holdout_per_class,
            "source": args.data.name,
        },
        args.out,
    )
    side = latents.shape[-1]
    print(f"{args.out}  ({len(latents)} latents {latents.shape[1]}×{side}×{side}, normalised)")
