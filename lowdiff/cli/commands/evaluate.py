"""``lowdiff eval`` (class agreement and Fréchet distance of generated images) and ``lowdiff train-classifier``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowdiff.cli.args import (
    HelpFormatter,
    add_quiet,
    add_threads,
    apply_threads,
    nonnegative_int,
    positive_int,
    progress_stream,
    seed,
)
from lowdiff.data import DEFAULT_HOLDOUT_PER_CLASS
from lowdiff.errors import ConfigError, DataError, LowDiffError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="class agreement and Fréchet distance of generated images", formatter_class=HelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a LowDiff checkpoint or an embedded model's name (fashion32, the default; fashion32-latent; …)",
    )
    p.add_argument("--reference", type=Path, required=True, help="real images: .npz, image folder or CIFAR-10 tarball")
    p.add_argument(
        "--holdout-per-class",
        type=positive_int,
        default=DEFAULT_HOLDOUT_PER_CLASS,
        help="the last N images of each class are the held-out reference; the rest is the floor's",
    )
    p.add_argument("--classifier", type=Path, default=None, help="default: the embedded Fashion-MNIST classifier")
    p.add_argument("--num-samples", type=positive_int, default=10000, help="images to generate and score")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per generation batch")
    p.add_argument("--seed", type=seed, default=0, help="first seed; image i uses seed + i")
    p.add_argument("--schedule", type=Path, default=None, help="a JSON cascade schedule to sample with instead")
    add_threads(p)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument(
        "--inception-fid",
        action="store_true",
        help="also the standard Inception FID against the reference (needs torch-fidelity and its weights)",
    )
    add_quiet(p)
    p.set_defaults(func=run)


def register_train_classifier(sub: Any) -> None:
    p = sub.add_parser(
        "train-classifier",
        help="train the evaluation classifier on a dataset's training split",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help=".npz, image folder or CIFAR-10 tarball")
    p.add_argument(
        "--holdout-per-class",
        type=positive_int,
        default=DEFAULT_HOLDOUT_PER_CLASS,
        help="the last N images of each class are held out (its accuracy on them is the ceiling)",
    )
    p.add_argument("--pad", type=nonnegative_int, default=2, help="black border added to each side (28 → 32)")
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the training split")
    p.add_argument("--out", type=Path, required=True, help="the classifier file to write")
    add_threads(p)
    add_quiet(p)
    p.set_defaults(func=run_train_classifier)


def _reference_split(path: Path, holdout: int, pad: int, resolution: int | None = None, channels: int | None = None):  # noqa: ANN202
    from lowdiff.data import load_split

    try:
        return load_split(path, holdout, pad, resolution, channels)
    except DataError as exc:
        raise exc if exc.field == "holdout_per_class" else exc.for_field("reference") from None


def run(args: argparse.Namespace) -> None:
    from lowdiff.evaluation import Classifier, check_inception_available, evaluate
    from lowdiff.model import load_model
    from lowdiff.schedule import CascadeSchedule

    apply_threads(args)
    if args.inception_fid:
        check_inception_available()
    model = load_model(args.checkpoint)
    if args.schedule is not None:
        try:
            schedule = CascadeSchedule.from_dict(json.loads(args.schedule.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{args.schedule}: {exc}", "schedule") from None
        model = model.with_schedule(schedule)
    classifier = Classifier.load(args.classifier)
    # The images the pipeline returns: decoded pixels for a latent model, not its latent grid.
    side, channels = model.config.image_resolution, model.config.image_channels
    if (classifier.channels, classifier.resolution) != (channels, side) or (
        model.config.conditional and classifier.num_classes != model.config.num_classes
    ):
        raise LowDiffError(
            f"it takes {classifier.channels}×{classifier.resolution}² images of {classifier.num_classes} classes; "
            f"the model makes {channels}×{side}² images of {model.config.num_classes} "
            "classes (train one with `lowdiff train-classifier`)",
            "classifier",
        )
    train, held, _, held_labels = _reference_split(
        args.reference, args.holdout_per_class, model.config.pad, side, channels
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
        log=progress_stream(args),
        with_inception=args.inception_fid,
    )
    result = {"model": model.config.name, "nfe": list(model.schedule.nfe), **report.as_dict()}
    print(json.dumps(result, indent=2))
    for warning in report.warnings or []:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if report.inception_fid_error:
        raise LowDiffError(f"{report.inception_fid_error} (the other figures above are complete)", "inception_fid")


def run_train_classifier(args: argparse.Namespace) -> None:
    from lowdiff.evaluation import classify_with_progress, train_classifier

    apply_threads(args)
    try:
        train, held, train_labels, held_labels = _reference_split(args.data, args.holdout_per_class, args.pad)
    except DataError as exc:
        raise exc.for_field("data") if exc.field == "reference" else exc from None
    num_classes = int(train_labels.max()) + 1
    log = progress_stream(args)
    model = train_classifier(train, train_labels, num_classes, epochs=args.epochs, log=log)
    predicted = classify_with_progress(model, held, "scoring held-out images", log)[0]
    accuracy = float((predicted == held_labels).float().mean())
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
