"""In-process guard of vLLM's runtime LoRA admin API: ``--middleware tuneop_vllm_guard.AdminGuard``.

vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` serves ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` on the inference port and checks nothing: any client of the Service
could unload a tenant's adapter or load any path in the pod. This ASGI middleware runs inside the
vLLM API server (no extra hop, no second image) and lets only the operator through:

- **Credential.** An admin call must carry ``X-Tuneop-Admin-Token: <token>``, where the token is
  the content of ``$TUNEOP_ADMIN_TOKEN_FILE`` (a Secret the operator generates per
  AdapterDeployment, mounted as a volume). The file is read on every admin call, so a rotated
  Secret takes effect when the kubelet refreshes the volume, without a restart. No header: 401;
  wrong token, or no token file in the pod (fail closed): 403.
- **Names and paths.** ``lora_name`` must be a DNS label (ASCII ``[a-z0-9-]``, at most 63).
  ``lora_path`` must be an absolute, normalised, printable-ASCII path under one of
  ``$TUNEOP_ADAPTER_ROOTS`` (``:``-separated; the pod's PVC mounts and the URL-adapter directory),
  still under it after resolving symlinks, and no file or directory inside the adapter may be a
  symlink that leads out of the roots. Refused with 400 before vLLM sees the request.
- **Integrity, on what vLLM reads.** The adapter is copied into a private directory of the pod
  (``$TUNEOP_VERIFIED_DIR``, ``/tmp/tuneop-verified`` in the pods; else a private temp dir) and
  the copy is verified: ``tuneop-manifest.json`` must list every file of the adapter directory (a
  file it does not list is refused) and each copied file must match its sha256; when the request
  carries ``tuneop_sha256`` (the operator sends the expected sha256 of the weights file), the
  copied weights must match it. vLLM loads the copy, so nobody who can write the volume (a training
  pod) can swap a file between the check and the load. An adapter without a manifest is refused
  (``unverified``) unless the request carries ``tuneop_allow_unverified: true`` (the adapter's
  ``allowUnverified``). Mismatch: 400. ``/v1/models`` reports each adapter's ``root`` as the path
  the operator asked for; a copy is removed when its adapter is unloaded or replaced.
- **Base model.** The adapter's recorded base model (``baseModel`` and ``baseModelInfo`` of
  ``tuneop-manifest.json``, else ``base_model_name_or_path`` of ``adapter_config.json``) must be the
  served one (``$TUNEOP_BASE_MODEL``, the AdapterDeployment's ``baseModel``, or vLLM's ``--model``;
  its shape from vLLM's ``app.state.vllm_config.model_config``, else the model directory's
  ``config.json``): see :func:`check_base_model`. Mismatch, or a different name with no recorded
  shape to compare: 409 ``base_model_mismatch``, unless the request carries
  ``tuneop_allow_base_model_mismatch: true`` (the adapter's ``allowBaseModelMismatch``).
- **Allow-list.** Only the routes of ``ALLOWED_ROUTES`` (completions, chat completions, embeddings,
  ``/v1/models``, ``/health``, ``/metrics``, ``/version``), with their methods, pass untouched; every
  other route vLLM registers (and any a newer vLLM adds) is refused with 403 ``blocked_route``, a
  wrong method with 405, a WebSocket with close code 1008. ``GET /tuneop/routes`` (admin token)
  lists the app's routes with the policy of each. A request to an allowed route that carries a
  *valid* admin token (the operator listing ``/v1/models``) gets vLLM's own API key put into its
  ``Authorization`` header, so the operator never needs the users' serving key; the admin header
  itself is never passed on to vLLM.

Refusals are counted in ``tuneop_vllm_admin_refused_total{reason}`` (prometheus_client, served by
vLLM's ``/metrics``) and logged with the reason and peer address, never the token.

This file is shipped into the pods as a ConfigMap (the operator renders its source), so it imports
only the standard library (prometheus_client when present). The pure checks are
:func:`check_name`, :func:`check_path`, :func:`copy_verified` and :func:`check_base_model` (which
the operator also uses before it asks a pod at all).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from typing import Any, Awaitable, Callable, Optional, Sequence

TOKEN_FILE_ENV = "TUNEOP_ADMIN_TOKEN_FILE"
ROOTS_ENV = "TUNEOP_ADAPTER_ROOTS"
BASE_MODEL_ENV = "TUNEOP_BASE_MODEL"  # the AdapterDeployment's spec.baseModel, as the user wrote it
DEFAULT_TOKEN_FILE = "/etc/tuneop/admin/token"
DEFAULT_ROOTS = "/mnt/pvc:/adapters"
HEADER = "x-tuneop-admin-token"
SHA_FIELD = "tuneop_sha256"
ALLOW_BASE_FIELD = "tuneop_allow_base_model_mismatch"
ALLOW_UNVERIFIED_FIELD = "tuneop_allow_unverified"
VERIFIED_DIR_ENV = "TUNEOP_VERIFIED_DIR"  # where the verified copies go (default: a private temp dir)
ADMIN_PATHS = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}
# Deny by default: the only routes any client reaches (vLLM's own API key, when set, still applies),
# with their methods. Everything else vLLM registers is refused with 403 and counted (reason
# blocked_route): its state-changing routes that its --api-key does not cover (/sleep, /wake_up,
# /reset_prefix_cache, /collective_rpc, /pause, /start_profile, /scale_elastic_ep, the SageMaker-style
# /adapters that load adapters, ...), the routes that skip the API key (/invocations, /pooling,
# /score, /rerank, /tokenize, ...), and any route a newer vLLM adds, until it is allowed here on
# purpose. Embeddings are listed for models that serve them (vLLM registers the route only then).
ALLOWED_ROUTES: dict[str, frozenset[str]] = {
    "/v1/completions": frozenset({"POST"}),
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/embeddings": frozenset({"POST"}),
    "/v1/models": frozenset({"GET", "HEAD"}),
    "/health": frozenset({"GET", "HEAD"}),
    "/metrics": frozenset({"GET", "HEAD"}),
    "/version": frozenset({"GET", "HEAD"}),
}
# GET with the admin token: every route the vLLM app registers, with the guard's policy for it
# (what tests/process check against the real server; what an operator checks after an upgrade).
ROUTES_PATH = "/tuneop/routes"
MANIFEST = "tuneop-manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_BODY = 64 * 1024
MAX_PATH = 1024
MAX_FILES = 10_000
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
_SHA = re.compile(r"[0-9a-f]{64}", re.ASCII)
_FIELDS = {"load": {"lora_name", "lora_path", "load_inplace", SHA_FIELD, ALLOW_BASE_FIELD, ALLOW_UNVERIFIED_FIELD},
           "unload": {"lora_name", "lora_int_id"}}

log = logging.getLogger("tuneop.guard")

# Reasons (the metric's label values)
MISSING_CREDENTIAL = "missing_credential"
BAD_CREDENTIAL = "bad_credential"
NO_CREDENTIAL_CONFIGURED = "no_credential_configured"
BAD_METHOD = "bad_method"
BAD_REQUEST = "bad_request"
BAD_NAME = "bad_name"
BAD_PATH = "bad_path"
OUTSIDE_ROOT = "outside_root"
SYMLINK_OUT = "symlink_outside_root"
NOT_FOUND = "not_found"
INTEGRITY = "sha256_mismatch"
BLOCKED_ROUTE = "blocked_route"
BASE_MISMATCH = "base_model_mismatch"
UNVERIFIED = "unverified"
COPY_FAILED = "copy_failed"


class Refused(Exception):
    def __init__(self, reason: str, message: str, status: int = 400):
        super().__init__(message)
        self.reason = reason
        self.status = status


# ------------------------------------------------------------------------------ pure checks


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Refused(BAD_NAME, f"lora_name {name!r} is not a valid adapter name "
                                "(lowercase ASCII letters, digits and '-', at most 63)")
    return name


def parse_roots(raw: Optional[str]) -> list[str]:
    return [r.rstrip("/") or "/" for r in (raw if raw is not None else DEFAULT_ROOTS).split(":") if r]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_path(path: Any, roots: Sequence[str]) -> str:
    """The adapter directory, normalised, if it may be loaded; else :class:`Refused`."""
    if not isinstance(path, str) or not path:
        raise Refused(BAD_PATH, "lora_path must be a non-empty string")
    if len(path) > MAX_PATH:
        raise Refused(BAD_PATH, f"lora_path is longer than {MAX_PATH} characters")
    if not all(0x20 < ord(c) < 0x7F for c in path):
        raise Refused(BAD_PATH, f"lora_path {path!r} has characters other than printable ASCII")
    if not path.startswith("/"):
        raise Refused(BAD_PATH, f"lora_path {path!r} is not absolute")
    parts = path.rstrip("/").split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise Refused(BAD_PATH, f"lora_path {path!r} is not normalised ('.', '..' or '//')")
    norm = posixpath.normpath(path)
    if not any(_within(norm, r) and norm != r for r in roots):
        raise Refused(OUTSIDE_ROOT, f"lora_path {path!r} is outside the adapter roots {':'.join(roots)}")
    real_roots = [os.path.realpath(r) for r in roots]
    real = os.path.realpath(norm)
    if not any(_within(real, r) for r in real_roots):
        raise Refused(SYMLINK_OUT, f"lora_path {path!r} leads out of the adapter roots through a symlink")
    if not os.path.isdir(real):
        raise Refused(NOT_FOUND, f"lora_path {path!r} is not a directory in this pod", 404)
    n = 0
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        for entry in dirnames + filenames:
            n += 1
            if n > MAX_FILES:
                raise Refused(BAD_PATH, f"lora_path {path!r} holds more than {MAX_FILES} files")
            full = os.path.join(dirpath, entry)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not any(_within(target, r) for r in real_roots):
                    rel = os.path.relpath(full, real)
                    raise Refused(SYMLINK_OUT, f"{rel} in lora_path {path!r} is a symlink leading out of the "
                                               "adapter roots")
    return norm


def _listing(src: str, roots: Sequence[str]) -> dict[str, str]:
    """Every file under the adapter directory ``src``: relative POSIX name -> the path to read.
    A symlinked file must lead to a file under the roots; a symlinked directory is refused."""
    real_roots = [os.path.realpath(r) for r in roots]
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                rel = os.path.relpath(os.path.join(dirpath, d), src)
                raise Refused(BAD_PATH, f"{rel} in {src} is a symlinked directory; adapters are plain files")
        for f in filenames:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, src).replace(os.sep, "/")
            if len(out) >= MAX_FILES:
                raise Refused(BAD_PATH, f"{src} holds more than {MAX_FILES} files")
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not any(_within(target, r) for r in real_roots) or not os.path.isfile(target):
                    raise Refused(SYMLINK_OUT, f"{rel} in {src} is a symlink that does not lead to a file under the "
                                               "adapter roots")
                out[rel] = target
            elif os.path.isfile(full):
                out[rel] = full
            else:
                raise Refused(BAD_PATH, f"{rel} in {src} is not a regular file")
    return out


def _copy_hashing(src: str, dst: str) -> str:
    """Copies one file, returning the sha256 of the bytes written (what vLLM will read)."""
    h = hashlib.sha256()
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(src, flags)
    os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
    with os.fdopen(fd, "rb") as fin, open(dst, "xb") as fout:
        for block in iter(lambda: fin.read(1 << 20), b""):
            h.update(block)
            fout.write(block)
    os.chmod(dst, 0o400)
    return h.hexdigest()


def copy_verified(adapter_dir: str, dest: str, roots: Sequence[str], expected_weights_sha256: Optional[str] = None,
                  allow_unverified: bool = False) -> dict[str, str]:
    """Copies the adapter into ``dest`` (an empty private directory: the copy vLLM loads, so that
    nobody who can write the volume can swap a file between the check and the load) and verifies
    the copy: ``tuneop-manifest.json`` must list every file of the adapter and each copied file
    must match its sha256; the weights file must match ``expected_weights_sha256`` when given.
    Without a manifest the adapter is refused (reason ``unverified``) unless ``allow_unverified``
    (the AdapterDeployment's ``allowUnverified`` for that adapter): then it is copied as found.
    Returns ``{file: sha256}`` of the copy."""
    if expected_weights_sha256 is not None and not _SHA.fullmatch(str(expected_weights_sha256)):
        raise Refused(BAD_REQUEST, f"{SHA_FIELD} must be 64 lowercase hex digits")
    found = _listing(adapter_dir, roots)
    manifest_raw: Optional[bytes] = None
    if MANIFEST in found:
        try:
            with open(found.pop(MANIFEST), "rb") as f:
                manifest_raw = f.read(MAX_BODY * 16 + 1)
            if len(manifest_raw) > MAX_BODY * 16:
                raise ValueError("too large")
            listed = json.loads(manifest_raw).get("files")
        except (OSError, ValueError, AttributeError) as e:
            raise Refused(INTEGRITY, f"{MANIFEST} in {adapter_dir} is unreadable: {e}") from None
        if not isinstance(listed, dict) or not listed:
            raise Refused(INTEGRITY, f"{MANIFEST} in {adapter_dir} has no file list")
        want: dict[str, str] = {}
        for rel, sha in listed.items():
            rel_norm = posixpath.normpath(str(rel))
            if rel_norm.startswith(("/", "..")) or rel_norm in (".", MANIFEST):
                raise Refused(INTEGRITY, f"{MANIFEST} in {adapter_dir} lists {rel!r}, outside the adapter")
            if rel_norm not in found:
                raise Refused(INTEGRITY, f"{rel} is listed in {MANIFEST} but missing from {adapter_dir}")
            want[rel_norm] = str(sha)
        unlisted = sorted(set(found) - set(want))
        if unlisted:
            raise Refused(INTEGRITY, f"{', '.join(unlisted[:5])} in {adapter_dir} not listed in {MANIFEST}: "
                                     "the manifest must cover every file of the adapter")
    elif not allow_unverified:
        raise Refused(UNVERIFIED, f"{adapter_dir} has no {MANIFEST}, so tuneop cannot verify what vLLM would load; "
                                  "set allowUnverified: true on the adapter to serve it anyway")
    else:
        want = {}
    got: dict[str, str] = {}
    try:
        for rel, src in sorted(found.items()):
            got[rel] = _copy_hashing(src, os.path.join(dest, *rel.split("/")))
            if rel in want and not hmac.compare_digest(got[rel], want[rel]):
                raise Refused(INTEGRITY, f"{rel} in {adapter_dir}: sha256 {got[rel][:12]}… does not match the "
                                         f"manifest's {want[rel][:12]}…")
        if manifest_raw is not None:
            with open(os.path.join(dest, MANIFEST), "xb") as f:
                f.write(manifest_raw)
    except OSError as e:
        raise Refused(COPY_FAILED, f"copying {adapter_dir} into the pod's verified adapters failed: "
                                   f"{e.strerror or e}", 507) from None
    if expected_weights_sha256:
        weights = next((w for w in WEIGHT_FILES if w in got), None)
        if weights is None:
            raise Refused(INTEGRITY, f"{adapter_dir} has no weights file ({', '.join(WEIGHT_FILES)})")
        if not hmac.compare_digest(got[weights], expected_weights_sha256):
            raise Refused(INTEGRITY, f"{weights} in {adapter_dir}: sha256 {got[weights][:12]}… is not the expected "
                                     f"{expected_weights_sha256[:12]}…")
    return got


# ------------------------------------------------------------------------------ base model

# Compared when the names differ: the adapter is shape-compatible only when all are known on both
# sides and equal (modelType too when both record it). Not the vocabulary size: LoRA on the
# attention/MLP projections does not depend on it, and added tokens change it between variants.
SHAPE_FIELDS = ("architecture", "hiddenSize", "numLayers")
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", re.ASCII)


def normalise_model_name(name: Any) -> Optional[str]:
    """The comparable form of a base model name, None when there is none. Conservative: only
    whitespace and trailing '/' go, and a Hugging Face id (``owner/name``) is compared
    case-insensitively (the Hub resolves ids so). Paths, ``pkg://`` and other URLs stay as written,
    and no prefix or suffix (``.gguf``, a quantisation such as ``.Q4_1``) is dropped: a
    ``pkg://…/SmolLM2-135M-Instruct.Q4_1.gguf`` and ``HuggingFaceTB/SmolLM2-135M-Instruct`` are
    different names, so the recorded shapes decide between them."""
    if not isinstance(name, str):
        return None
    n = name.strip().rstrip("/")
    if not n:
        return None
    return n.lower() if _HF_ID.fullmatch(n) else n


def model_info(config: Any, text_config: Any = None) -> dict[str, Any]:
    """The shape of a model from its config.json (and its text model's config, in multimodal
    models), as the trainer records it in ``baseModelInfo``, plus ``architectures`` (all of them)."""
    config = config if isinstance(config, dict) else {}
    text = text_config if isinstance(text_config, dict) else (config.get("text_config") or config)
    text = text if isinstance(text, dict) else config
    archs = [str(a) for a in (config.get("architectures") or text.get("architectures") or []) if a]
    model_type = text.get("model_type") or config.get("model_type")

    def number(*keys: str) -> Optional[int]:
        for source in (text, config):
            for key in keys:
                v = source.get(key)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None

    return {"architecture": archs[0] if archs else (str(model_type) if model_type else None),
            "architectures": archs, "modelType": str(model_type) if model_type else None,
            "hiddenSize": number("hidden_size", "n_embd", "d_model"),
            "numLayers": number("num_hidden_layers", "n_layer", "num_layers")}


def _shape_diffs(adapter: dict[str, Any], served: dict[str, Any]) -> list[str]:
    """The fields known on both sides that differ, as 'field adapter-value ≠ served-value'."""
    out = []
    a_arch, s_type = adapter.get("architecture"), served.get("modelType")
    s_archs = list(served.get("architectures") or []) or [served.get("architecture")]
    s_archs = [a for a in s_archs if a]
    if a_arch and (s_archs or s_type):
        # The trainer records model_type as the architecture when a config has none (GGUF).
        same = a_arch in s_archs or (s_type and str(a_arch).lower() == str(s_type).lower())
        if not same:
            out.append(f"architecture {a_arch} ≠ {s_archs[0] if s_archs else s_type}")
    a_type = adapter.get("modelType")
    if a_type and s_type and str(a_type).lower() != str(s_type).lower():
        out.append(f"modelType {a_type} ≠ {s_type}")
    for f in ("hiddenSize", "numLayers"):
        if adapter.get(f) is not None and served.get(f) is not None and adapter[f] != served[f]:
            out.append(f"{f} {adapter[f]} ≠ {served[f]}")
    return out


def _describe(name: Optional[str], info: dict[str, Any]) -> str:
    shape = ", ".join(str(x) for x in (info.get("architecture") or (info.get("architectures") or [None])[0],
                                       *(f"{f} {info[f]}" for f in ("hiddenSize", "numLayers")
                                         if info.get(f) is not None)) if x)
    return f"{name or '(unnamed)'!r}" + (f" ({shape})" if shape else "")


def check_base_model(adapter: dict[str, Any], served: dict[str, Any]) -> Optional[str]:
    """May an adapter trained on ``adapter`` be served on ``served``? None: yes; else why not.

    adapter: ``{"name": the recorded base model, "info": baseModelInfo or None}``; served:
    ``{"names": [names of the served model], "info": model_info() or None}``.

    - Same name (:func:`normalise_model_name`): compatible, unless a shape field recorded on both
      sides differs (one name can stand for two models: a path on two volumes, an id re-uploaded).
    - Different names: compatible only when the architecture, hidden size and layer count are
      recorded on both sides and equal; refused when one differs, or when either side does not
      record them ("cannot tell": an adapter from an older trainer or another tool).
    """
    a_info = dict(adapter.get("info") or {})
    s_info = dict(served.get("info") or {})
    names = [n for n in served.get("names") or [] if n]
    served_norm = {normalise_model_name(n) for n in names} - {None}
    a_name = adapter.get("name")
    what = f"adapter trained on {_describe(a_name, a_info)}, served model {_describe(names[0] if names else None, s_info)}"
    diffs = _shape_diffs(a_info, s_info)
    if diffs:
        return f"{what}: {'; '.join(diffs)}"
    if normalise_model_name(a_name) in served_norm:
        return None
    if normalise_model_name(a_name) is None:
        return f"{what}: the adapter records no base model, so tuneop cannot tell whether it fits"
    missing = [f for f in SHAPE_FIELDS if a_info.get(f) is None]
    if missing:
        return (f"{what}: different base model names and the adapter records no {', '.join(missing)} "
                "(baseModelInfo) to compare")
    missing = [f for f in SHAPE_FIELDS if s_info.get(f) is None]
    if missing:
        return f"{what}: different base model names and the served model's {', '.join(missing)} is unknown"
    return None


def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def adapter_base(adapter_dir: str) -> Optional[dict[str, Any]]:
    """What the adapter records of its base model (``check_base_model``'s ``adapter``): the
    manifest's ``baseModel``/``baseModelInfo``, else adapter_config.json's
    ``base_model_name_or_path``. None: neither file is there (not an adapter: vLLM says so)."""
    manifest = _read_json(os.path.join(adapter_dir, MANIFEST))
    config = _read_json(os.path.join(adapter_dir, ADAPTER_CONFIG))
    if manifest is None and config is None:
        return None
    name = (manifest or {}).get("baseModel")
    if not isinstance(name, str) or not name.strip():
        name = (config or {}).get("base_model_name_or_path")
    info = (manifest or {}).get("baseModelInfo")
    return {"name": name if isinstance(name, str) else None, "info": info if isinstance(info, dict) else None}


def served_model(state: Any, base_model: Optional[str] = None) -> dict[str, Any]:
    """The served model (``check_base_model``'s ``served``) from vLLM's ``app.state``:
    names = [$TUNEOP_BASE_MODEL, vLLM's --model]; shape from ``vllm_config.model_config``'s HF
    configs, else from ``config.json`` when --model is a directory."""
    mc = getattr(getattr(state, "vllm_config", None), "model_config", None)
    model = getattr(mc, "model", None) or getattr(getattr(state, "args", None), "model", None)
    names = [n for n in (base_model, model) if isinstance(n, str) and n]
    info = None
    hf = getattr(mc, "hf_config", None)
    if hf is not None and hasattr(hf, "to_dict"):
        try:
            text = getattr(mc, "hf_text_config", None)
            info = model_info(hf.to_dict(), text.to_dict() if text is not None and hasattr(text, "to_dict") else None)
        except Exception:  # noqa: BLE001  (a config that does not serialise: try config.json)
            info = None
    if info is None:
        for n in names:
            cfg = _read_json(os.path.join(n, "config.json")) if os.path.isabs(n) else None
            if cfg is not None:
                info = model_info(cfg)
                break
    return {"names": names, "info": info}


def check_request(op: str, body: bytes, roots: Sequence[str]) -> tuple[dict[str, Any], Optional[str]]:
    """The admin request's JSON body -> (body to forward to vLLM, adapter dir to verify or None)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise Refused(BAD_REQUEST, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(BAD_REQUEST, "the body is not a JSON object")
    extra = sorted(set(data) - _FIELDS[op])
    if extra:
        raise Refused(BAD_REQUEST, f"unexpected fields: {', '.join(map(str, extra))}")
    check_name(data.get("lora_name"))
    if op == "unload":
        return data, None
    if "load_inplace" in data and not isinstance(data["load_inplace"], bool):
        raise Refused(BAD_REQUEST, "load_inplace must be a boolean")
    for flag in (ALLOW_BASE_FIELD, ALLOW_UNVERIFIED_FIELD):
        if flag in data and not isinstance(data[flag], bool):
            raise Refused(BAD_REQUEST, f"{flag} must be a boolean")
    # Forwarded as given (it passed the checks), so that /v1/models reports the very path the
    # operator asked for; what is verified is the normalised directory.
    return data, check_path(data.get("lora_path"), roots)


# ------------------------------------------------------------------------------ metrics


METRIC = "tuneop_vllm_admin_refused"  # a counter: tuneop_vllm_admin_refused_total{reason}
REASONS = (MISSING_CREDENTIAL, BAD_CREDENTIAL, NO_CREDENTIAL_CONFIGURED, BAD_METHOD, BAD_REQUEST, BAD_NAME,
           BAD_PATH, OUTSIDE_ROOT, SYMLINK_OUT, NOT_FOUND, INTEGRITY, BLOCKED_ROUTE, BASE_MISMATCH, UNVERIFIED,
           COPY_FAILED)


class _Counter:
    """Refusals by reason; exported through prometheus_client's default registry (the one vLLM's
    /metrics serves) once :meth:`export` ran, with every reason at 0 from the start so that
    ``increase()`` sees the first refusal."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._prom: Any = None

    def export(self) -> None:
        if self._prom is not None:
            return
        try:
            from prometheus_client import Counter  # optional: the guard runs in any vLLM image

            self._prom = Counter(METRIC, "Adapter admin API calls refused by tuneop's guard", ["reason"])
            for r in REASONS:
                self._prom.labels(reason=r)
        except Exception:  # noqa: BLE001  (no prometheus_client, or registered already)
            self._prom = False

    def inc(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self._prom:
            self._prom.labels(reason=reason).inc()


REFUSED = _Counter()


# ------------------------------------------------------------------------------ ASGI


Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class AdminGuard:
    """Pure ASGI middleware (``app.add_middleware(AdminGuard)``); settings from the environment."""

    def __init__(self, app: Any, token_file: Optional[str] = None, roots: Optional[Sequence[str]] = None,
                 base_model: Optional[str] = None, verified_dir: Optional[str] = None) -> None:
        self.app = app
        self.token_file = token_file or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE
        self.roots = list(roots) if roots is not None else parse_roots(os.environ.get(ROOTS_ENV))
        self.base_model = base_model or os.environ.get(BASE_MODEL_ENV) or None
        self._served: Optional[dict[str, Any]] = None
        self._verified_root: Optional[str] = verified_dir or os.environ.get(VERIFIED_DIR_ENV) or None
        self._copies: dict[str, str] = {}  # adapter name -> the verified copy vLLM loaded it from
        self._origin: dict[str, str] = {}  # verified copy -> the lora_path the operator asked for
        REFUSED.export()

    # -- verified copies

    def _new_copy_dir(self, name: str) -> str:
        if self._verified_root is None:
            self._verified_root = tempfile.mkdtemp(prefix="tuneop-verified-")
        os.makedirs(self._verified_root, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self._verified_root)

    def _loaded(self, name: str, copy_dir: str, requested: str) -> None:
        old = self._copies.get(name)
        self._copies[name] = copy_dir
        self._origin[copy_dir] = requested
        if old and old != copy_dir:
            self._drop(old)

    def _drop(self, copy_dir: str) -> None:
        self._origin.pop(copy_dir, None)
        shutil.rmtree(copy_dir, ignore_errors=True)

    def _rewrite_models(self, raw: bytes) -> bytes:
        """/v1/models as the operator asked: each adapter's ``root`` is the path it was loaded from,
        not the verified copy vLLM reads."""
        try:
            doc = json.loads(raw)
            for m in doc.get("data") or []:
                if isinstance(m, dict) and m.get("root") in self._origin:
                    m["root"] = self._origin[m["root"]]
        except (ValueError, AttributeError, TypeError):
            return raw
        return json.dumps(doc).encode()

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: dict = {}
        chunks: list[bytes] = []

        async def buffered(m: dict) -> None:
            if m["type"] == "http.response.start":
                start.update(m)
                return
            if m["type"] != "http.response.body":
                return await send(m)
            chunks.append(m.get("body") or b"")
            if m.get("more_body"):
                return
            raw = b"".join(chunks)
            hdrs = start.get("headers") or []
            if not any(k.lower() == b"content-encoding" for k, _ in hdrs) and start.get("status") == 200:
                raw = self._rewrite_models(raw)
            hdrs = [(k, v) for k, v in hdrs if k.lower() != b"content-length"]
            await send(dict(start, headers=[*hdrs, (b"content-length", str(len(raw)).encode())]))
            await send({"type": "http.response.body", "body": raw, "more_body": False})

        await self.app(scope, receive, buffered)

    # -- base model

    def served(self, scope: Scope) -> dict[str, Any]:
        """The served model, read from vLLM's app state once (kept once its shape is known)."""
        if self._served is not None:
            return self._served
        app = scope.get("app")
        served = served_model(getattr(app, "state", None), self.base_model)
        if served["info"] is not None:
            self._served = served
        return served

    def check_base(self, scope: Scope, adapter_dir: str) -> None:
        recorded = adapter_base(adapter_dir)
        if recorded is None:
            return
        why = check_base_model(recorded, self.served(scope))
        if why:
            raise Refused(BASE_MISMATCH, f"{why}; set allowBaseModelMismatch: true on the adapter to serve it "
                                         "anyway", 409)

    # -- credential

    def _token(self) -> Optional[bytes]:
        try:
            with open(self.token_file, "rb") as f:
                tok = f.read().strip()
        except OSError:
            return None
        return tok or None

    def _credential(self, headers: list[tuple[bytes, bytes]]) -> Optional[str]:
        """None when the admin header is valid, else the refusal reason."""
        given = [v for k, v in headers if k.lower() == HEADER.encode()]
        if not given:
            return MISSING_CREDENTIAL
        tok = self._token()
        if tok is None:
            return NO_CREDENTIAL_CONFIGURED
        ok = hmac.compare_digest(hashlib.sha256(given[0].strip()).digest(), hashlib.sha256(tok).digest())
        return None if ok and len(given) == 1 else BAD_CREDENTIAL

    @staticmethod
    def _api_key(scope: Scope) -> Optional[str]:
        key = os.environ.get("VLLM_API_KEY")
        if key:
            return key
        try:
            keys = scope["app"].state.args.api_key
        except Exception:  # noqa: BLE001
            return None
        if isinstance(keys, (list, tuple)):
            keys = next((k for k in keys if k), None)
        return keys or None

    def _forward_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """Drop the admin header; authenticate to vLLM's own API-key check with its key."""
        out = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in (HEADER.encode(), b"authorization")]
        key = self._api_key(scope)
        if key:
            out.append((b"authorization", f"Bearer {key}".encode()))
        else:
            out += [(k, v) for k, v in scope.get("headers") or [] if k.lower() == b"authorization"]
        return out

    # -- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "websocket":
            # No WebSocket route is allowed: closed before vLLM accepts it (the client sees 403).
            REFUSED.inc(BLOCKED_ROUTE)
            log.warning("tuneop guard refused WebSocket %s: %s", _route(scope), BLOCKED_ROUTE)
            return await send({"type": "websocket.close", "code": 1008})
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = _route(scope)
        op = ADMIN_PATHS.get(path)
        headers = scope.get("headers") or []
        if op is None and path == ROUTES_PATH:
            return await self._routes(scope, send, path)
        if op is None:
            try:
                check_route(path, scope.get("method") or "GET")
            except Refused as e:
                return await self._refuse(scope, send, path, e)
            if any(k.lower() == HEADER.encode() for k, _ in headers):
                # The operator (e.g. listing /v1/models): a valid token stands in for the API key.
                if self._credential(headers) is None:
                    scope = dict(scope, headers=self._forward_headers(scope))
                else:
                    scope = dict(scope, headers=[(k, v) for k, v in headers if k.lower() != HEADER.encode()])
            if path == "/v1/models" and self._origin:
                return await self._models(scope, receive, send)
            return await self.app(scope, receive, send)
        try:
            reason = self._credential(headers)
            if reason is not None:
                code = 401 if reason == MISSING_CREDENTIAL else 403
                raise Refused(reason, "only the tuneop operator may load or unload adapters", code)
            if scope.get("method") != "POST":
                raise Refused(BAD_METHOD, f"{path} accepts POST only", 405)
            body = await _read_body(receive)
            data, adapter_dir = check_request(op, body, self.roots)
            expected = data.pop(SHA_FIELD, None)
            allow_base = data.pop(ALLOW_BASE_FIELD, False)
            allow_unverified = data.pop(ALLOW_UNVERIFIED_FIELD, False)
            copy_dir: Optional[str] = None
            if adapter_dir is not None:
                # vLLM loads the verified copy, never the volume's files (see copy_verified).
                copy_dir = self._new_copy_dir(data["lora_name"])
                try:
                    await asyncio.to_thread(copy_verified, adapter_dir, copy_dir, self.roots, expected,
                                            allow_unverified)
                    if allow_base:
                        log.info("tuneop guard: base model check of %s skipped (allowBaseModelMismatch)",
                                 data.get("lora_name"))
                    else:
                        self.check_base(scope, copy_dir)
                except BaseException:
                    shutil.rmtree(copy_dir, ignore_errors=True)
                    raise
                requested = data["lora_path"]
                data["lora_path"] = copy_dir
        except Refused as e:
            return await self._refuse(scope, send, path, e)
        new_body = json.dumps(data).encode()
        hdrs = [(k, v) for k, v in self._forward_headers(scope) if k.lower() != b"content-length"]
        hdrs.append((b"content-length", str(len(new_body)).encode()))
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()

        status: dict[str, int] = {}

        async def watched(m: dict) -> None:
            if m.get("type") == "http.response.start":
                status["code"] = int(m.get("status") or 0)
            await send(m)

        log.info("tuneop guard: %s %s", op, data.get("lora_name"))
        try:
            await self.app(dict(scope, headers=hdrs), replay, watched)
        finally:
            ok = 200 <= status.get("code", 0) < 300
            if copy_dir is not None:
                if ok:
                    self._loaded(data["lora_name"], copy_dir, requested)
                else:  # not loaded (e.g. already loaded: vLLM keeps reading the previous copy)
                    self._drop(copy_dir)
            elif op == "unload" and ok and data["lora_name"] in self._copies:
                self._drop(self._copies.pop(data["lora_name"]))


    async def _routes(self, scope: Scope, send: Send, path: str) -> None:
        reason = self._credential(scope.get("headers") or [])
        if reason is not None:
            status = 401 if reason == MISSING_CREDENTIAL else 403
            return await self._refuse(scope, send, path, Refused(reason, "only the tuneop operator may list routes",
                                                                 status))
        if scope.get("method") not in ("GET", "HEAD"):
            return await self._refuse(scope, send, path, Refused(BAD_METHOD, f"{path} accepts GET only", 405))
        await _json_response(send, 200, {"routes": route_policies(app_routes(scope.get("app")))})

    @staticmethod
    async def _refuse(scope: Scope, send: Send, path: str, e: Refused) -> None:
        REFUSED.inc(e.reason)
        client = scope.get("client") or ("?", 0)
        log.warning("tuneop guard refused %s %s from %s: %s (%s)", scope.get("method"), path, client[0],
                    e.reason, e)
        await _json_response(send, e.status, {"error": {
            "message": str(e), "type": "tuneop_admin_refused", "reason": e.reason, "code": e.status}})


def check_route(path: str, method: str) -> None:
    """May any client call ``method path`` (a non-admin route, as :func:`_route` normalised it)?
    :class:`Refused` (403 not allowed, 405 wrong method) unless ``ALLOWED_ROUTES`` lists it."""
    methods = ALLOWED_ROUTES.get(path)
    if methods is None:
        raise Refused(BLOCKED_ROUTE, f"{path} is not served through tuneop's guard (allowed: "
                                     f"{', '.join(sorted(ALLOWED_ROUTES))}; adapters are managed by the "
                                     "tuneop operator)", 403)
    if method.upper() not in methods:
        raise Refused(BAD_METHOD, f"{path} accepts {', '.join(sorted(methods))} only", 405)


def route_policy(path: str, methods: Sequence[str]) -> str:
    """``admin`` (the admin token), ``allowed`` (any client) or ``refused``, for a registered route."""
    if path in ADMIN_PATHS or path == ROUTES_PATH:
        return "admin"
    allowed = ALLOWED_ROUTES.get(path)
    # A mount (no methods of its own, e.g. /metrics) is allowed as a path: the guard checks the method.
    if allowed is not None and all(m.upper() in allowed for m in methods):
        return "allowed"
    return "refused"


def app_routes(app: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Every route a Starlette/FastAPI app registers (mounted apps included): path and methods
    (``["WEBSOCKET"]`` for WebSocket routes, ``[]`` for a mount that is not an app with routes)."""
    out: list[dict[str, Any]] = []
    for r in getattr(app, "routes", None) or []:
        path = prefix + str(getattr(r, "path", "") or "")
        sub = getattr(r, "app", None)
        if type(r).__name__ == "Mount" or (sub is not None and getattr(sub, "routes", None) and not hasattr(r, "methods")):
            inner = app_routes(sub, path) if getattr(sub, "routes", None) else []
            out += inner or [{"path": path or "/", "methods": []}]
        elif type(r).__name__ in ("WebSocketRoute", "APIWebSocketRoute"):
            out.append({"path": path, "methods": ["WEBSOCKET"]})
        else:
            out.append({"path": path, "methods": sorted(m for m in (getattr(r, "methods", None) or []) if m != "HEAD")})
    return out


def route_policies(routes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`app_routes` with the guard's policy of each (``policy``: admin, allowed, refused)."""
    return [dict(r, policy=route_policy(r["path"].rstrip("/") or "/", r["methods"])) for r in routes]


def _route(scope: Scope) -> str:
    """The request path as the router sees it, without root_path, '//' or a trailing '/'."""
    path = scope.get("path") or "/"
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    path = re.sub(r"/{2,}", "/", path)
    if len(path) > 1:
        path = path.rstrip("/")
    return path


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            raise Refused(BAD_REQUEST, "client disconnected")
        chunk = msg.get("body") or b""
        size += len(chunk)
        if size > MAX_BODY:
            raise Refused(BAD_REQUEST, f"the body is larger than {MAX_BODY} bytes", 413)
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _json_response(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="tuneop-admin"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
