#!/usr/bin/env bash
# Build tuneop's container images (all run as uid 10001):
#   scripts/build-images.sh                  operator, trainer-cpu, vllm-cpu
#   scripts/build-images.sh operator trainer one or more of: operator, trainer (CUDA), trainer-cpu, vllm-cpu
# Env: REGISTRY (ghcr.io/tuneop), TAG (the version in pyproject.toml), PUSH=1 to push, DOCKER (docker;
#      podman works too), BASE_IMAGE (the FROM of every image but the CUDA trainer; where no registry is
#      reachable: scripts/base-image.sh makes one from Debian's packages), CUDA_BASE_IMAGE (the CUDA
#      trainer's), WHEELS (a directory holding torch-2.13.0+cpu*.whl: used instead of the PyTorch index;
#      default /opt/wheels when it has one), BUILD_NETWORK (host: the network of the RUN steps).
# Every Python package is pinned by constraints.txt, torch in the Dockerfiles: a rebuild gets the same
# versions.
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${REGISTRY:-ghcr.io/tuneop}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
DOCKER=${DOCKER:-docker}
WHEELS=${WHEELS:-/opt/wheels}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(operator trainer-cpu vllm-cpu)

# The CPU torch wheel, when this machine has one, travels in the build context.
rm -rf .build/wheels && mkdir -p .build/wheels
cpu_torch=()
if compgen -G "$WHEELS/torch-2.13.0+cpu*.whl" >/dev/null; then
  cp "$WHEELS"/torch-2.13.0+cpu*.whl .build/wheels/
  cpu_torch=(--build-arg TORCH_INDEX=)
fi
for t in "${targets[@]}"; do
  args=(--network "${BUILD_NETWORK:-host}")
  case "$t" in
    operator) [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE") ;;
    trainer-cpu|vllm-cpu)
      [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
      args+=("${cpu_torch[@]}") ;;
    trainer) [ -n "${CUDA_BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$CUDA_BASE_IMAGE") ;;
    *) echo "build-images: unknown image $t (operator, trainer, trainer-cpu, vllm-cpu)" >&2; exit 2 ;;
  esac
  image="$REGISTRY/$t:$TAG"
  echo "build-images: $image"
  "$DOCKER" build --force-rm "${args[@]}" -f "images/$t/Dockerfile" -t "$image" .
  if [ "${PUSH:-0}" = 1 ]; then "$DOCKER" push "$image"; fi
done
