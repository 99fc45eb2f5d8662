"""``lowdiff train`` and ``lowdiff export-ema``: training runs and the small inference checkpoint they end in."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from lowdiff.cli.args import (
    HelpFormatter,
    add_quiet,
    nonnegative_int,
    positive_float,
    positive_int,
    progress_stream,
    seed,
)
from lowdiff.data import DEFAULT_HOLDOUT_PER_CLASS
from lowdiff.errors import CheckpointError, DataError, LowDiffError, SettingsError


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a config on a dataset (.npz, image folder, CIFAR-10 tarball)",
        formatter_class=HelpFormatter,
        description="Train a built-in config (`lowdiff models`). The run folder holds checkpoint.pt (saved "
        "atomically every --checkpoint-every steps, every --checkpoint-minutes and on Ctrl-C/SIGTERM) and "
        "sample grids; --resume continues it exactly.",
    )
    p.add_argument(
        "--config", required=True, help="a built-in config name (`lowdiff models`) or a JSON config file (README)"
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help=".npz (images, labels), image folder or CIFAR-10 tarball; for a latent config a .pt of "
        "{'latents': [N, C, R, R] normalised, 'labels': [N]}",
    )
    p.add_argument("--run-dir", type=Path, required=True, help="folder for checkpoint.pt and sample grids")
    p.add_argument(
        "--holdout-per-class",
        type=nonnegative_int,
        default=DEFAULT_HOLDOUT_PER_CLASS,
        help="hold out the last N images of every class (not trained on; `lowdiff eval` scores against them)",
    )
    p.add_argument(
        "--kimg", type=positive_float, default=200.0, help="training images, thousands (200 ≈ hours on a CPU)"
    )
    recipe = p.add_argument_group(
        "recipe",
        "default: the config's own training recipe (`lowdiff models --json`: \"training\"); EDM's for the "
        "paper configs. What a run used is stored in its checkpoint's config.",
    )
    recipe.add_argument("--batch-size", type=positive_int, default=None, help="images per optimizer step (global)")
    recipe.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate")
    recipe.add_argument(
        "--lr-rampup-kimg",
        type=nonnegative_float,
        default=None,
        help="linear learning-rate warm-up, thousands of images",
    )
    recipe.add_argument(
        "--ema-halflife-kimg", type=positive_float, default=None, help="EMA half-life, thousands of images"
    )
    recipe.add_argument("--grad-clip", type=nonnegative_float, default=None, help="gradient norm clip (0 = none)")
    recipe.add_argument(
        "--augment-p", type=nonnegative_float, default=None, help="EDM augmentation probability (0 = none)"
    )
    recipe.add_argument(
        "--loss-weighting",
        choices=("pixels", "equal"),
        default=None,
        help="per-resolution loss: summed over pixels as EDM (pixels), or each a mean over pixels (equal)",
    )
    recipe.add_argument(
        "--preconditioning", choices=("edm", "vp"), default=None, help="EDM's EDMPrecond or VPPrecond form"
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of initialisation and data order")
    p.add_argument("--grid-every", type=nonnegative_int, default=1000, help="steps between sample grids (0 = never)")
    p.add_argument("--checkpoint-every", type=positive_int, default=250, help="steps between checkpoints")
    p.add_argument("--checkpoint-minutes", type=positive_float, default=10.0, help="minutes between checkpoints")
    p.add_argument(
        "--threads",
        type=nonnegative_int,
        default=0,
        help="torch CPU threads (0 = the CPUs idle at start, lowdiff/threads.py; under torchrun, torch's default)",
    )
    add_quiet(p)
    hw = p.add_argument_group(
        "devices",
        "Many GPUs or machines: start this command under torchrun (`torchrun --nproc_per_node N -m lowdiff train "
        "…`); --batch-size stays the global batch, split over the processes.",
    )
    hw.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when a GPU is visible"
    )
    hw.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights and optimizer"
    )
    hw.add_argument(
        "--batch-gpu",
        type=nonnegative_int,
        default=0,
        help="images per forward/backward on one device; smaller than the per-process batch = gradient "
        "accumulation (0 = the whole per-process batch)",
    )
    hw.add_argument(
        "--workers",
        type=nonnegative_int,
        default=None,
        help="DataLoader worker processes (default: 2 on a GPU, else 0)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    group.add_argument("--overwrite", action="store_true", help="start afresh even if RUN_DIR holds a checkpoint")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a checkpoint's (EMA) weights with a fresh optimizer, e.g. the embedded model",
    )
    p.add_argument(
        "--init-from-edm",
        type=Path,
        default=None,
        help="start from an EDM snapshot (network-snapshot-*.pkl): its U-Net copied, LowDiff's per-resolution "
        "input/output layers and resolution embedding fresh (see README, 'Fine-tune LowDiff from EDM')",
    )
    p.add_argument(
        "--autoencoder",
        type=Path,
        default=None,
        help="a latent config's trained autoencoder (`lowdiff train-autoencoder`), the one that encoded --data: "
        "its decoder and latent statistics go into every checkpoint of the run (needed to start a latent run "
        "unless --init-from brings them)",
    )
    p.add_argument(
        "--keep-count",
        action="store_true",
        help="with --init-from: continue the step and training-image counts from the checkpoint's metadata",
    )
    p.add_argument("--export", type=Path, default=None, help="also write the final EMA weights here")
    p.set_defaults(func=run)


def register_export_ema(sub: Any) -> None:
    p = sub.add_parser(
        "export-ema", help="extract the EMA weights of a training checkpoint", formatter_class=HelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a training run's checkpoint.pt")
    p.add_argument("--out", type=Path, required=True, help="the inference checkpoint to write")
    p.set_defaults(func=run_export_ema)


def run(args: argparse.Namespace) -> None:
    """One process of a run: alone, or one rank of ``torchrun … -m lowdiff train`` (only rank 0 prints)."""
    import contextlib
    import io

    from lowdiff.training import Distributed

    distributed = Distributed.from_env()
    quiet = contextlib.redirect_stderr(io.StringIO()) if not distributed.main else contextlib.nullcontext()
    try:
        with quiet:
            _train(args, distributed)
    finally:
        distributed.stop()


def _train(args: argparse.Namespace, distributed: Any) -> None:
    from lowdiff.data import holdout_split, image_folder_classes, load_dataset, prepare_images
    from lowdiff.model import load_config
    from lowdiff.threads import default_threads
    from lowdiff.training import Trainer, TrainOptions

    config = load_config(args.config)
    checkpoint = args.run_dir / "checkpoint.pt"
    if args.resume and checkpoint.exists():
        config = resumed_config(config, checkpoint)
    config = configure(config, args)
    if args.init_from is not None and args.init_from_edm is not None:
        raise SettingsError("give --init-from or --init-from-edm, not both", "init_from_edm")
    if args.keep_count and args.init_from is None:
        raise SettingsError("only with --init-from", "keep_count")
    autoencoder = _check_autoencoder_flags(config, args, checkpoint)
    net = config.network
    if config.latent:  # latents encoded by the model's autoencoder, normalised (no hold-out, no padding)
        import torch

        from lowdiff.data import load_latents

        sha = None if autoencoder is None else autoencoder.sha256
        x, labels = load_latents(args.data, net.img_channels, net.img_resolution, autoencoder_sha256=sha)
        if config.conditional and labels is None:
            raise DataError(f"{args.data}: {config.name} is class-conditional; the latents file needs 'labels'")
        y = labels if config.conditional else None
        labels = labels if labels is not None else torch.zeros(len(x), dtype=torch.long)
    else:
        images, labels = load_dataset(args.data)
        train_idx, _ = holdout_split(labels, args.holdout_per_class)
        if len(train_idx) == 0:
            raise DataError(
                f"{args.data}: the hold-out of {args.holdout_per_class} per class leaves nothing to train on"
            )
        x = prepare_images(images[train_idx], config.pad, net.img_resolution, net.img_channels)
        y = labels[train_idx] if config.conditional else None
    if y is not None:
        found = int(labels.max()) + 1
        if found > config.num_classes:
            raise DataError(f"label {found - 1} is out of range for {config.name} ({config.num_classes} classes)")
        if found < config.num_classes:
            print(
                f"warning: {args.data} has {found} classes, {config.name} has {config.num_classes}: "
                f"class labels {found}…{config.num_classes - 1} will never be trained",
                file=sys.stderr,
            )
    if y is not None and args.data.is_dir():  # an image folder: its subfolders name the classes
        names = tuple(image_folder_classes(args.data))
        print("classes: " + ", ".join(f"{i} = {name}" for i, name in enumerate(names)), file=sys.stderr)
        if len(names) == config.num_classes and names != config.class_names:
            config = replace(config, class_names=names)  # saved in the checkpoint with the config
    options = TrainOptions(
        total_kimg=args.kimg,
        seed=args.seed,
        grid_every=args.grid_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        # one process: the idle CPUs (a busy machine made torch's default many times slower); under
        # torchrun every rank would count the same idle CPUs, so ranks keep torch's (OMP_NUM_THREADS) default
        threads=args.threads or (default_threads() if distributed.world == 1 else 0),
        device=resolve_device(args.device),
        precision=args.precision,
        batch_gpu=args.batch_gpu,
        workers=args.workers if args.workers is not None else (2 if resolve_device(args.device) == "cuda" else 0),
    )
    distributed.start(distributed.device(options.device))
    trainer = Trainer(config, options, args.run_dir, distributed)
    if trainer.checkpoint_path.exists() and not (args.resume or args.overwrite):
        raise SettingsError(
            f"{args.run_dir} already holds a training checkpoint; pass --resume to continue it or --overwrite "
            "to start afresh",
            "run_dir",
        )
    if args.resume and trainer.resume():
        print(f"resumed from {trainer.checkpoint_path} at {trainer.nimg / 1000:.1f} kimg", file=sys.stderr)
        if autoencoder is not None:
            _check_same_decoder(trainer, autoencoder)
    elif autoencoder is not None:
        trainer.use_autoencoder(autoencoder.autoencoder, autoencoder.sha256)
        print(f"decoder and latent statistics from {args.autoencoder}", file=sys.stderr)
    elif args.init_from is not None:
        trainer.init_from(args.init_from, keep_count=args.keep_count)
        print(f"initialised from {args.init_from}", file=sys.stderr)
    elif args.init_from_edm is not None:
        from lowdiff.edm_import import init_from_edm

        start = init_from_edm(args.init_from_edm, config, trainer.denoiser.net.state_dict())
        trainer.denoiser.net.load_state_dict(start.state_dict)
        trainer.ema.load_state_dict(start.state_dict)
        print(
            f"initialised from EDM {args.init_from_edm}: {len(start.copied)} tensors copied, "
            f"{len(start.fresh)} resolution-specific ones fresh",
            file=sys.stderr,
        )
    where = f"{distributed.world} processes on {options.device}" if distributed.world > 1 else options.device
    print(
        f"training {config.name} on {len(x)} images from {args.data} into {args.run_dir} ({where}, "
        f"{options.precision}, batch {config.training.batch_size} = {distributed.world} process(es) × "
        f"{trainer.share // trainer.batch_gpu} round(s) × {trainer.batch_gpu})",
        file=sys.stderr,
    )
    interrupted = trainer.fit(x, y, log=progress_stream(args))
    print(
        f"{'interrupted' if interrupted else 'done'} at step {trainer.step} ({trainer.nimg / 1000:.1f} kimg); "
        f"checkpoint: {trainer.checkpoint_path}",
        file=sys.stderr,
    )
    if interrupted:
        raise SystemExit(130)
    if args.export and distributed.main:
        trainer.ema_model().save(args.export)
        print(f"EMA weights written to {args.export}", file=sys.stderr)


def _check_autoencoder_flags(config: Any, args: argparse.Namespace, checkpoint: Path) -> Any:
    """The ``--autoencoder`` file (an :class:`~lowdiff.autoencoder_training.AutoencoderFile`) or None,
    after the checks that need no training state: a latent run that starts afresh must say which
    autoencoder its latents came from — without one its checkpoints would carry a random decoder."""
    if args.autoencoder is not None and not config.latent:
        raise SettingsError(f"{config.name} is a pixel config; --autoencoder is for latent configs", "autoencoder")
    if args.autoencoder is not None and args.init_from is not None:
        raise SettingsError("give --autoencoder or --init-from (whose checkpoint brings its decoder), not both",
                            "autoencoder")  # fmt: skip
    resuming = args.resume and checkpoint.exists()
    if config.latent and args.autoencoder is None and args.init_from is None and not resuming:
        raise SettingsError(
            f"{config.name} is a latent config: pass the autoencoder that encoded --data (`lowdiff "
            "train-autoencoder`, then `lowdiff encode-latents`), or --init-from a latent checkpoint",
            "autoencoder",
        )
    if args.autoencoder is None:
        return None
    from lowdiff.autoencoder_training import load_autoencoder

    return load_autoencoder(args.autoencoder)


def _check_same_decoder(trainer: Any, autoencoder: Any) -> None:
    """A resumed run keeps the decoder it started with; ``--autoencoder`` may repeat it, not replace it."""
    import torch

    from lowdiff.autoencoder import LatentDecoder

    given = LatentDecoder.from_autoencoder(autoencoder.autoencoder).state_dict()
    stored = trainer.model.decoder.state_dict()
    if given.keys() != stored.keys() or not all(torch.equal(given[k], stored[k].cpu()) for k in given):
        raise CheckpointError(
            f"{autoencoder.path} is not the autoencoder {trainer.checkpoint_path} was started with", "autoencoder"
        )


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


RECIPE_FLAGS = ("batch_size", "lr", "lr_rampup_kimg", "ema_halflife_kimg", "grad_clip", "augment_p", "loss_weighting")


def configure(config: Any, args: argparse.Namespace) -> Any:
    """The config with the recipe flags that were given applied (the rest stay the config's)."""
    from dataclasses import replace

    from lowdiff.configs import ModelConfig

    assert isinstance(config, ModelConfig)
    changes = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    if changes:
        config = config.with_training(**changes)
    if args.preconditioning is not None:
        config = replace(config, preconditioning=args.preconditioning)
    return config


def resumed_config(config: Any, checkpoint: Path) -> Any:
    """A resumed run continues with the recipe and preconditioning it was started with (flags still override)."""
    from dataclasses import replace

    from lowdiff.model import config_from_dict, read_checkpoint

    try:
        stored = config_from_dict(read_checkpoint(checkpoint).get("config"))
    except LowDiffError as exc:
        raise CheckpointError(f"{checkpoint}: {exc.message}", "run_dir") from None
    if stored.network != config.network:
        return config  # Trainer.resume names the mismatch
    return replace(config, training=stored.training, preconditioning=stored.preconditioning)


def run_export_ema(args: argparse.Namespace) -> None:
    """Write the EMA weights of a training checkpoint as a small inference checkpoint."""
    from lowdiff.model import load_model, read_checkpoint

    payload = read_checkpoint(args.checkpoint)
    model = load_model(args.checkpoint)
    model.metadata = dict(payload.get("metadata", {}))
    model.save(args.out)
    print(args.out)
