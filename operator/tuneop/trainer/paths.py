"""Where things are: model sources (HF id, directory, .gguf, pkg://), URL downloads, checkpoints."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

from .. import s3
from ..files import atomic_file
from .errors import CONFIG_INVALID, DATASET_INVALID, TrainerError
from .events import atomic_write_text

PKG_SCHEME = "pkg://"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class ModelSource:
    """How to load the base model: `from_pretrained(location, gguf_file=gguf_file)`."""

    location: str  # HF id or directory
    gguf_file: Optional[str] = None
    original: str = ""

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.location)


def is_url(path: Optional[str]) -> bool:
    """An http(s):// or s3:// dataset location (downloaded by the trainer and the validator)."""
    if not path:
        return False
    return path.split("://", 1)[0].lower() in ("http", "https", "s3") and "://" in path


def resolve_pkg(ref: str) -> str:
    """pkg://<package>/<file> -> absolute path of that file inside the installed package."""
    rest = ref[len(PKG_SCHEME):]
    package, _, relative = rest.partition("/")
    if not package or not relative:
        raise TrainerError(CONFIG_INVALID, f"{ref!r}: expected pkg://<package>/<file>")
    parts = [p for p in relative.split("/") if p]
    if any(p in ("..", ".") for p in parts) or relative.startswith("/"):
        raise TrainerError(CONFIG_INVALID, f"{ref!r}: the file must be inside the package")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TrainerError(CONFIG_INVALID, f"{ref!r}: Python package {package!r} is not installed")
    for base in spec.submodule_search_locations:
        candidate = os.path.join(base, *parts)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise TrainerError(CONFIG_INVALID, f"{ref!r}: no file {relative!r} in package {package!r}")


def resolve_model(model: str) -> ModelSource:
    """paths.model -> ModelSource. Local paths must exist; anything else is taken as a hub id."""
    path = resolve_pkg(model) if model.startswith(PKG_SCHEME) else model
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise TrainerError(CONFIG_INVALID, f"base model file {model} does not exist")
        return ModelSource(
            location=os.path.dirname(os.path.abspath(path)),
            gguf_file=os.path.basename(path),
            original=model,
        )
    if os.path.isdir(path):
        return ModelSource(location=os.path.abspath(path), original=model)
    if path.startswith(("/", "./", "../")):
        raise TrainerError(CONFIG_INVALID, f"base model directory {model} does not exist")
    return ModelSource(location=path, original=model)


def base_model_name(spec_base_model: str, source: ModelSource) -> str:
    """What adapter_config.json's base_model_name_or_path says: the user's own baseModel string
    (a hub id vLLM can match, or the path/GGUF file the adapter was trained on)."""
    return spec_base_model or source.original or source.location


# ---------------------------------------------------------------- URLs

def url_filename(url: str) -> str:
    """A safe, stable local file name for a URL: <hash>-<basename>."""
    parsed = urllib.parse.urlparse(url)
    base = os.path.basename(parsed.path) or "data.jsonl"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:80].lstrip(".") or "data.jsonl"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{digest}-{base}"


def redact_url(url: str) -> str:
    """Drop query strings and credentials (signed URLs carry secrets) before printing a URL."""
    p = urllib.parse.urlparse(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urllib.parse.urlunparse((p.scheme, host, p.path, "", "", ""))


def download(url: str, dest_dir: str, timeout: float = 60.0) -> str:
    """Download url into dest_dir (once; reused when present); returns the local path.
    Falls back to a temporary directory when dest_dir cannot be created (read-only output)."""
    try:
        os.makedirs(dest_dir, exist_ok=True)
    except OSError:
        dest_dir = os.path.join(tempfile.gettempdir(), "tuneop-data")
        os.makedirs(dest_dir, exist_ok=True)
    target = os.path.join(dest_dir, url_filename(url))
    if os.path.isfile(target):
        return target
    if s3.is_s3(url):
        return download_s3(url, target)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "tuneop-trainer"})
        with urllib.request.urlopen(request, timeout=timeout) as response, atomic_file(target) as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (OSError, ValueError) as e:
        code = getattr(e, "code", None)
        reason = getattr(e, "reason", None) or e
        if code is not None:
            reason = f"HTTP {code} {reason}"
        raise TrainerError(DATASET_INVALID, f"cannot download {redact_url(url)}: {reason}") from None
    print(f"tuneop: downloaded {redact_url(url)}", file=sys.stderr)
    return target


