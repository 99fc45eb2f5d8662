#!/usr/bin/env bash
# fashion32-latent vs its single-stage baseline and the pixel fashion32 (issue 18, part 5): quality and speed.
#
#   bash benchmarks/latent/run.sh DATA.npz [NUM_SAMPLES] [AUTOENCODER.pt]   (NUM_SAMPLES defaults to 2000)
#
# 1. `scripts/make_model_card.py` for each latent model: a 10×10 grid (one row per class, seeds 0…99) and
#    class agreement + Fréchet distance in the committed classifier's features over NUM_SAMPLES images,
#    seeds 0…NUM_SAMPLES−1, against the 10,000 held-out Fashion-MNIST images, the figures
#    benchmarks/quality/ reports for the pixel fashion32 on the same seeds (its `lowdiff-paper` point).
# 2. `lowdiff bench`: batches of 64, both latent models × engines torch and onnxruntime, round-robin in one
#    run so that all see the same machine (the decode stage included and timed on its own).
# 3. With the autoencoder file (scripts/train_fashion32_latent.sh's; the encoder is not in the checkpoints):
#    ae_floor.py, the FD of training images passed through the autoencoder (what the decoder alone costs).
# Run it alone on the machine: two CPU-heavy processes slow each other far more than 2× here.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA="${1:?usage: $0 DATA.npz [NUM_SAMPLES]}"
N="${2:-2000}"
PY="${PY:-.venv/bin/python}"
OUT=benchmarks/latent
AE="${3:-$OUT/fashion32-latent-autoencoder.pt}"  # the committed one, which encoded fashion32-latent's data
W=lowdiff/weights

for name in fashion32-latent fashion32-latent-baseline; do
  "$PY" scripts/make_model_card.py --data "$DATA" --checkpoint "$W/$name.pt" --num-samples "$N" --out "$OUT"
done
cp "$OUT/fashion32-latent-grid.png" "$W/fashion32-latent-grid.png"  # the model card's picture ships with it

"$PY" -m lowdiff bench --checkpoint "$W/fashion32-latent.pt" --compare "$W/fashion32-latent-baseline.pt" \
  --engine torch,onnxruntime --batch 64 --runs 5 --threads 2 --json "$OUT/throughput-cpu.json"
if [[ -f "$AE" ]]; then
  "$PY" "$OUT/ae_floor.py" --autoencoder "$AE" --data "$DATA" --num "$N"
fi
"$PY" "$OUT/summarize.py"
