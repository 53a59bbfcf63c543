#!/usr/bin/env bash
# Build tuneop's images and test them (tests/images) wherever a Docker engine is running or can be
# started here; elsewhere print one line and exit 0. `make test` runs it after the test suite.
#   - no engine running, root, Debian: installs docker.io and starts dockerd (no bridge, no iptables:
#     containers here use the host's loopback or no network at all);
#   - no registry reachable: builds the Debian base from Debian's packages (scripts/base-image.sh).
# Env: TUNEOP_IMAGES=0 skips it; BASE_IMAGE uses that base; PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TAG=${TUNEOP_IMAGE_TAG:-test}
REGISTRY=${TUNEOP_IMAGE_REGISTRY:-ghcr.io/tuneop}
say() { echo "test-images: $*"; }
skip() { say "skipped: $*"; exit 0; }
[ "${TUNEOP_IMAGES:-1}" = 0 ] && skip "TUNEOP_IMAGES=0"

start_docker() {
  docker info >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || return 1
  if ! command -v dockerd >/dev/null; then
    command -v apt-get >/dev/null || return 1
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io) >/tmp/tuneop-docker-install.log 2>&1 \
      || return 1
  fi
  if [ ! -f /etc/docker/daemon.json ]; then
    mkdir -p /etc/docker
    echo '{"bridge":"none","iptables":false,"ip6tables":false,"ip-masq":false,"ip-forward":false}' > /etc/docker/daemon.json
  fi
  (nohup dockerd >/tmp/tuneop-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}
start_docker || skip "no Docker engine could be started here (see /tmp/tuneop-dockerd.log)"

public_base=$(sed -n 's/^ARG BASE_IMAGE=//p' images/operator/Dockerfile)
if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect "$public_base" >/dev/null 2>&1 || timeout 60 docker pull -q "$public_base" >/dev/null 2>&1; then
    BASE_IMAGE=$public_base
  else
    say "no registry reachable: building a Debian base from Debian's packages"
    if ! command -v debootstrap >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 || skip "debootstrap unavailable"
    fi
    BASE_IMAGE=tuneop/debian-base:bookworm
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || bash scripts/base-image.sh "$BASE_IMAGE"
  fi
fi
say "building operator, trainer-cpu, vllm-cpu on $BASE_IMAGE"
start=$(date +%s)
BASE_IMAGE=$BASE_IMAGE REGISTRY=$REGISTRY TAG=$TAG bash scripts/build-images.sh operator trainer-cpu vllm-cpu \
  >/tmp/tuneop-build-images.log 2>&1 || { tail -40 /tmp/tuneop-build-images.log; say "image build failed"; exit 1; }
say "built in $(( $(date +%s) - start )) s"
for t in operator trainer-cpu vllm-cpu; do
  docker image inspect -f "test-images: $REGISTRY/$t:$TAG {{.Size}} bytes" "$REGISTRY/$t:$TAG"
done
TUNEOP_IMAGE_TAG=$TAG TUNEOP_IMAGE_REGISTRY=$REGISTRY "$PY" -m pytest -m images tests/images -q -p no:cacheprovider
