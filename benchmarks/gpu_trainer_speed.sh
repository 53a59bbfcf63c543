#!/usr/bin/env bash
# GPU trainer speed (issue 8, part 2): plain TRL defaults vs tuneop's trainer, LoRA on a
# Llama-3.2-1B-shaped model and QLoRA on a Llama-3.1-8B-shaped model, batch 16 x 512, plus the bf16
# matmul peak measured in the same run. Sized to finish in under 8 minutes on one H100/H200.
#
#   benchmarks/gpu_trainer_speed.sh            # on the GPU machine; results under $OUT (or benchmarks/results/gpu)
#   benchmarks/gpu_trainer_speed.sh --smoke    # CPU, tiny shapes: the same code path, in a minute or two
#
# Wheels in .whl/ (transformers, trl, peft, datasets, bitsandbytes, liger-kernel, pydantic, ...) are
# installed into /tmp/site first when present (the device machine has no package index).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [[ " $* " != *" --smoke "* ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
"$PY" benchmarks/gpu_trainer_speed.py --out "$OUT" --work /tmp/gpu-trainer-speed "$@" 2>&1 | tee "$OUT/log.txt"
rc="${PIPESTATUS[0]}"
tar czf "$OUT/stderr.tgz" -C /tmp/gpu-trainer-speed $(cd /tmp/gpu-trainer-speed && ls *.stderr.txt 2>/dev/null) 2>/dev/null
exit "$rc"
