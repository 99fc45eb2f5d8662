#!/usr/bin/env bash
# Wheels the GPU machine's image lacks for `python -m lowdiff …` (its CLI imports the serve settings, which
# need pydantic-settings; the image has torch, numpy, onnx, onnxruntime, safetensors, prometheus-client,
# but not these: session 8's first call failed on `No module named 'pydantic'`). Downloaded here into
# .whl/ (ignored by git; name it in the device call's `carry`), for the image's Python 3.12;
# scripts/device_window.sh installs them there into /tmp/site. Versions: this venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
specs=()
for name in pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection \
  python-json-logger typing_extensions; do
  specs+=("$name==$(version "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
ls .whl
