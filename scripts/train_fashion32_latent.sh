#!/usr/bin/env bash
# Train fashion32-latent (LowDiff cascade 4×4 → 8×8 in 8×8×4 KL latents) and its single-stage baseline
# fashion32-latent-baseline on Fashion-MNIST, on a CPU, with the same image budget for both.
#
#   bash scripts/train_fashion32_latent.sh DATA.npz [OUT_DIR]      (OUT_DIR defaults to runs/fashion32-latent)
#
# DATA.npz: 70,000 28×28 uint8 `images` with `labels` (scripts/fashion_mnist_to_npz.py writes it); the last
# 1,000 images of each class are held out by every step. Each step is skipped when its output exists and
# resumes its run folder otherwise, so rerunning the script after an interruption continues where it stopped.
#
# Measured here (torch 2.13 CPU, batch 64, one thread; the 2-core machine was busy with another run, so
# these are CPU seconds per step, which on a free core is the wall time — checked for the DiT steps):
#   autoencoder training step            1.8 s   → 60 kimg  =   938 steps ≈ 28 min on 1 thread
#   encoder, 256 images                  0.6 s   → 60,000 images ≈ 2.5 min (statistics; and again for encoding)
#   fashion32-latent training step       1.15 s  → 200 kimg = 3,125 steps ≈ 60 min on 1 thread
#   fashion32-latent-baseline step       0.86 s  → 200 kimg = 3,125 steps ≈ 45 min on 1 thread
#   sampling, per image (+ decode)       0.18 s cascade, 0.33 s baseline (a 100-image grid: 18 s / 33 s)
# On 2 threads (THREADS=2, the default) an estimated 1.6–1.7× faster (not measured: the machine was busy):
#   autoencoder ≈ 17 min + ≈ 4 min of statistics and held-out reconstruction, encoding ≈ 2 min,
#   cascade ≈ 35–40 min, baseline ≈ 25–30 min: about 1 h 30 min in all (2 h 30 min on 1 thread).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${1:?usage: $0 DATA.npz [OUT_DIR]}"
OUT="${2:-runs/fashion32-latent}"
LOWDIFF="${LOWDIFF:-.venv/bin/lowdiff}"
THREADS="${THREADS:-2}"
AE_KIMG="${AE_KIMG:-60}"
KIMG="${KIMG:-200}"  # the same image budget for the cascade and the baseline
HOLDOUT="${HOLDOUT:-1000}"  # held-out images per class, never trained on (what `lowdiff eval` scores against)
mkdir -p "$OUT"

# 1. The autoencoder: L1 + 1e-4·KL, Adam 5e-4, batch 64; then latent statistics and held-out error.
if [[ ! -f "$OUT/autoencoder.pt" ]]; then
  "$LOWDIFF" train-autoencoder --config fashion32-latent --data "$DATA" --run-dir "$OUT/ae" \
    --holdout-per-class "$HOLDOUT" --kimg "$AE_KIMG" --threads "$THREADS" --seed 0 --resume \
    --out "$OUT/autoencoder.pt"
fi

# 2. The training split as normalised latents (posterior means).
if [[ ! -f "$OUT/latents.pt" ]]; then
  "$LOWDIFF" encode-latents --autoencoder "$OUT/autoencoder.pt" --data "$DATA" --out "$OUT/latents.pt" \
    --holdout-per-class "$HOLDOUT" --threads "$THREADS"
fi

# 3. and 4. The cascade and the baseline, the same seed and image budget, the autoencoder's decoder in
# every checkpoint; a sample grid every 1,000 steps (RUN/grids/).
for config in fashion32-latent fashion32-latent-baseline; do
  if [[ ! -f "$OUT/$config.pt" ]]; then
    "$LOWDIFF" train --config "$config" --data "$OUT/latents.pt" --autoencoder "$OUT/autoencoder.pt" \
      --run-dir "$OUT/$config" --kimg "$KIMG" --threads "$THREADS" --seed 0 --resume
    "$LOWDIFF" export-ema --checkpoint "$OUT/$config/checkpoint.pt" --out "$OUT/$config.pt"
  fi
done

echo "done: $OUT/fashion32-latent.pt and $OUT/fashion32-latent-baseline.pt"
echo "e.g. $LOWDIFF sample --checkpoint $OUT/fashion32-latent.pt --class-label 7 --num-images 8 --out-dir $OUT/samples"
