"""What the autoencoder alone costs in FD: a latent model can at best generate what its decoder makes.

    .venv/bin/python benchmarks/latent/ae_floor.py --autoencoder runs/fashion32-latent/autoencoder.pt \
        --data fashion-mnist-70k.npz [--num 2000]

Takes ``--num`` training images spread evenly over the training split (every k-th: all classes alike),
and scores them against the held-out split in the committed classifier's features, twice: as they are
(the FD floor of real images at this N) and after encode → posterior mean → decode → uint8 (the floor of
any model that generates through this decoder). Writes ae-floor.json beside this file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowdiff.autoencoder_training import load_autoencoder, posterior_means
from lowdiff.data import load_split
from lowdiff.evaluation import Classifier, classify, frechet_distance, uint8_to_unit
from lowdiff.sampler import to_uint8

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--num", type=int, default=2000)
    args = parser.parse_args()

    source = load_autoencoder(args.autoencoder)
    ae = source.autoencoder
    train, held, _, _ = load_split(args.data, 1000, source.pad, source.image_resolution, 1)
    picked = train[:: len(train) // args.num][: args.num]
    classifier = Classifier.load()
    _, held_feats = classify(classifier, held)
    real = to_uint8(picked)
    with torch.no_grad():
        recon = torch.cat([to_uint8(ae.decode(z)) for z in posterior_means(ae, picked).split(256)])
    _, real_feats = classify(classifier, uint8_to_unit(real))
    _, recon_feats = classify(classifier, uint8_to_unit(recon))
    result = {
        "autoencoder_sha256": source.sha256,
        "num_images": len(picked),
        "fd_real_training_images": round(frechet_distance(real_feats, held_feats), 3),
        "fd_reconstructed_training_images": round(frechet_distance(recon_feats, held_feats), 3),
        "held_out_reconstruction": source.metadata.get("held_out_reconstruction"),
    }
    (HERE / "ae-floor.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
