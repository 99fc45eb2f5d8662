"""``lowdiff sample``: PNG files from a trained model, without a server."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowdiff.cli.args import HelpFormatter, add_threads, apply_threads, nonnegative_int, positive_int, seed


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sample",
        help="generate PNGs with a trained model (default: the embedded model)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--class-label", type=nonnegative_int, default=None, help="class index (conditional models)")
    p.add_argument("--seed", type=seed, default=0, help="first seed; image k uses seed + k")
    p.add_argument("--num-images", type=positive_int, default=1, help="how many images")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a LowDiff checkpoint or an embedded model's name (fashion32, the default; fashion32-latent; …)",
    )
    add_threads(p)
    p.add_argument("--out-dir", type=Path, required=True, help="folder for class{C}_seed{S}.png files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lowdiff.imaging import save_png
    from lowdiff.model import load_model
    from lowdiff.requests import generation_request

    apply_threads(args)
    model = load_model(args.checkpoint)
    request = generation_request(model.config, args.class_label, args.seed, args.num_images, max_images=2**32)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    images = model.generate(request.seeds, request.class_labels)
    prefix = f"class{args.class_label}_" if request.class_labels is not None else ""
    for s, image in zip(request.seeds, images):
        path = args.out_dir / f"{prefix}seed{s}.png"
        save_png(image, path)
        print(path)
