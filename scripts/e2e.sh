#!/usr/bin/env bash
# Opt-in end-to-end run on a real cluster: build the images, put them where the nodes find them,
# install charts/tuneop into a namespace enforcing Pod Security "restricted", then `pytest -m e2e tests/e2e`
# (the examples reconciled, the quickstart trained by the trainer-cpu image to Succeeded, its adapter served
# by an AdapterDeployment on the vllm-cpu image, deletes garbage-collected, Argo CD health on live objects).
#
#   KUBECONFIG=... scripts/e2e.sh                 an existing cluster (the current context)
#   TUNEOP_E2E_KIND=1 scripts/e2e.sh              a kind cluster (kind-config.yaml), created and deleted
#
# Env:
#   TUNEOP_E2E_LOAD     how the nodes get the images: kind | ctr | push | none (default: kind with
#                       TUNEOP_E2E_KIND=1, else ctr when TUNEOP_E2E_CTR is set, else none)
#   TUNEOP_E2E_CTR      the ctr command of the nodes' containerd for `ctr` loading (single-node clusters),
#                       e.g. "ctr -a /run/containerd/containerd.sock -n k8s.io"
#   REGISTRY, TAG       image names (ghcr.io/tuneop, e2e); with TUNEOP_E2E_LOAD=push, REGISTRY must be one the
#                       nodes pull from; BASE_IMAGE: see scripts/build-images.sh
#   TUNEOP_E2E_HOSTPATH where hostPath PersistentVolumes go when the cluster has no default StorageClass
#                       (single-node clusters; default /var/tmp/tuneop-e2e)
#   TUNEOP_E2E_NAMESPACE the operator's namespace (tuneop-system); TUNEOP_E2E_KEEP=1 keeps a kind cluster;
#   TUNEOP_E2E_SKIP_BUILD=1 uses images already built; PYTHON (.venv/bin/python); pytest args follow.
# Skips cleanly (exit 0) without docker, kubectl or a reachable cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${TUNEOP_E2E_NAMESPACE:-tuneop-system}
TAG=${TAG:-e2e}
REGISTRY=${REGISTRY:-ghcr.io/tuneop}
PY=${PYTHON:-.venv/bin/python}
KIND=${TUNEOP_E2E_KIND:-0}
CLUSTER=${TUNEOP_E2E_CLUSTER:-tuneop-e2e}
skip() { echo "e2e: skipped: $*"; exit 0; }
say() { echo "e2e: $*"; }
for tool in docker kubectl; do command -v "$tool" >/dev/null || skip "$tool not found"; done
docker info >/dev/null 2>&1 || skip "no Docker daemon"

created=0
if [ "$KIND" = 1 ]; then
  command -v kind >/dev/null || skip "kind not found"
  if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s
    created=1
  fi
  export KUBECONFIG=${KUBECONFIG:-$HOME/.kube/config}
  kubectl config use-context "kind-$CLUSTER"
fi
cleanup() {
  if [ "$created" = 1 ] && [ "${TUNEOP_E2E_KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT
kubectl version --request-timeout=10s >/dev/null 2>&1 || skip "no reachable cluster (KUBECONFIG, or TUNEOP_E2E_KIND=1)"

# --- images, and where the nodes find them
images=(operator trainer-cpu vllm-cpu)
if [ "${TUNEOP_E2E_SKIP_BUILD:-0}" != 1 ]; then
  REGISTRY=$REGISTRY TAG=$TAG bash scripts/build-images.sh "${images[@]}"
fi
load=${TUNEOP_E2E_LOAD:-}
if [ -z "$load" ]; then
  if [ "$KIND" = 1 ]; then load=kind; elif [ -n "${TUNEOP_E2E_CTR:-}" ]; then load=ctr; else load=none; fi
fi
for t in "${images[@]}"; do
  image="$REGISTRY/$t:$TAG"
  case "$load" in
    kind) kind load docker-image --name "$CLUSTER" "$image" ;;
    ctr) say "importing $image"; docker save "$image" | ${TUNEOP_E2E_CTR:?set TUNEOP_E2E_CTR} images import - >/dev/null ;;
    push) docker push "$image" ;;
    none) ;;
    *) echo "e2e: TUNEOP_E2E_LOAD=$load: kind, ctr, push or none" >&2; exit 2 ;;
  esac
