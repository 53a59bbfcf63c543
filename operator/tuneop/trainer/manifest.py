"""The adapter directory: tuneop-manifest.json, file hashes, and the atomic swap into place."""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Optional

from .events import dumps
from .paths import fsync_path, fsync_tree

MANIFEST = "tuneop-manifest.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def list_files(root: str) -> list[str]:
    """Relative paths (POSIX separators) of every regular file under root, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def file_hashes(root: str, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    return {rel: sha256_file(os.path.join(root, rel)) for rel in list_files(root) if rel not in exclude}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def build_manifest(
    base_model: str,
    method: str,
    adapter_type: str,
    files: dict[str, str],
    metrics: dict[str, Any],
    evaluation: Optional[dict[str, Any]],
    created_at: Optional[str] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    manifest = {
        "baseModel": base_model,
        "method": method,
        "adapterType": adapter_type,
        "files": dict(sorted(files.items())),
        "metrics": metrics,
        "evaluation": evaluation,
        "createdAt": created_at or utc_now(),
    }
    if extra:
        manifest.update(extra)
    return manifest


def weights_file(root: str) -> Optional[str]:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(root, name)):
            return name
    return None


def dir_size(root: str) -> int:
    return sum(os.path.getsize(os.path.join(root, rel)) for rel in list_files(root))


def make_readable(root: str) -> None:
    """Serving pods may run as another user: files 0644, directories 0755."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                os.chmod(full, 0o644)


def write_adapter_dir(
    output_dir: str,
    save: Callable[[str], None],
    manifest_fields: dict[str, Any],
    name: str = "adapter",
) -> dict[str, Any]:
    """save(tmpdir) writes the weights and tokenizer; the manifest is added, the files flushed, then the
    directory is swapped into <output>/<name> (swap_into_place), so that neither a crash nor a reader
    ever sees a half-written adapter.
    Returns the termination message's `adapter` block."""

    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, name)
    for stale in os.listdir(output_dir):  # our own leftovers from a killed run
        if stale.startswith((f".{name}-tmp-", f".{name}-old-")):
            shutil.rmtree(os.path.join(output_dir, stale), ignore_errors=True)
    tmp = os.path.join(output_dir, f".{name}-tmp-{os.getpid()}")
    os.makedirs(tmp)
    try:
        save(tmp)
        make_readable(tmp)
        files = file_hashes(tmp)
        manifest = build_manifest(files=files, **manifest_fields)
        manifest_text = json.dumps(json.loads(dumps(manifest)), indent=2, sort_keys=False) + "\n"
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            f.write(manifest_text)
            f.flush()
            os.fsync(f.fileno())
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, final)
    return describe_adapter(final)


RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE). False where the kernel, the
    C library or the filesystem (NFS, for one) cannot."""

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0


def swap_into_place(tmp: str, final: str, exchange: Callable[[str, str], bool] = _exchange) -> None:
    """Put the complete directory `tmp` at `final`. A reader of `final` sees the old complete directory,
    then the new one: swapped in one atomic step where the filesystem supports it; elsewhere `final` is
    renamed aside and `tmp` renamed into place right after (two renames: for that instant there is no
    `final`, never a partial one). The old directory is removed afterwards."""

    parent = os.path.dirname(final)
    if not os.path.lexists(final):
        os.replace(tmp, final)
        fsync_path(parent)
        return
    if exchange(tmp, final):
        old = tmp  # the exchange left the old directory at tmp's name
    else:
        old = f"{tmp}-old"
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
    fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)


def describe_adapter(final: str) -> dict[str, Any]:
    """The termination message's `adapter` block of a complete adapter directory."""
    with open(os.path.join(final, MANIFEST), "rb") as f:
        manifest_bytes = f.read()
    manifest = json.loads(manifest_bytes)
    weights = weights_file(final)
    files = manifest.get("files") or {}
    out = {
        "path": final,
        "sha256": files.get(weights) if weights else None,
        "manifestSha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "sizeBytes": dir_size(final),
    }
    for key in ("baseModel", "baseModelInfo", "trainingFingerprint"):
        if manifest.get(key) is not None:
            out[key] = manifest[key]
    return out


def base_model_info(config: dict[str, Any], text_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The base model as loaded, from its config (`config.to_dict()`) and its text config (the language
    model's own config in multimodal models; the same otherwise): what a server compares with the model it
    serves before loading the adapter."""
    text = text_config or config
    architectures = config.get("architectures") or text.get("architectures") or []
    model_type = config.get("model_type") or text.get("model_type")

    def number(*keys: str) -> Optional[int]:
        for source in (text, config):
            for key in keys:
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    return {
        "architecture": str(architectures[0]) if architectures else (str(model_type) if model_type else None),
        "modelType": str(text.get("model_type") or model_type) if (text.get("model_type") or model_type) else None,
        "hiddenSize": number("hidden_size", "n_embd", "d_model"),
        "numLayers": number("num_hidden_layers", "n_layer", "num_layers"),
        "vocabSize": number("vocab_size"),
    }


def reuse_decision(manifest: Optional[dict[str, Any]], fingerprint: str, on_disk: dict[str, str]) -> dict[str, Any]:
    """May the adapter already at <output>/adapter stand for this run? Only when its manifest names this
    training fingerprint and every file matches its sha256 (no file missing, none added).
    -> {"reuse": bool, "reason": str}."""
    if not isinstance(manifest, dict):
        return {"reuse": False, "reason": "no adapter manifest"}
    if manifest.get("trainingFingerprint") != fingerprint:
        return {"reuse": False, "reason": f"adapter trained for {manifest.get('trainingFingerprint') or 'another spec'}"}
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return {"reuse": False, "reason": "manifest lists no files"}
    if files != on_disk:
        changed = sorted(set(files) ^ set(on_disk) | {k for k in files if k in on_disk and files[k] != on_disk[k]})
        return {"reuse": False, "reason": f"files differ from the manifest: {', '.join(changed[:3])}"}
    return {"reuse": True, "reason": "adapter of this training fingerprint, files match the manifest"}


def read_manifest(adapter_dir: str) -> Optional[dict[str, Any]]:
    try:
        with open(os.path.join(adapter_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None
