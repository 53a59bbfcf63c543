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
- Everything else (inference, ``/v1/models``, ``/health``, ``/metrics``) passes untouched. A request
  that carries a *valid* admin token (the operator listing ``/v1/models``) gets vLLM's own API key
  put into its ``Authorization`` header, so the operator never needs the users' serving key; the
  admin header itself is never passed on to vLLM.

Refusals are counted in ``tuneop_vllm_admin_refused_total{reason}`` (prometheus_client, served by
vLLM's ``/metrics``) and logged with the reason and peer address, never the token.

This file is shipped into the pods as a ConfigMap (the operator renders its source), so it imports
only the standard library (prometheus_client when present). The pure checks are
:func:`check_name`, :func:`check_path` and :func:`verify_adapter`.
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
DEFAULT_TOKEN_FILE = "/etc/tuneop/admin/token"
DEFAULT_ROOTS = "/mnt/pvc:/adapters"
HEADER = "x-tuneop-admin-token"
SHA_FIELD = "tuneop_sha256"
ADMIN_PATHS = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}
# vLLM also registers SageMaker-style adapter routes (POST /adapters, DELETE /adapters/{name}) that
# load and unload too, outside vLLM's own API-key check (it guards /v1 only): always refused.
BLOCKED_PREFIX = "/adapters"
MANIFEST = "tuneop-manifest.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_BODY = 64 * 1024
MAX_PATH = 1024
MAX_FILES = 10_000
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
_SHA = re.compile(r"[0-9a-f]{64}", re.ASCII)
_FIELDS = {"load": {"lora_name", "lora_path", "load_inplace", SHA_FIELD}, "unload": {"lora_name", "lora_int_id"}}

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
    # Forwarded as given (it passed the checks), so that /v1/models reports the very path the
    # operator asked for; what is verified is the normalised directory.
    return data, check_path(data.get("lora_path"), roots)


# ------------------------------------------------------------------------------ metrics


METRIC = "tuneop_vllm_admin_refused"  # a counter: tuneop_vllm_admin_refused_total{reason}
REASONS = (MISSING_CREDENTIAL, BAD_CREDENTIAL, NO_CREDENTIAL_CONFIGURED, BAD_METHOD, BAD_REQUEST, BAD_NAME,
           BAD_PATH, OUTSIDE_ROOT, SYMLINK_OUT, NOT_FOUND, INTEGRITY, BLOCKED_ROUTE)


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

    def __init__(self, app: Any, token_file: Optional[str] = None, roots: Optional[Sequence[str]] = None) -> None:
        self.app = app
        self.token_file = token_file or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE
        self.roots = list(roots) if roots is not None else parse_roots(os.environ.get(ROOTS_ENV))
        REFUSED.export()

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
            if adapter_dir is not None:
                await asyncio.to_thread(verify_adapter, adapter_dir, expected)
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
