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
- **Integrity.** When the adapter directory holds ``tuneop-manifest.json``, every file it lists
  must match its sha256; when the request carries ``tuneop_sha256`` (the operator sends the
  expected sha256 of the weights file), the weights file must match it. Mismatch: 400.
- **Base model.** The adapter's recorded base model (``baseModel`` and ``baseModelInfo`` of
  ``tuneop-manifest.json``, else ``base_model_name_or_path`` of ``adapter_config.json``) must be the
  served one (``$TUNEOP_BASE_MODEL``, the AdapterDeployment's ``baseModel``, or vLLM's ``--model``;
  its shape from vLLM's ``app.state.vllm_config.model_config``, else the model directory's
  ``config.json``): see :func:`check_base_model`. Mismatch, or a different name with no recorded
  shape to compare: 409 ``base_model_mismatch``, unless the request carries
  ``tuneop_allow_base_model_mismatch: true`` (the adapter's ``allowBaseModelMismatch``).
- Everything else (inference, ``/v1/models``, ``/health``, ``/metrics``) passes untouched. A request
  that carries a *valid* admin token (the operator listing ``/v1/models``) gets vLLM's own API key
  put into its ``Authorization`` header, so the operator never needs the users' serving key; the
  admin header itself is never passed on to vLLM.

Refusals are counted in ``tuneop_vllm_admin_refused_total{reason}`` (prometheus_client, served by
vLLM's ``/metrics``) and logged with the reason and peer address, never the token.

This file is shipped into the pods as a ConfigMap (the operator renders its source), so it imports
only the standard library (prometheus_client when present). The pure checks are
:func:`check_name`, :func:`check_path`, :func:`verify_adapter` and :func:`check_base_model` (which
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
from typing import Any, Awaitable, Callable, Optional, Sequence

TOKEN_FILE_ENV = "TUNEOP_ADMIN_TOKEN_FILE"
ROOTS_ENV = "TUNEOP_ADAPTER_ROOTS"
BASE_MODEL_ENV = "TUNEOP_BASE_MODEL"  # the AdapterDeployment's spec.baseModel, as the user wrote it
DEFAULT_TOKEN_FILE = "/etc/tuneop/admin/token"
DEFAULT_ROOTS = "/mnt/pvc:/adapters"
HEADER = "x-tuneop-admin-token"
SHA_FIELD = "tuneop_sha256"
ALLOW_BASE_FIELD = "tuneop_allow_base_model_mismatch"
ADMIN_PATHS = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}
# vLLM also registers SageMaker-style adapter routes (POST /adapters, DELETE /adapters/{name}) that
# load and unload too, outside vLLM's own API-key check (it guards /v1 only): always refused.
BLOCKED_PREFIX = "/adapters"
MANIFEST = "tuneop-manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_BODY = 64 * 1024
MAX_PATH = 1024
MAX_FILES = 10_000
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
_SHA = re.compile(r"[0-9a-f]{64}", re.ASCII)
_FIELDS = {"load": {"lora_name", "lora_path", "load_inplace", SHA_FIELD, ALLOW_BASE_FIELD}, "unload": {"lora_name", "lora_int_id"}}

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


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_adapter(adapter_dir: str, expected_weights_sha256: Optional[str] = None) -> dict[str, str]:
    """Checks the adapter's files against its manifest and the expected weights sha256.
    Returns the verified ``{file: sha256}`` (empty: nothing to verify against)."""
    verified: dict[str, str] = {}
    mpath = os.path.join(adapter_dir, MANIFEST)
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                files = json.load(f).get("files") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise Refused(INTEGRITY, f"{MANIFEST} in {adapter_dir} is unreadable: {e}") from None
        if not isinstance(files, dict):
            raise Refused(INTEGRITY, f"{MANIFEST} in {adapter_dir} has no file list")
        for rel, want in sorted(files.items()):
            rel_norm = posixpath.normpath(str(rel))
            if rel_norm.startswith(("/", "..")):
                raise Refused(INTEGRITY, f"{MANIFEST} in {adapter_dir} lists {rel!r}, outside the adapter")
            full = os.path.join(adapter_dir, rel_norm)
            if not os.path.isfile(full):
                raise Refused(INTEGRITY, f"{rel} is listed in {MANIFEST} but missing from {adapter_dir}")
            got = sha256_file(full)
            if not hmac.compare_digest(got, str(want)):
                raise Refused(INTEGRITY, f"{rel} in {adapter_dir}: sha256 {got[:12]}… does not match the "
                                         f"manifest's {str(want)[:12]}…")
            verified[rel_norm] = got
    if expected_weights_sha256:
        if not _SHA.fullmatch(expected_weights_sha256):
            raise Refused(BAD_REQUEST, f"{SHA_FIELD} must be 64 lowercase hex digits")
        weights = next((w for w in WEIGHT_FILES if os.path.isfile(os.path.join(adapter_dir, w))), None)
        if weights is None:
            raise Refused(INTEGRITY, f"{adapter_dir} has no weights file ({', '.join(WEIGHT_FILES)})")
        got = verified.get(weights) or sha256_file(os.path.join(adapter_dir, weights))
        if not hmac.compare_digest(got, expected_weights_sha256):
            raise Refused(INTEGRITY, f"{weights} in {adapter_dir}: sha256 {got[:12]}… is not the expected "
                                     f"{expected_weights_sha256[:12]}…")
        verified[weights] = got
    return verified


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
    if ALLOW_BASE_FIELD in data and not isinstance(data[ALLOW_BASE_FIELD], bool):
        raise Refused(BAD_REQUEST, f"{ALLOW_BASE_FIELD} must be a boolean")
    # Forwarded as given (it passed the checks), so that /v1/models reports the very path the
    # operator asked for; what is verified is the normalised directory.
    return data, check_path(data.get("lora_path"), roots)


# ------------------------------------------------------------------------------ metrics


METRIC = "tuneop_vllm_admin_refused"  # a counter: tuneop_vllm_admin_refused_total{reason}
REASONS = (MISSING_CREDENTIAL, BAD_CREDENTIAL, NO_CREDENTIAL_CONFIGURED, BAD_METHOD, BAD_REQUEST, BAD_NAME,
           BAD_PATH, OUTSIDE_ROOT, SYMLINK_OUT, NOT_FOUND, INTEGRITY, BLOCKED_ROUTE, BASE_MISMATCH)


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
            from prometheus_client import Counter

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
                 base_model: Optional[str] = None) -> None:
        self.app = app
        self.token_file = token_file or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE
        self.roots = list(roots) if roots is not None else parse_roots(os.environ.get(ROOTS_ENV))
        self.base_model = base_model or os.environ.get(BASE_MODEL_ENV) or None
        self._served: Optional[dict[str, Any]] = None
        REFUSED.export()

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
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = _route(scope)
        op = ADMIN_PATHS.get(path)
        headers = scope.get("headers") or []
        if op is None and (path == BLOCKED_PREFIX or path.startswith(BLOCKED_PREFIX + "/")):
            return await self._refuse(scope, send, path, Refused(
                BLOCKED_ROUTE, f"{path} is disabled; adapters are managed by the tuneop operator", 403))
        if op is None:
            if any(k.lower() == HEADER.encode() for k, _ in headers):
                # The operator (e.g. listing /v1/models): a valid token stands in for the API key.
                if self._credential(headers) is None:
                    scope = dict(scope, headers=self._forward_headers(scope))
                else:
                    scope = dict(scope, headers=[(k, v) for k, v in headers if k.lower() != HEADER.encode()])
            return await self.app(scope, receive, send)
        try:
            reason = self._credential(headers)
            if reason is not None:
                status = 401 if reason == MISSING_CREDENTIAL else 403
                raise Refused(reason, "only the tuneop operator may load or unload adapters", status)
            if scope.get("method") != "POST":
                raise Refused(BAD_METHOD, f"{path} accepts POST only", 405)
            body = await _read_body(receive)
            data, adapter_dir = check_request(op, body, self.roots)
            expected = data.pop(SHA_FIELD, None)
            allow_base = data.pop(ALLOW_BASE_FIELD, False)
            if adapter_dir is not None:
                await asyncio.to_thread(verify_adapter, adapter_dir, expected)
                if allow_base:
                    log.info("tuneop guard: base model check of %s skipped (allowBaseModelMismatch)",
                             data.get("lora_name"))
                else:
                    self.check_base(scope, adapter_dir)
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

        log.info("tuneop guard: %s %s", op, data.get("lora_name"))
        return await self.app(dict(scope, headers=hdrs), replay, send)


    @staticmethod
    async def _refuse(scope: Scope, send: Send, path: str, e: Refused) -> None:
        REFUSED.inc(e.reason)
        client = scope.get("client") or ("?", 0)
        log.warning("tuneop guard refused %s %s from %s: %s (%s)", scope.get("method"), path, client[0],
                    e.reason, e)
        await _json_response(send, e.status, {"error": {
            "message": str(e), "type": "tuneop_admin_refused", "reason": e.reason, "code": e.status}})


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
