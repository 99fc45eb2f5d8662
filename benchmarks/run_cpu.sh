#!/usr/bin/env bash
# The CPU benchmarks committed in benchmarks/cpu/ (see benchmarks/README.md).
# Usage: bash benchmarks/run_cpu.sh [NAME…]   (no NAME: all, in this order; 3–15 minutes each on 2 busy cores)
# Engines in one report are timed round-robin (one batch each per round) so they share the machine's load.
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
  [fashion32-engines-1t]="--config fashion32 --engine torch,onnxruntime,torch:bf16 --batch 64 --runs 5 --threads 1"
  [cifar10-cond-vs-edm-b2-1t]="--config cifar10-cond --compare edm-cifar10-cond --engine torch,onnxruntime --batch 2 --runs 2 --threads 1"
  # Two threads: started, but its warm-up alone outran the time we had on the shared machine; not reported.
  [fashion32-engines-2t]="--config fashion32 --engine onnxruntime,torch:bf16,torch --batch 64 --runs 2 --threads 2"
)
order=(fashion32-engines-1t cifar10-cond-vs-edm-b2-1t)
names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=("${order[@]}")
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  bench "$name" ${runs[$name]}
done
