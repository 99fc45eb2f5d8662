#!/usr/bin/env bash
# Create .venv and install LowDiff Serve for the CPU (torch pinned to the CPU build 2.13.0).
#   bash scripts/setup-cpu.sh          # runtime
#   bash scripts/setup-cpu.sh --dev    # + test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
python3 -m venv .venv
# The constraint keeps every dependency from pulling a multi-GB CUDA build of torch.
.venv/bin/pip install --quiet -c constraints-cpu.txt torch==2.13.0
.venv/bin/pip install --quiet -c constraints-cpu.txt -e ".${extras}"
echo "LowDiff Serve installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
