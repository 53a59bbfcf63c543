#!/usr/bin/env bash
# Opt-in end-to-end run on kind: create the cluster (kind-config.yaml), build and load the images,
# install charts/tuneop, then `pytest -m e2e tests/e2e` applies the tenant namespace and the
# examples and waits for their status. Skips cleanly (exit 0) without Docker, kind or kubectl.
#   scripts/e2e.sh                      operator image only; GPU examples stay Pending
#   TUNEOP_E2E_TRAIN=1 scripts/e2e.sh   also the trainer image: the CPU quickstart trains to Succeeded
# Env: TUNEOP_E2E_CLUSTER (tuneop-e2e), TUNEOP_E2E_KEEP=1 keeps the cluster, PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${TUNEOP_E2E_CLUSTER:-tuneop-e2e}
NS=${TUNEOP_E2E_NAMESPACE:-tuneop-system}
TAG=${TUNEOP_E2E_TAG:-e2e}
REGISTRY=${REGISTRY:-ghcr.io/tuneop}
PY=${PYTHON:-.venv/bin/python}

skip() { echo "e2e: skipped: $*"; exit 0; }
for tool in docker kind kubectl; do command -v "$tool" >/dev/null || skip "$tool not found"; done
docker info >/dev/null 2>&1 || skip "no Docker daemon"

created=0
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s
  created=1
fi
cleanup() {
  if [ "$created" = 1 ] && [ "${TUNEOP_E2E_KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT
export KUBECONFIG=${KUBECONFIG:-$HOME/.kube/config}
kubectl config use-context "kind-$CLUSTER"

REGISTRY=$REGISTRY TAG=$TAG scripts/build-images.sh operator
kind load docker-image --name "$CLUSTER" "$REGISTRY/operator:$TAG"
trainer_image="$REGISTRY/trainer:$TAG"
if [ "${TUNEOP_E2E_TRAIN:-0}" = 1 ]; then
  REGISTRY=$REGISTRY TAG=$TAG scripts/build-images.sh trainer e2e-trainer
  trainer_image="$REGISTRY/trainer:$TAG-e2e"
  kind load docker-image --name "$CLUSTER" "$trainer_image"
fi

values=(--set "image.repository=$REGISTRY/operator" --set "image.tag=$TAG" --set image.pullPolicy=Never
        --set "workloads.trainer.image=$trainer_image" --set operator.verbose=true)
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$NS" --overwrite pod-security.kubernetes.io/enforce=restricted
if command -v helm >/dev/null; then
  helm upgrade --install tuneop charts/tuneop -n "$NS" "${values[@]}" --wait --timeout 5m
else
  # No helm binary: the same render through helm-python-sdk (Helm v4 in a library), then apply.
  kubectl apply --server-side -f charts/tuneop/crds/
  kubectl wait --for=condition=Established --timeout=60s crd/finetunejobs.tuneop.dev crd/adapterdeployments.tuneop.dev
  "$PY" - "$NS" "$REGISTRY" "$TAG" "$trainer_image" <<'PYEOF' | kubectl apply --server-side -f -
import sys
import helm_python as helm
ns, registry, tag, trainer = sys.argv[1:5]
values = {"image": {"repository": f"{registry}/operator", "tag": tag, "pullPolicy": "Never"},
          "workloads": {"trainer": {"image": trainer}}, "operator": {"verbose": True}}
out = helm.Chart.load("charts/tuneop").render(values, name="tuneop", namespace=ns, is_install=True)
for path, text in sorted(out.items()):
    if not path.endswith("NOTES.txt") and text.strip():
        print("---")
        print(text)
PYEOF
fi
kubectl -n "$NS" rollout status deploy/tuneop --timeout=180s

TUNEOP_E2E=1 TUNEOP_E2E_NAMESPACE=$NS TUNEOP_E2E_TRAINER_IMAGE=$trainer_image \
  "$PY" -m pytest -m e2e tests/e2e -v -p no:cacheprovider "$@"
