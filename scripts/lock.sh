#!/usr/bin/env bash
# Regenerate constraints.txt from a full environment made by `scripts/setup.sh --serving` (run it after
# changing a dependency in pyproject.toml, in a fresh .venv: rm -rf .venv && bash scripts/setup.sh --serving).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
{
  echo "# Every Python package of a full tuneop environment (scripts/setup.sh --serving), pinned: the README's"
  echo "# setup and every image install with -c constraints.txt, so an image rebuilt later gets the same versions."
  echo "# torch is pinned where it is installed (a CPU or a CUDA build of 2.13.0). Regenerate: scripts/lock.sh"
  "$PY" -m pip freeze --exclude-editable | grep -vE '^(torch|tuneop)==|^#|^-e ' | sort -f
} > constraints.txt
echo "lock: $(grep -vc '^#' constraints.txt) packages in constraints.txt"