done
pull=IfNotPresent
[ "$load" = push ] || pull=Never

# --- storage: hostPath PersistentVolumes for the suite's claims when nothing provisions them
if ! kubectl get storageclass -o jsonpath='{range .items[*]}{.metadata.annotations.storageclass\.kubernetes\.io/is-default-class}{"\n"}{end}' 2>/dev/null | grep -qx true; then
  root=${TUNEOP_E2E_HOSTPATH:-/var/tmp/tuneop-e2e}
  say "no default StorageClass: hostPath PersistentVolumes under $root"
  for claim in datasets adapters quickstart-data models; do
    mkdir -p "$root/$claim" && chmod 0777 "$root/$claim"
    kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: tuneop-e2e-team-a-$claim, labels: {tuneop.dev/e2e: "true"}}
spec:
  capacity: {storage: 100Gi}
  accessModes: [ReadWriteOnce, ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {namespace: team-a, name: $claim}
  hostPath: {path: $root/$claim, type: DirectoryOrCreate}
YAML
  done
  export TUNEOP_E2E_STORAGE_CLASS=""
fi

# --- the chart, into a namespace enforcing "restricted"
values=(--set "image.repository=$REGISTRY/operator" --set "image.tag=$TAG" --set "image.pullPolicy=$pull"
        --set "workloads.trainer.image=$REGISTRY/trainer-cpu:$TAG" --set "workloads.vllm.image=$REGISTRY/vllm-cpu:$TAG"
        --set operator.verbose=true)
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$NS" --overwrite pod-security.kubernetes.io/enforce=restricted
if command -v helm >/dev/null; then
  helm upgrade --install tuneop charts/tuneop -n "$NS" "${values[@]}" --wait --timeout 5m
else
  # No helm binary: the same render through helm-python-sdk (Helm v4 in a library), then apply.
  kubectl apply --server-side -f charts/tuneop/crds/
  kubectl wait --for=condition=Established --timeout=60s crd/finetunejobs.tuneop.dev crd/adapterdeployments.tuneop.dev
  "$PY" - "$NS" "$REGISTRY" "$TAG" "$pull" <<'PYEOF' | kubectl apply --server-side -f -
import sys
import helm_python as helm
ns, registry, tag, pull = sys.argv[1:5]
values = {"image": {"repository": f"{registry}/operator", "tag": tag, "pullPolicy": pull},
          "workloads": {"trainer": {"image": f"{registry}/trainer-cpu:{tag}"},
                        "vllm": {"image": f"{registry}/vllm-cpu:{tag}"}},
          "operator": {"verbose": True}}
out = helm.Chart.load("charts/tuneop").render(values, name="tuneop", namespace=ns, is_install=True)
for path, text in sorted(out.items()):
    if not path.endswith("NOTES.txt") and text.strip():
        print("---")
        print(text)
PYEOF
fi
# the images may be new under the same tag (a re-run): start the operator from the one just loaded
kubectl -n "$NS" rollout restart deploy/tuneop
kubectl -n "$NS" rollout status deploy/tuneop --timeout=180s

TUNEOP_E2E_NAMESPACE=$NS TUNEOP_E2E_TRAINER_IMAGE=$REGISTRY/trainer-cpu:$TAG \
  TUNEOP_E2E_VLLM_IMAGE=$REGISTRY/vllm-cpu:$TAG TUNEOP_E2E_PULL_POLICY=$pull \
  "$PY" -m pytest -m e2e tests/e2e -v -p no:cacheprovider "$@"
