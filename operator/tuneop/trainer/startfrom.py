"""spec.startFrom in the trainer: stage the starting adapter and check it before anything is trained.

The adapter (or a trainer checkpoint directory, ``checkpoint-N``: PEFT saves the adapter in it) is
copied into a private directory and the copy's weights are hashed: the sha256 the operator pinned
must match (else ConfigInvalid, nothing is loaded or written), and what is loaded is exactly what
was hashed, whatever happens to the volume meanwhile. A checkpoint directory is loaded as the
adapter: its weights only. Its optimizer state, LR schedule and step count are not resumed: the
continued run is a new training (its own data, hyperparameters and schedule).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

from .config import StartFromConfig
from .errors import CONFIG_INVALID, TrainerError
from .manifest import MANIFEST, sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FIELD = "spec.startFrom"


def staged_sha256(start: StartFromConfig, scratch: Optional[str] = None) -> tuple[str, str]:
    """Copy the adapter of `start` into a new private directory (under `scratch`) and hash the copy's
    weights: -> (that directory, sha256). TrainerError(ConfigInvalid) when the directory is not an
    adapter or its sha256 is not the pinned one (nothing is left behind then)."""
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not os.path.isfile(os.path.join(start.path, f))]
    if missing:
        raise TrainerError(CONFIG_INVALID, f"{FIELD}: {start.location} is not a LoRA adapter or checkpoint "
                           f"directory (no {', '.join(missing)})")
    staged = tempfile.mkdtemp(prefix="tuneop-start-", dir=scratch)
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(os.path.join(start.path, name), os.path.join(staged, name))
        sha = sha256_file(os.path.join(staged, WEIGHTS_FILE))
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise TrainerError(CONFIG_INVALID, f"{FIELD}: cannot read {start.location}: {e.strerror}") from None
    if start.sha256 is not None and sha != start.sha256:
        shutil.rmtree(staged, ignore_errors=True)
        raise TrainerError(CONFIG_INVALID, f"{FIELD}: {WEIGHTS_FILE} at {start.location} has sha256 {sha}, not the "
                           f"pinned {start.sha256}: the adapter changed since it was pinned; nothing was trained")
    return staged, sha


def check_base_model(start: StartFromConfig, base_name: str) -> None:
    """An adapter with a tuneop manifest says which base model it was trained on: it must be this one."""
    try:
        with open(os.path.join(start.path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return  # a checkpoint directory or a foreign adapter: PEFT's own shape checks remain
    trained_on = manifest.get("baseModel") if isinstance(manifest, dict) else None
    if isinstance(trained_on, str) and trained_on and trained_on != base_name:
        raise TrainerError(CONFIG_INVALID, f"{FIELD}: the adapter at {start.location} was trained on {trained_on!r}, "
                           f"this job's baseModel is {base_name!r}")


def check_not_output(start: StartFromConfig, output: str) -> None:
    """The new adapter goes to <output>/adapter: starting from that very directory would replace it."""
    if os.path.realpath(start.path) == os.path.realpath(os.path.join(output, "adapter")):
        raise TrainerError(CONFIG_INVALID, f"{FIELD}: {start.location} is where this job writes its own adapter "
                           "(spec.output): the new adapter would replace it; use another output path")


def differences(loaded: Any, wanted: Any) -> list[str]:
    """What of spec.adapter (r, alpha, dropout) differs from the loaded adapter's config: the loaded
    adapter keeps its own shape."""
    out = []
    for name, attr in (("r", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        have, want = getattr(loaded, attr, None), getattr(wanted, name, None)
        if have is not None and want is not None and have != want:
            out.append(f"adapter.{name} {want} (the starting adapter has {have})")
    return out


def report(start: StartFromConfig, sha256: str) -> dict[str, Any]:
    """``startedFrom`` of the start and done events (and of the adapter's manifest)."""
    return {"location": start.location, "sha256": sha256}
