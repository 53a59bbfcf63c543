"""The adapter directory: tuneop-manifest.json, file hashes, and the atomic swap into place."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Optional

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
    for dirpath, dirnames, filenames in os.walk(root):
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
    """save(tmpdir) writes the weights and tokenizer; the manifest is added, then the directory is
    renamed to <output>/<name> so that a crash never leaves a half-written adapter behind.
    Returns the termination message's `adapter` block."""
    from .events import dumps

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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(final):
        old = os.path.join(output_dir, f".{name}-old-{os.getpid()}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    weights = weights_file(final)
    return {
        "path": final,
        "sha256": files.get(weights) if weights else None,
        "manifestSha256": hashlib.sha256(manifest_text.encode()).hexdigest(),
        "sizeBytes": dir_size(final),
    }
