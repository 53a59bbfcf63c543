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
# Free disk each image needs where Docker keeps its layers, measured with scripts/build-images.sh on
# tuneop/debian-base (peak while building, plus what its tests write): operator 1.1 GB peak / 0.8 GB kept,
# trainer-cpu 2.7 / 1.8, vllm-cpu 5.1 / 3.2. An image that does not fit is not built: one line says so,
# and its tests (and those that need it) are skipped; the others still run.
need_mb() { case "$1" in operator) echo 2000 ;; trainer-cpu) echo 4000 ;; vllm-cpu) echo 7000 ;; esac; }
root=$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)
free_mb() { df -P -m "$root" 2>/dev/null | awk 'NR==2 {print $4}'; }
built=()
start=$(date +%s)
for t in operator trainer-cpu vllm-cpu; do
  free=$(free_mb); need=$(need_mb "$t")
  if [ -n "$free" ] && [ "$free" -lt "$need" ]; then
    say "$t not built: ${free} MB free under $root, it needs ${need} MB (its tests are skipped)"
    continue
  fi
  say "building $t on $BASE_IMAGE (${free:-?} MB free under $root)"
  BASE_IMAGE=$BASE_IMAGE REGISTRY=$REGISTRY TAG=$TAG bash scripts/build-images.sh "$t" \
    >/tmp/tuneop-build-images-$t.log 2>&1 || {
    if grep -q "No space left on device" /tmp/tuneop-build-images-$t.log; then
      say "$t not built: the disk under $root filled up while building it (its tests are skipped)"
      docker container prune -f >/dev/null 2>&1 || true; docker image prune -f >/dev/null 2>&1 || true; continue
    fi
    tail -40 /tmp/tuneop-build-images-$t.log; say "image build failed: $t"; exit 1; }
  docker image inspect -f "test-images: $REGISTRY/$t:$TAG {{.Size}} bytes" "$REGISTRY/$t:$TAG"
  built+=("$t")
done
say "built ${built[*]:-nothing} in $(( $(date +%s) - start )) s"
[ ${#built[@]} -eq 0 ] && skip "no image fits the free disk"
TUNEOP_IMAGES_BUILT="${built[*]}" \
TUNEOP_IMAGE_TAG=$TAG TUNEOP_IMAGE_REGISTRY=$REGISTRY "$PY" -m pytest -m images tests/images -q -p no:cacheprovider
