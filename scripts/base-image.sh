#!/usr/bin/env bash
# Build a Debian bookworm base image from Debian's packages alone, for machines that reach a Debian
# mirror and PyPI but no container registry (air-gapped builds):
#   scripts/base-image.sh [NAME]        default NAME: tuneop/debian-base:bookworm
# It has python3 + venv, and trusts the host's extra CA certificates (/usr/local/share/ca-certificates),
# so that pip inside an image build reaches PyPI through the same TLS proxy as the host. Then:
#   BASE_IMAGE=tuneop/debian-base:bookworm scripts/build-images.sh
# Env: DEBIAN_MIRROR (default: the first Debian mirror of this host's apt sources), DOCKER (docker).
# Needs root (debootstrap) and about 30 s.
set -euo pipefail
NAME=${1:-tuneop/debian-base:bookworm}
DOCKER=${DOCKER:-docker}
command -v debootstrap >/dev/null || { echo "base-image: debootstrap not found (apt-get install debootstrap)" >&2; exit 2; }
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # deb822 sources (URIs: ...) first, then one-line sources (deb URI suite ...)
  mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1 || true)
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm ${mirror:-the default mirror of debootstrap}"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" ${mirror:+"$mirror"} >/dev/null
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$DOCKER" import --change 'ENV LANG=C.UTF-8' - "$NAME" >/dev/null
echo "base-image: $NAME ($("$DOCKER" image inspect -f '{{.Size}}' "$NAME" | awk '{printf "%d MB", $1/1e6}'))"
