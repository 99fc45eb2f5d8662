"""Regenerate the default model's sample grid and quality figures for its model card.

    .venv/bin/python scripts/make_model_card.py --data ../shared/data/fashion-mnist-70k.npz \
        [--checkpoint lowdiff/weights/fashion32.pt] [--num-samples 10000] --out lowdiff/weights

Writes ``NAME-grid.png`` (10×10, one row per class, seeds 0…99) and ``NAME-eval.json`` (class
agreement, FD, their ceiling and floor, sampling speed), NAME being the checkpoint's config name
(``fashion32``, ``fashion32-latent``, …). The card's prose is by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lowdiff.data import load_split
from lowdiff.evaluation import Classifier, evaluate
from lowdiff.imaging import save_png
from lowdiff.model import LowDiffModel
from lowdiff.training import sample_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path("lowdiff/weights"))
    args = parser.parse_args()

    model = LowDiffModel.load(args.checkpoint)
    stem = model.config.name
    grid_path = args.out / f"{stem}-grid.png"
    save_png(sample_grid(model, rows=10, cols=10), grid_path)
    print(f"wrote {grid_path}")

    start = time.perf_counter()
    model.generate([0], [0])
    one_image_s = time.perf_counter() - start

    # The pipeline's images: decoded pixels for a latent model (fashion32-latent), not its latent grid.
    side, channels = model.config.image_resolution, model.config.image_channels
    train, held, _, held_labels = load_split(args.data, 1000, model.config.pad, side, channels)
    report = evaluate(model.generate, Classifier.load(), held, held_labels, args.num_samples, training=train)
    result = {
        "model": stem,
        "checkpoint_sha256": model.metadata.get("checkpoint_sha256"),
        "nfe_per_stage": list(model.schedule.nfe),
        **report.as_dict(),
        "eval_images_per_second": round(args.num_samples / report.seconds, 2),
        "one_image_seconds": round(one_image_s, 3),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "training": {k: v for k, v in model.metadata.items() if k not in ("checkpoint_path", "checkpoint_sha256")},
    }
    out = args.out / f"{stem}-eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
