#!/usr/bin/env bash
# One device window's work, as sent to the GPU machine (15 minutes of device time, start-up included).
#
#   bash scripts/device_window.sh OUT_DIR [GPU_CHECK_STEPS] [GPU_CHECK_DEADLINE_S] [QUALITY_DEADLINE_S] \
#        ['NAME|run.py arguments' …]
#
# 1. scripts/gpu_check.py for the named steps (default: the headline bench re-timed with NCHW, issue 14's
#    scheduler-overlap, issue 18's dit-ratio), packed into OUT_DIR/gpu-check.tar.gz;
# 2. issue 17's missing quality samples made on the GPU in fp32 with TF32 off (benchmarks/quality/run.py
#    --samples-only --device cuda), three groups in order of worth, each packed into its own
#    OUT_DIR/quality-<group>.tar.gz as soon as it is done (the device returns at most 8 files of 16 MiB);
#    groups given after the deadlines replace the default three.
#    Scoring and timing stay on the CPU (the study's throughput is the CPU's); the first 2,000 seeds of
#    each GPU point that the CPU cache also holds are compared level by level before any is used.
# Without CUDA it runs nothing of step 2 but says so (gpu_check.py does the same for step 1).
# SCHED_LATENCY_S=N (environment; default 0: off) runs, between steps 1 and 2, issue 14's open-loop latency
# of the service's batchers on cifar10-cond, cudagraph bf16 (benchmarks/scheduler/sleep_engine.py --model:
# cascade, staged, staged with overlap held and always beside, at 50/95/120 % of the cascade batcher's
# measured capacity; about 2.5 min on an H200, not yet run) for at most N seconds, into
# OUT_DIR/scheduler-latency.json|log. Quality samples (issue 17, resolved) are off with QUALITY_DEADLINE_S 0.
# Wheels in .whl/ (scripts/device_wheels.sh; carry it) are installed first into /tmp/site.
set -u -o pipefail
out=${1:?usage: device_window.sh OUT_DIR [STEPS] [GPU_CHECK_DEADLINE_S] [QUALITY_DEADLINE_S]}
steps=${2:-environment,bench-base,scheduler-overlap,dit-ratio}
check_deadline=${3:-240}
quality_deadline=${4:-240}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ -n "$steps" ] && [ "$steps" != none ]; then
  $py scripts/gpu_check.py --out /tmp/gpu-check --tar "$out/gpu-check.tar.gz" --only "$steps" \
    --deadline-s "$check_deadline"
  echo "== gpu_check rc=$? after $(($(date +%s) - start)) s"
fi

if ! $py -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "== no CUDA here: scheduler latency and quality samples not run"
  exit 0
fi
if [ "${SCHED_LATENCY_S:-0}" -gt 0 ]; then
  timeout "$SCHED_LATENCY_S" $py benchmarks/scheduler/sleep_engine.py --model cifar10-cond --engine cudagraph:bf16 \
    --device cuda --requests 1000 --loads 0.5,0.95,1.2 --out "$out/scheduler-latency.json" \
    > "$out/scheduler-latency.log" 2>&1
  echo "== scheduler latency rc=$? after $(($(date +%s) - start)) s"
  tail -8 "$out/scheduler-latency.log"
fi
quality_end=$(($(date +%s) + quality_deadline))
# group name | run.py arguments
groups=(
  "headline|--points lowdiff-paper,edm-35 --num-samples 10000"
  "sweep|--points lowdiff-trunc*,lowdiff-32steps*,lowdiff-8x1,lowdiff-late,edm-31,edm-25,edm-21,edm-17"
  "confirm|--points edm-*,lowdiff-paper,lowdiff-8x1-late16 --num-samples 2000 --seed-offset 1000000"
)
if [ $# -gt 4 ]; then
  groups=("${@:5}")
fi
set -f  # the point patterns are not file names
for g in "${groups[@]}"; do
  name=${g%%|*}
  left=$((quality_end - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    echo "== quality $name skipped: $left s left"
    continue
  fi
  # shellcheck disable=SC2086  # the group's arguments are meant to split
  timeout "$left" $py benchmarks/quality/run.py --samples-only --device cuda --sample-batch 640 \
    --cache "/tmp/quality-$name" ${g#*|}
  echo "== quality $name rc=$? after $(($(date +%s) - start)) s"
  tar czf "$out/quality-$name.tar.gz" -C /tmp "quality-$name" && ls -la "$out/quality-$name.tar.gz"
done