def download_s3(uri: str, target: str) -> str:
    """An s3:// dataset -> target (through a temporary file: never a partial target). Settings from the
    environment (tuneop.s3: AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, ...)."""
    try:
        s3.Client().get_file(uri, target)
    except s3.S3Error as e:  # a missing bucket/key or bad credentials: not retried; no answer, 5xx: retried
        raise TrainerError(DATASET_INVALID, f"cannot download {e}", user_error=e.client_error) from None
    print(f"tuneop: downloaded {uri}", file=sys.stderr)
    return target


def local_data_path(path: Optional[str], output_dir: str) -> Optional[str]:
    """A dataset path or URL -> a local file path (URLs are downloaded to <output>/.data/)."""
    if path is None:
        return None
    if is_url(path):
        return download(path, os.path.join(output_dir, ".data"))
    return path


# ---------------------------------------------------------------- checkpoints

def checkpoint_step(name: str) -> Optional[int]:
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


CHECKPOINT_MARKER = "tuneop-checkpoint.json"  # written once Trainer has saved a checkpoint: it is complete
KEEP_CHECKPOINTS = 2  # complete checkpoints kept per fingerprint (the newest is the resume point)


def read_marker(checkpoint: str) -> Optional[dict]:
    """The commit marker of a checkpoint directory, or None (absent, unreadable, not a JSON object)."""
    try:
        with open(os.path.join(checkpoint, CHECKPOINT_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def marker_valid(name: str, marker: Optional[dict], fingerprint: str) -> bool:
    """A checkpoint counts when its marker names this fingerprint and its own step."""
    step = checkpoint_step(name)
    return (
        step is not None and isinstance(marker, dict)
        and marker.get("fingerprint") == fingerprint and marker.get("step") == step
    )


def plan_checkpoints(fingerprint: str, listing: dict, keep: int = KEEP_CHECKPOINTS) -> dict:
    """What to do with `<output>/checkpoints/` for a run of `fingerprint`.

    listing: {"top": [names in checkpoints/], "own": {name: marker or None} for the checkpoint-N
    directories of checkpoints/<fingerprint>/}. Returns (names relative to checkpoints/):
    - resume: the newest own checkpoint whose marker is valid (None: train from the start);
    - incomplete: own checkpoints without a valid marker (a save killed before its marker): removed at once;
    - rotate: complete own checkpoints older than the newest `keep`: removed once a newer one is complete;
    - stale: everything else in checkpoints/ (other fingerprints, legacy checkpoint-N of older trainers):
      removed only once this run's adapter is written."""
    own = listing.get("own") or {}
    complete = sorted(
        (checkpoint_step(name), name) for name, marker in own.items() if marker_valid(name, marker, fingerprint)
    )
    complete_names = {name for _, name in complete}
    newest_first = [name for _, name in reversed(complete)]
    return {
        "resume": f"{fingerprint}/{newest_first[0]}" if newest_first else None,
        "incomplete": sorted(f"{fingerprint}/{name}" for name in own if name not in complete_names),
        "rotate": [f"{fingerprint}/{name}" for name in newest_first[max(1, keep):]],
        "stale": sorted(name for name in listing.get("top") or [] if name != fingerprint),
    }


def list_checkpoints(checkpoints_dir: str, fingerprint: str) -> dict:
    """The listing plan_checkpoints reads, from the disk."""
    top = sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []
    own_dir = os.path.join(checkpoints_dir, fingerprint)
    own = {}
    if os.path.isdir(own_dir):
        for name in os.listdir(own_dir):
            path = os.path.join(own_dir, name)
            if checkpoint_step(name) is not None and os.path.isdir(path):
                own[name] = read_marker(path)
    return {"top": top, "own": own}


def remove_checkpoints(checkpoints_dir: str, names: list) -> None:
    for name in names:
        path = safe_join(checkpoints_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            try:
                os.unlink(path)
            except OSError:
                pass


def fsync_tree(root: str) -> None:
    """Flush a directory's files (and the directories) to stable storage before it is declared complete."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def fsync_path(path: str) -> None:
    """fsync a file or directory; one that cannot be opened or synced is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_marker(checkpoint: str, fingerprint: str, step: int, extra: Optional[dict] = None) -> None:
    """Declare a saved checkpoint complete: its files are flushed, then the marker is written through a
    temporary file and os.replace (a reader sees no marker or the whole one)."""

    fsync_tree(checkpoint)
    marker = {"fingerprint": fingerprint, "step": int(step), **(extra or {})}
    atomic_write_text(os.path.join(checkpoint, CHECKPOINT_MARKER), json.dumps(marker, sort_keys=True) + "\n")
    fsync_path(checkpoint)


def safe_join(root: str, relative: str) -> str:
    """root/relative, refusing anything that escapes root."""
    root_abs = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root_abs, relative))
    if path != root_abs and not path.startswith(root_abs + os.sep):
        raise ValueError(f"{relative!r} escapes {root!r}")
    return path
