"""The ``lowdiff`` command line: models, sample, train, eval (and more as the product grows).

Bad input (unknown config, missing file, out-of-range class label, negative seed) prints one
line naming the flag or file and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _nonnegative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def _seed(text: str) -> int:
    value = _nonnegative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2^32, got {value}")
    return value


# ---------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> None:
    from lowdiff.counting import describe_all

    names = args.names or None
    table = describe_all(names)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'config':22} {'params':>12}  stages (resolution: NFE, GFLOP/eval)")
    for name, info in table.items():
        stages = ", ".join(f"{s['resolution']}: {s['nfe']}, {s['gflops_per_image']:.3f}" for s in info["stages"])
        print(f"{name:22} {info['params']:>12,}  {stages}")


# ---------------------------------------------------------------- sample
def _load_model(checkpoint: Path | None, config: str | None = None):  # noqa: ANN202
    from lowdiff.configs import get_config
    from lowdiff.model import CheckpointError, LowDiffModel

    try:
        if config is not None and checkpoint is None:
            get_config(config)
            return LowDiffModel.from_config(config)
        return LowDiffModel.load(checkpoint)
    except CheckpointError as exc:
        raise CLIError(f"--checkpoint: {exc}") from None
    except ValueError as exc:
        raise CLIError(f"--config: {exc}") from None


def cmd_sample(args: argparse.Namespace) -> None:
    from lowdiff.training import save_png

    model = _load_model(args.checkpoint)
    seeds = [args.seed + k for k in range(args.num_images)]
    if any(s >= 2**32 for s in seeds):
        raise CLIError("--seed: seed + num_images − 1 must stay below 2^32")
    if model.config.conditional:
        if args.class_label is None:
            raise CLIError(f"--class-label: required for {model.config.name} (0…{model.config.num_classes - 1})")
        if not 0 <= args.class_label < model.config.num_classes:
            raise CLIError(f"--class-label: {args.class_label} is out of range 0…{model.config.num_classes - 1}")
        labels = [args.class_label] * len(seeds)
    else:
        if args.class_label is not None:
            raise CLIError(f"--class-label: {model.config.name} is unconditional and takes no class label")
        labels = None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    images = model.generate(seeds, labels)
    prefix = f"class{args.class_label}_" if labels is not None else ""
    for seed, image in zip(seeds, images):
        path = args.out_dir / f"{prefix}seed{seed}.png"
        save_png(image, path)
        print(path)


# ---------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from lowdiff.configs import get_config
    from lowdiff.data import DataError, holdout_split, load_dataset, prepare_images
    from lowdiff.training import Trainer, TrainOptions

    try:
        config = get_config(args.config)
    except ValueError as exc:
        raise CLIError(f"--config: {exc}") from None
    try:
        images, labels = load_dataset(args.data)
        train_idx, _ = holdout_split(labels, args.holdout_per_class)
        x = prepare_images(images[train_idx], config.pad, config.network.img_resolution, config.network.img_channels)
    except DataError as exc:
        raise CLIError(f"--data: {exc}") from None
    y = labels[train_idx] if config.conditional else None
    if y is not None and int(y.max()) >= config.num_classes:
        raise CLIError(f"--data: label {int(y.max())} is out of range for {config.name} ({config.num_classes} classes)")
    options = TrainOptions(
        batch_size=args.batch_size,
        total_kimg=args.kimg,
        lr=args.lr,
        seed=args.seed,
        grid_every=args.grid_every,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
        ema_halflife_kimg=args.ema_halflife_kimg,
        lr_rampup_kimg=args.lr_rampup_kimg,
    )
    trainer = Trainer(config, options, args.run_dir)
    if args.resume and trainer.resume():
        print(f"resumed from {trainer.checkpoint_path} at {trainer.nimg / 1000:.1f} kimg", file=sys.stderr)
    elif args.init_from is not None:
        try:
            trainer.init_from(args.init_from)
        except (ValueError, OSError) as exc:
            raise CLIError(f"--init-from: {exc}") from None
        print(f"initialised from {args.init_from}", file=sys.stderr)
    print(f"training {config.name} on {len(x)} images from {args.data} into {args.run_dir}", file=sys.stderr)
    trainer.fit(x, y)
    if args.export:
        trainer.ema_model().save(args.export)
        print(f"EMA weights written to {args.export}", file=sys.stderr)


def cmd_export_ema(args: argparse.Namespace) -> None:
    """Write the EMA weights of a training checkpoint as a small inference checkpoint."""
    from lowdiff.model import CheckpointError, LowDiffModel, read_checkpoint

    try:
        payload = read_checkpoint(args.checkpoint)
        model = LowDiffModel.load(args.checkpoint)
    except CheckpointError as exc:
        raise CLIError(f"--checkpoint: {exc}") from None
    model.metadata = dict(payload.get("metadata", {}))
    model.save(args.out)
    print(args.out)


# ---------------------------------------------------------------- eval
def _load_split(path: Path, holdout: int, pad: int, resolution: int | None = None, channels: int | None = None):  # noqa: ANN202
    """(train images, held-out images, train labels, held-out labels) as [−1, 1] tensors.

    ``resolution``/``channels`` are what the model expects; None takes them from the data."""
    from lowdiff.data import DataError, holdout_split, load_dataset, prepare_images

    try:
        images, labels = load_dataset(path)
        train_idx, held_idx = holdout_split(labels, holdout)
        if len(held_idx) == 0:
            raise DataError(f"{path}: --holdout-per-class {holdout} leaves no held-out images")
        res = resolution or images.shape[-1] + 2 * pad
        prepare = lambda idx: prepare_images(images[idx], pad, res, channels or images.shape[1])  # noqa: E731
        return prepare(train_idx), prepare(held_idx), labels[train_idx], labels[held_idx]
    except DataError as exc:
        raise CLIError(f"--reference: {exc}") from None


def cmd_eval(args: argparse.Namespace) -> None:
    from lowdiff.evaluation import Classifier, InceptionUnavailable, check_inception_available, evaluate
    from lowdiff.model import CheckpointError

    if args.inception_fid:
        try:
            check_inception_available()
        except InceptionUnavailable as exc:
            raise CLIError(f"--inception-fid: {exc}") from None

    model = _load_model(args.checkpoint)
    if args.schedule is not None:
        from lowdiff.schedule import CascadeSchedule

        try:
            model = model.with_schedule(CascadeSchedule.from_dict(json.loads(args.schedule.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CLIError(f"--schedule: {exc}") from None
    try:
        classifier = Classifier.load(args.classifier)
    except CheckpointError as exc:
        raise CLIError(f"--classifier: {exc}") from None
    net = model.config.network
    if (classifier.channels, classifier.resolution) != (net.img_channels, net.img_resolution) or (
        model.config.conditional and classifier.num_classes != model.config.num_classes
    ):
        raise CLIError(
            f"--classifier: it takes {classifier.channels}×{classifier.resolution}² images of "
            f"{classifier.num_classes} classes; the model makes {net.img_channels}×{net.img_resolution}² "
            f"images of {model.config.num_classes} classes (train one with `lowdiff train-classifier`)"
        )
    train, held, _, held_labels = _load_split(
        args.reference, args.holdout_per_class, model.config.pad, net.img_resolution, net.img_channels
    )
    report = evaluate(
        model.generate,
        classifier,
        held,
        held_labels if model.config.conditional else None,
        args.num_samples,
        training=train,
        batch_size=args.batch_size,
        seed0=args.seed,
        with_inception=args.inception_fid,
    )
    result = {"model": model.config.name, "nfe": list(model.schedule.nfe), **report.as_dict()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if report.inception_fid_error:
        raise CLIError(f"--inception-fid: {report.inception_fid_error} (the other figures above are complete)")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from lowdiff.evaluation import classify, train_classifier

    train, held, train_labels, held_labels = _load_split(args.data, args.holdout_per_class, args.pad)
    num_classes = int(train_labels.max()) + 1
    model = train_classifier(train, train_labels, num_classes, epochs=args.epochs)
    accuracy = float((classify(model, held)[0] == held_labels).float().mean())
    model.save(
        args.out,
        {
            "data": str(args.data.name),
            "held_out_accuracy": accuracy,
            "epochs": args.epochs,
            "train_images": len(train),
            "held_out_images": len(held),
        },
    )
    print(json.dumps({"held_out_accuracy": round(accuracy, 4), "out": str(args.out)}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowdiff", description="LowDiff: cascaded low-resolution diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list built-in configs with parameter counts, NFE and GFLOP per stage")
    p.add_argument("names", nargs="*", help="configs to show (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("sample", help="generate PNGs with a trained model (default: the embedded model)")
    p.add_argument("--class-label", type=_nonnegative_int, default=None)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--num-images", type=_positive_int, default=1)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train a config on a dataset (.npz, image folder, CIFAR-10 tarball)")
    p.add_argument("--config", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument(
        "--holdout-per-class",
        type=_nonnegative_int,
        default=0,
        help="hold out the last N images of every class (not trained on)",
    )
    p.add_argument("--kimg", type=float, default=200.0, help="training images, thousands")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-rampup-kimg", type=float, default=10.0)
    p.add_argument("--ema-halflife-kimg", type=float, default=20.0)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--grid-every", type=_nonnegative_int, default=1000, help="steps between sample grids")
    p.add_argument("--checkpoint-every", type=_positive_int, default=250, help="steps between checkpoints")
    p.add_argument("--threads", type=_nonnegative_int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt if present")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a checkpoint's (EMA) weights with a fresh optimizer, e.g. the embedded model",
    )
    p.add_argument("--export", type=Path, default=None, help="write the final EMA weights here")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="class agreement and Fréchet distance of generated images")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the embedded model")
    p.add_argument("--reference", type=Path, required=True, help="real images: .npz, image folder or CIFAR-10 tarball")
    p.add_argument(
        "--holdout-per-class",
        type=_positive_int,
        default=1000,
        help="the last N images of each class are the held-out reference; the rest is the floor's",
    )
    p.add_argument("--classifier", type=Path, default=None, help="default: the embedded Fashion-MNIST classifier")
    p.add_argument("--num-samples", type=_positive_int, default=10000)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=_seed, default=0, help="first seed; image i uses seed + i")
    p.add_argument("--schedule", type=Path, default=None, help="a JSON cascade schedule to sample with instead")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument(
        "--inception-fid",
        action="store_true",
        help="also the standard Inception FID against the reference (needs torch-fidelity and its weights)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-classifier", help="train the evaluation classifier on a dataset's training split")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--holdout-per-class", type=_positive_int, default=1000)
    p.add_argument("--pad", type=_nonnegative_int, default=2)
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("export-ema", help="extract the EMA weights of a training checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_export_ema)

    from engines.bench import add_parser as add_bench_parser  # export and bench live with their code
    from export.cli import add_parser as add_export_parser

    add_export_parser(sub)
    add_bench_parser(sub)

    from service.cli import add_serve_parser  # the HTTP service lives in its own package

    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CLIError as exc:
        print(f"lowdiff {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: subcommands in other packages raise
    # lowdiff.cli.CLIError, which must be the class that main catches (`python -m lowdiff.cli`).
    from lowdiff.cli import main as _main

    sys.exit(_main())
