"""`tuneop export-model`: a base model as the trainer loads it, saved as a plain Hugging Face directory.

vLLM serves a directory of safetensors; the quickstart's base model ships as a quantised GGUF inside a
Python package (pkg://...). This loads it with the trainer's own loader (dequantised, as training sees
it) and writes config, weights and tokenizer, readable by any uid (a model volume is read by the vLLM
pods' uid 10001). The directory appears whole: written aside, then renamed into place.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..api.finetunejob import AdapterType
from . import model as M
from .errors import CONFIG_INVALID, TrainerError
from .manifest import make_readable
from .paths import resolve_model


def export_model(model: str, dest: Path, *, dtype: str = "float32") -> dict[str, Any]:
    """Load `model` (what baseModel may name) and save it to `dest` (must not exist yet, or be empty)."""

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise TrainerError(CONFIG_INVALID, f"{dest} exists and is not empty")
    source = resolve_model(model)
    M.quiet_libraries()
    tokenizer = M.load_tokenizer(source)
    loaded = M.load_model(source, dtype, AdapterType.lora, "fp32" if dtype == "float32" else "bf16")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    loaded.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    make_readable(str(tmp))
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)
    archs = getattr(loaded.config, "architectures", None) or [loaded.config.model_type]
    return {"architecture": archs[0], "parameters": int(loaded.num_parameters())}
