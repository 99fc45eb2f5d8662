#!/usr/bin/env bash
# The CPU benchmarks committed in benchmarks/cpu/ (see benchmarks/README.md), in the order they ran.
# Usage: bash benchmarks/run_cpu.sh [NAME…]   (no NAME: all of them; each takes 1–6 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/cpu
mkdir -p "$out"
bench() {  # NAME ARGS…: one `lowdiff bench` run, with the machine's load before and after it
  local name=$1; shift
  echo "== $name: $(date -u +%FT%TZ) load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/load.log"
  nice -n 5 .venv/bin/lowdiff bench "$@" --json "$out/$name.json" > /dev/null
  echo "   $name done $(date -u +%FT%TZ), load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/load.log"
}
declare -A runs=(
  [fashion32-torch-fp32-1t]="--config fashion32 --engine torch --batch 64 --runs 5 --threads 1"
  [fashion32-onnxruntime-fp32-1t]="--config fashion32 --engine onnxruntime --batch 64 --runs 5 --threads 1"
  [fashion32-torch-bf16-1t]="--config fashion32 --engine torch --precision bf16 --batch 64 --runs 5 --threads 1"
  [cifar10-cond-vs-edm-torch-b2-1t]="--config cifar10-cond --compare edm-cifar10-cond --engine torch --batch 2 --runs 2 --threads 1"
  [cifar10-cond-vs-edm-onnxruntime-b2-1t]="--config cifar10-cond --compare edm-cifar10-cond --engine onnxruntime --batch 2 --runs 2 --threads 1"
  [fashion32-onnxruntime-fp32-2t]="--config fashion32 --engine onnxruntime --batch 64 --runs 3 --threads 2"
  [fashion32-torch-bf16-2t]="--config fashion32 --engine torch --precision bf16 --batch 64 --runs 2 --threads 2"
  [fashion32-torch-fp32-2t]="--config fashion32 --engine torch --batch 64 --runs 2 --threads 2"
)
order=(fashion32-torch-fp32-1t fashion32-onnxruntime-fp32-1t fashion32-torch-bf16-1t cifar10-cond-vs-edm-torch-b2-1t
  cifar10-cond-vs-edm-onnxruntime-b2-1t fashion32-onnxruntime-fp32-2t fashion32-torch-bf16-2t fashion32-torch-fp32-2t)
names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=("${order[@]}")
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  bench "$name" ${runs[$name]}
done
