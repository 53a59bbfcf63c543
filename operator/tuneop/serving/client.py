"""tuneop's one client of a vLLM server's HTTP API: the OpenAI-compatible routes, the runtime LoRA
routes and /metrics, as vLLM answers them behind tuneop's admin guard (serving/guard.py).

This is the one place that knows vLLM's routes, the admin-token header and how vLLM words its
answers. Three layers, so that every caller reads them the same way:

- requests: ``*_request()`` build a :class:`Request` (method, route, JSON body);
  :func:`request_headers` adds the serving API key (``Authorization: Bearer``) and the operator's
  admin token (``X-Tuneop-Admin-Token``).
- replies: ``parse_*()`` are pure: the :class:`Request` and a :class:`Reply` (status code and body
  text) in, an outcome out, or a :class:`VllmError` subclass raised (:func:`error_of` classifies
  every error answer, :func:`error_fields` reads vLLM's, FastAPI's and the guard's error bodies).
- operations: each call is written once, as a generator that yields the requests it needs and
  receives their replies (``_op_*``). :class:`VllmClient` runs them with urllib (sync, no extra
  dependency: serving/local.py, benchmarks, process/image/e2e tests), :class:`AsyncVllmClient`
  with aiohttp (the operator's AdapterDeployment handlers).

Adapter changes are idempotent: loading an adapter that is already loaded answers
``ALREADY_LOADED`` (by default only when it is loaded from the same path, see ``check_conflict``),
unloading one that is not loaded answers ``NOT_LOADED``; neither is an exception. Everything else
that goes wrong raises a :class:`VllmError` subclass carrying the status code (0: no answer),
vLLM's (or the guard's) message, its error ``type`` and, for the guard's refusals, its ``reason``.

vLLM's answers (0.11 .. 0.32): load/unload succeed with 200 and a plain-text body; failures are
``{"error": {"message", "type", "param", "code"}}`` (older releases: ``{"message", "type", "code"}``):
  load, name already loaded     400 "The lora adapter 'x' has already been loaded. ..."
  load, name of the base model  400 "The lora adapter 'x' conflicts with a served base model."
  load, no adapter at the path  404 (older: 400) "Loading lora x failed: No adapter found for ..."
  load, vLLM refuses it         500 "Call to add_lora method failed: ... LoRA rank 64 is greater ..."
  unload, name not loaded       404 (older: 400) "The lora adapter 'x' cannot be found."
  completion, unknown model     404 "The model `x` does not exist."
  no serving API key            401 {"error": "Unauthorized"}
  /v1/load_lora_adapter without VLLM_ALLOW_RUNTIME_LORA_UPDATING: 404 {"detail": "Not Found"}
tuneop's guard refuses with ``{"error": {"message", "type": "tuneop_admin_refused", "reason", "code"}}``:
401 no admin token, 403 a wrong one (or none configured in the pod), 400 a bad name/path/body or a
sha256 mismatch, 404 no such directory in the pod, 409 an adapter of another base model.
"""
from __future__ import annotations

import asyncio
import enum
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Generator, Optional, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .guard import ALLOW_BASE_FIELD, ALLOW_UNVERIFIED_FIELD, SHA_FIELD

MODELS_ROUTE = "/v1/models"
LOAD_ROUTE = "/v1/load_lora_adapter"
UNLOAD_ROUTE = "/v1/unload_lora_adapter"
COMPLETIONS_ROUTE = "/v1/completions"
CHAT_ROUTE = "/v1/chat/completions"
HEALTH_ROUTE = "/health"
METRICS_ROUTE = "/metrics"
LORA_ROUTES = (LOAD_ROUTE, UNLOAD_ROUTE)

ADMIN_HEADER = "X-Tuneop-Admin-Token"  # guard.HEADER (HTTP header names are case-insensitive)
GUARD_ERROR_TYPE = "tuneop_admin_refused"  # the error type of every refusal by the guard
LORA_INFO_METRIC = "vllm:lora_requests_info"
DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE = 500  # characters of an error message kept (a proxy may answer with a whole HTML page)

# How vLLM says it (lowercase; older releases and forks word it slightly differently)
ALREADY_LOADED_WORDS = ("already been loaded", "already loaded", "already exists")
NOT_LOADED_WORDS = ("not found", "cannot be found", "does not exist", "no such")


# ---------------------------------------------------------------------------------- errors


class VllmError(Exception):
    """vLLM answered with an error (or not at all: status 0)."""

    def __init__(self, message: str, *, status: int = 0, type: Optional[str] = None, reason: Optional[str] = None,
                 method: str = "", path: str = "") -> None:
        where = f"{method} {path}".strip()
        prefix = f"vLLM {where}".strip() + (f" -> {status}" if status else "")
        super().__init__(f"{prefix}: {message}")
        self.message = message
        self.status = status
        self.type = type
        self.reason = reason  # the guard's reason (AdminRefused), else None
        self.method = method
        self.path = path


class VllmUnavailable(VllmError):
    """Connection refused / reset / timed out: the server is not (yet) there (status 0)."""


class RuntimeLoraDisabled(VllmError):
    """The server has no /v1/load_lora_adapter route: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not set
    (or --enable-lora is missing)."""


class AdapterNotFound(VllmError):
    """load_adapter: vLLM found no PEFT adapter at the path (missing adapter_config.json/weights)."""


class AdapterLoadFailed(VllmError):
    """load_adapter: vLLM refused the adapter (rank above --max-lora-rank, unsupported modules,
    wrong base model shape, ...)."""


class AdapterConflict(VllmError):
    """load_adapter: the name is already loaded from a different path, or is the base model's name."""


class AdminRefused(VllmError):
    """tuneop's admin guard refused the call (no or wrong credential, a path outside the adapter
    roots, a bad name, a sha256 mismatch, an adapter of another base model: 409, a blocked route);
    ``reason`` says which (guard.py's reasons, e.g. ``missing_credential``, ``base_model_mismatch``)."""


class ModelNotFound(VllmError):
    """A completion named a model (base or adapter) the server does not serve."""


# ---------------------------------------------------------------------------------- values


class Outcome(str, enum.Enum):
    LOADED = "Loaded"
    ALREADY_LOADED = "AlreadyLoaded"
    RELOADED = "Reloaded"
    UNLOADED = "Unloaded"
    NOT_LOADED = "NotLoaded"


@dataclass(frozen=True)
class AdapterChange:
    name: str
    outcome: Outcome
    message: str = ""

    @property
    def changed(self) -> bool:
        return self.outcome in (Outcome.LOADED, Outcome.RELOADED, Outcome.UNLOADED)


@dataclass(frozen=True)
class ServedModel:
    """One entry of /v1/models: the base model (no parent) or a LoRA adapter (parent = base)."""

    id: str
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_adapter(self) -> bool:
        return bool(self.parent)


@dataclass(frozen=True)
class Completion:
    model: str
    text: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Request:
    """One HTTP request to the server: method, route (``/v1/...``) and JSON body."""

    method: str
    path: str
    body: Optional[dict[str, Any]] = None
    timeout: Optional[float] = None  # None: the client's


@dataclass(frozen=True)
class Reply:
    """The server's answer: status code and body text."""

    status: int
    text: str = ""


# ---------------------------------------------------------------------------------- requests


def models_request() -> Request:
    return Request("GET", MODELS_ROUTE)


def health_request(timeout: Optional[float] = None) -> Request:
    return Request("GET", HEALTH_ROUTE, timeout=timeout)


def metrics_request() -> Request:
    return Request("GET", METRICS_ROUTE)


def load_request(name: str, path: str, *, replace: bool = False, sha256: Optional[str] = None,
                 allow_base_model_mismatch: bool = False, allow_unverified: bool = False) -> Request:
    """POST /v1/load_lora_adapter. replace: vLLM's load_inplace. The guard's fields only when set:
    sha256 (expected sha256 of the weights file), allow_base_model_mismatch (the adapter's
    allowBaseModelMismatch), allow_unverified (the adapter's allowUnverified)."""
    body: dict[str, Any] = {"lora_name": name, "lora_path": path}
    if replace:
        body["load_inplace"] = True
    if sha256:
        body[SHA_FIELD] = sha256
    if allow_base_model_mismatch:
        body[ALLOW_BASE_FIELD] = True
    if allow_unverified:
        body[ALLOW_UNVERIFIED_FIELD] = True
    return Request("POST", LOAD_ROUTE, body)


def unload_request(name: str) -> Request:
    return Request("POST", UNLOAD_ROUTE, {"lora_name": name})


def completion_request(model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                       **extra: Any) -> Request:
    return Request("POST", COMPLETIONS_ROUTE,
                   {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra})


def chat_request(model: str, messages: list[dict[str, Any]], max_tokens: int = 16, temperature: float = 0.0,
                 **extra: Any) -> Request:
    return Request("POST", CHAT_ROUTE, {"model": model, "messages": messages, "max_tokens": max_tokens,
                                        "temperature": temperature, **extra})


def request_headers(req: Request, *, api_key: Optional[str] = None, admin_token: Optional[str] = None) -> dict[str, str]:
    """The headers of `req`: JSON content type, the serving API key, the operator's admin token."""
    out: dict[str, str] = {}
    if req.body is not None:
        out["Content-Type"] = "application/json"
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    if admin_token:
        out[ADMIN_HEADER] = admin_token
    return out


def encode_body(req: Request) -> Optional[bytes]:
    return json.dumps(req.body).encode() if req.body is not None else None


# ---------------------------------------------------------------------------------- replies


def error_fields(status: int, text: str) -> tuple[str, Optional[str], Optional[str]]:
    """(message, type, reason) of an error body: vLLM's ``{"error": {...}}`` (or its older flat
    form), FastAPI's ``{"detail": ...}``, ``{"error": "Unauthorized"}``, the guard's refusal (the
    only one with a reason), or the raw text. The message is at most MAX_MESSAGE characters."""
    text = text.strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return (text or f"HTTP {status}")[:MAX_MESSAGE], None, None
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict):
            typ = err.get("type")
            typ = None if typ is None else str(typ)
            if typ == GUARD_ERROR_TYPE:
                reason = str(err.get("reason") or "") or None
                return (str(err.get("message") or "") or text)[:MAX_MESSAGE], typ, reason
            if "message" in err or "detail" in err:
                return str(err.get("message", err.get("detail")))[:MAX_MESSAGE], typ, None
        if isinstance(err, str):
            typ = doc.get("type")
            return err[:MAX_MESSAGE], None if typ is None else str(typ), None
    return text[:MAX_MESSAGE], None, None


def _has(message: str, words: tuple[str, ...]) -> bool:
    low = message.lower()
    return any(w in low for w in words)


def _route_missing(status: int, message: str, typ: Optional[str]) -> bool:
    """FastAPI's answer for an unknown route, as opposed to vLLM's "adapter not found"."""
    return status == 404 and message == "Not Found" and typ is None


def error_of(req: Request, reply: Reply) -> VllmError:
    """The exception for an error answer to `req`."""
    message, typ, reason = error_fields(reply.status, reply.text)
    status = reply.status
    kw: dict[str, Any] = {"status": status, "type": typ, "method": req.method, "path": req.path}
    if typ == GUARD_ERROR_TYPE:
        return AdminRefused(message, reason=reason, **kw)
    if req.path in LORA_ROUTES and _route_missing(status, message, typ):
        return RuntimeLoraDisabled(
            f"runtime LoRA updating is disabled on this server: {req.path} is not served (start vLLM with "
            "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)", **kw)
    not_found_type = (typ or "").startswith("NotFound")
    if req.path == LOAD_ROUTE:
        if "conflicts with a served base model" in message:
            return AdapterConflict(message, **kw)
        if "No adapter found" in message or (status == 404 and not_found_type):
            return AdapterNotFound(message, **kw)
        if status in (400, 422, 500) and "lora" in message.lower():
            return AdapterLoadFailed(message, **kw)
    if (status == 404 and req.method == "POST" and "model" in (req.body or {})
            and ("does not exist" in message or not_found_type)):
        return ModelNotFound(message, **kw)
    return VllmError(message, **kw)


def _json_of(req: Request, reply: Reply) -> Any:
    if reply.status >= 400:
        raise error_of(req, reply)
    try:
        return json.loads(reply.text)
    except ValueError:
        raise VllmError(f"not JSON: {reply.text[:200]!r}", status=reply.status, method=req.method,
                        path=req.path) from None


def parse_models(req: Request, reply: Reply) -> list[ServedModel]:
    """/v1/models: the base model, then the adapters (``parent`` set, ``root``: where it was loaded from)."""
    doc = _json_of(req, reply)
    data = (doc.get("data") or []) if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise VllmError(f"not a model list: {reply.text[:200]}", status=reply.status, method=req.method,
                        path=req.path)
    return [
        ServedModel(id=str(m["id"]), root=m.get("root"), parent=m.get("parent"),
                    max_model_len=m.get("max_model_len"), raw=m)
        for m in data if isinstance(m, dict) and m.get("id")
    ]


def parse_load(req: Request, reply: Reply) -> AdapterChange:
    """LOADED (RELOADED with load_inplace), ALREADY_LOADED (whatever the path: see
    :func:`check_already_loaded`), else the error (:func:`error_of`)."""
    assert req.body is not None
    name = str(req.body["lora_name"])
    if reply.status < 300:
        return AdapterChange(name, Outcome.RELOADED if req.body.get("load_inplace") else Outcome.LOADED,
                             reply.text.strip())
    message, typ, _ = error_fields(reply.status, reply.text)
    if reply.status in (400, 409) and typ != GUARD_ERROR_TYPE and _has(message, ALREADY_LOADED_WORDS):
        return AdapterChange(name, Outcome.ALREADY_LOADED, message)
    raise error_of(req, reply)


def check_already_loaded(req: Request, reply: Reply, change: AdapterChange,
                         current: Optional[ServedModel]) -> AdapterChange:
    """vLLM answered `reply` (ALREADY_LOADED) to `req`, and /v1/models lists `current` under that
    name: the same path (or no path known, or load_inplace) is ALREADY_LOADED, another path AdapterConflict."""
    assert req.body is not None
    path = req.body["lora_path"]
    if current is None or current.root in (None, path) or req.body.get("load_inplace"):
        return change
    _, typ, _ = error_fields(reply.status, reply.text)
    raise AdapterConflict(f"adapter {change.name!r} is already loaded from {current.root!r}, not {path!r}",
                          status=reply.status, type=typ, method=req.method, path=req.path)


def parse_unload(req: Request, reply: Reply) -> AdapterChange:
    """UNLOADED, NOT_LOADED (vLLM does not have it), else the error (:func:`error_of`)."""
    assert req.body is not None
    name = str(req.body["lora_name"])
    if reply.status < 300:
        return AdapterChange(name, Outcome.UNLOADED, reply.text.strip())
    message, typ, _ = error_fields(reply.status, reply.text)
    if (reply.status in (400, 404) and typ != GUARD_ERROR_TYPE and not _route_missing(reply.status, message, typ)
            and _has(message, NOT_LOADED_WORDS)):
        return AdapterChange(name, Outcome.NOT_LOADED, message)
    raise error_of(req, reply)


def parse_completion(req: Request, reply: Reply) -> Completion:
    doc = _json_of(req, reply)
    model = str((req.body or {}).get("model", ""))
    if not isinstance(doc, dict):
        raise VllmError(f"not a completion: {reply.text[:200]}", status=reply.status, method=req.method,
                        path=req.path)
    choice = (doc.get("choices") or [{}])[0]
    usage = doc.get("usage") or {}
    return Completion(
        model=doc.get("model", model), text=choice.get("text", ""), finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0), raw=doc,
    )


def parse_chat(req: Request, reply: Reply) -> dict[str, Any]:
    """/v1/chat/completions: the answer as vLLM gives it (``choices[0]["message"]["content"]``)."""
    doc = _json_of(req, reply)
    if not isinstance(doc, dict):
        raise VllmError(f"not a chat completion: {reply.text[:200]}", status=reply.status, method=req.method,
                        path=req.path)
    return doc


def parse_metrics(req: Request, reply: Reply) -> dict[str, list[Sample]]:
    """/metrics parsed (prometheus_client.parser): metric family name -> its samples."""
    if reply.status >= 400:
        raise error_of(req, reply)
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(reply.text):
        out[family.name] = [Sample(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def lora_info_of(metrics: dict[str, list[Sample]]) -> Optional[dict[str, Any]]:
    """The newest vllm:lora_requests_info sample: {"running": [...], "waiting": [...], "max_lora": int}
    (the gauge's value is a timestamp; vLLM keeps one series per label set)."""
    samples = metrics.get(LORA_INFO_METRIC)
    if not samples:
        return None
    newest = max(samples, key=lambda s: s.value)

    def names(v: str) -> list[str]:
        return [n for n in v.split(",") if n]

    return {
        "running": names(newest.labels.get("running_lora_adapters", "")),
        "waiting": names(newest.labels.get("waiting_lora_adapters", "")),
        "max_lora": int(newest.labels.get("max_lora", "0") or 0),
    }


# ---------------------------------------------------------------------------------- operations

T = TypeVar("T")
Op = Generator[Request, Reply, T]  # yields requests, is sent their replies (VllmUnavailable thrown in)


def _op_health(timeout: float) -> Op[bool]:
    try:
        reply = yield health_request(timeout)
    except VllmUnavailable:
        return False
    return reply.status == 200


def _op_models() -> Op[list[ServedModel]]:
    req = models_request()
    return parse_models(req, (yield req))


def _op_load(req: Request, check_conflict: bool) -> Op[AdapterChange]:
    reply = yield req
    change = parse_load(req, reply)
    if change.outcome is Outcome.ALREADY_LOADED and check_conflict:
        served = yield from _op_models()
        current = next((m for m in served if m.is_adapter and m.id == change.name), None)
        change = check_already_loaded(req, reply, change, current)
    return change


def _op_unload(name: str) -> Op[AdapterChange]:
    req = unload_request(name)
    return parse_unload(req, (yield req))


def _op_complete(req: Request) -> Op[Completion]:
    return parse_completion(req, (yield req))


def _op_chat(req: Request) -> Op[dict[str, Any]]:
    return parse_chat(req, (yield req))


def _op_metrics() -> Op[dict[str, list[Sample]]]:
    req = metrics_request()
    return parse_metrics(req, (yield req))


class _Base:
    def __init__(self, base_url: str, *, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 admin_token: Optional[str] = None) -> None:
        self.base_url = base_url.rstrip("/")  # http://<host>:<port>, no /v1
        self.api_key = api_key  # the serving API key (VLLM_API_KEY)
        self.admin_token = admin_token  # tuneop's guard: X-Tuneop-Admin-Token
        self.timeout = timeout

    def __repr__(self) -> str:  # never the key or the token
        return f"{type(self).__name__}({self.base_url!r})"

    def _headers(self, req: Request) -> dict[str, str]:
        return request_headers(req, api_key=self.api_key, admin_token=self.admin_token)

    def _unavailable(self, req: Request, why: object) -> VllmUnavailable:
        return VllmUnavailable(f"no answer from {self.base_url}: {why}", method=req.method, path=req.path)

    def _not_ready(self, timeout: float, last: str) -> VllmUnavailable:
        return VllmUnavailable(f"{self.base_url} not ready after {timeout:.0f}s ({last})")


class VllmClient(_Base):
    """Client of one vLLM server, e.g. VllmClient("http://10.0.0.7:8000") (sync, urllib)."""

    def _send(self, req: Request) -> Reply:
        """The answer, whatever its status; VllmUnavailable when there is none."""
        r = urllib.request.Request(self.base_url + req.path, data=encode_body(req), method=req.method,
                                   headers=self._headers(req))
        try:
            with urllib.request.urlopen(r, timeout=req.timeout or self.timeout) as resp:
                return Reply(resp.status, resp.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as e:
            try:
                return Reply(e.code, e.read().decode("utf-8", "replace"))
            finally:
                e.close()
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            raise self._unavailable(req, getattr(e, "reason", e)) from None

    def _run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                try:
                    reply = self._send(req)
                except VllmUnavailable as e:
                    req = op.throw(e)
                else:
                    req = op.send(reply)
        except StopIteration as stop:
            return stop.value

    def health(self) -> bool:
        """True when /health answers 200 (the engine is up)."""
        return self._run(_op_health(min(self.timeout, 5.0)))

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5, proc: Any = None) -> None:
        """Wait until /health and /v1/models answer. `proc` (a Popen) stops the wait early when
        the server process has exited. Raises VllmUnavailable on timeout."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if proc is not None and proc.poll() is not None:
                raise VllmUnavailable(f"the server process exited with code {proc.returncode} before it was ready")
            try:
                if self.health():
                    self.models()
                    return
                last = "/health is not 200 yet"
            except VllmError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise self._not_ready(timeout, last)
            time.sleep(interval)

    def models(self) -> list[ServedModel]:
        """/v1/models: the base model first, then the loaded adapters."""
        return self._run(_op_models())

    def base_models(self) -> list[str]:
        return [m.id for m in self.models() if not m.is_adapter]

    def loaded_adapters(self) -> dict[str, ServedModel]:
        """Adapters the server serves now, by name (root = the path it was loaded from)."""
        return {m.id: m for m in self.models() if m.is_adapter}

    def load_adapter(self, name: str, path: str, *, replace: bool = False, sha256: Optional[str] = None,
                     allow_base_model_mismatch: bool = False, allow_unverified: bool = False,
                     check_conflict: bool = True) -> AdapterChange:
        """Load a PEFT adapter directory (a path the *server* can read) under `name`.

        Already loaded: ALREADY_LOADED when from the same path; from another path AdapterConflict
        (check_conflict=False: ALREADY_LOADED without asking /v1/models), unless replace=True
        (vLLM's load_inplace: RELOADED). sha256: the expected sha256 of the weights file, checked by
        tuneop's guard. allow_base_model_mismatch: skip the guard's base model check.
        allow_unverified: load an adapter without tuneop-manifest.json. A refusal by the guard:
        AdminRefused (``reason`` e.g. base_model_mismatch, status 409)."""
        req = load_request(name, path, replace=replace, sha256=sha256,
                           allow_base_model_mismatch=allow_base_model_mismatch, allow_unverified=allow_unverified)
        return self._run(_op_load(req, check_conflict))

    def unload_adapter(self, name: str) -> AdapterChange:
        """Unload `name`; NOT_LOADED (no exception) when the server does not have it."""
        return self._run(_op_unload(name))

    def complete(self, model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                 **extra: Any) -> Completion:
        """/v1/completions, one prompt. ModelNotFound when `model` is not served."""
        return self._run(_op_complete(completion_request(model, prompt, max_tokens, temperature, **extra)))

    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int = 16, temperature: float = 0.0,
             **extra: Any) -> dict[str, Any]:
        """/v1/chat/completions, one conversation: vLLM's answer. ModelNotFound when `model` is not served."""
        return self._run(_op_chat(chat_request(model, messages, max_tokens, temperature, **extra)))

    def metrics(self) -> dict[str, list[Sample]]:
        """/metrics parsed (prometheus_client.parser): metric family name -> its samples."""
        return self._run(_op_metrics())

    def lora_info(self) -> Optional[dict[str, Any]]:
        """See :func:`lora_info_of`."""
        return lora_info_of(self.metrics())


class AsyncVllmClient(_Base):
    """The same calls, awaitable (aiohttp). `session`: an aiohttp session to reuse (its owner closes
    it); without one each request opens and closes its own."""

    def __init__(self, base_url: str, *, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 admin_token: Optional[str] = None, session: Optional[aiohttp.ClientSession] = None) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, admin_token=admin_token)
        self.session = session

    async def _send(self, req: Request) -> Reply:
        """The answer, whatever its status; VllmUnavailable when there is none."""
        timeout = aiohttp.ClientTimeout(total=req.timeout or self.timeout)
        session = self.session or aiohttp.ClientSession(timeout=timeout)
        try:
            async with session.request(req.method, self.base_url + req.path, data=encode_body(req),
                                       headers=self._headers(req), timeout=timeout) as rsp:
                return Reply(rsp.status, (await rsp.read()).decode("utf-8", "replace"))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise self._unavailable(req, str(e) or type(e).__name__) from None
        finally:
            if self.session is None:
                await session.close()

    async def _run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                try:
                    reply = await self._send(req)
                except VllmUnavailable as e:
                    req = op.throw(e)
                else:
                    req = op.send(reply)
        except StopIteration as stop:
            return stop.value

    async def health(self) -> bool:
        return await self._run(_op_health(min(self.timeout, 5.0)))

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Wait until /health and /v1/models answer; VllmUnavailable on timeout."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            try:
                if await self.health():
                    await self.models()
                    return
                last = "/health is not 200 yet"
            except VllmError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise self._not_ready(timeout, last)
            await asyncio.sleep(interval)

    async def models(self) -> list[ServedModel]:
        return await self._run(_op_models())

    async def base_models(self) -> list[str]:
        return [m.id for m in await self.models() if not m.is_adapter]

    async def loaded_adapters(self) -> dict[str, ServedModel]:
        return {m.id: m for m in await self.models() if m.is_adapter}

    async def load_adapter(self, name: str, path: str, *, replace: bool = False, sha256: Optional[str] = None,
                           allow_base_model_mismatch: bool = False, allow_unverified: bool = False,
                           check_conflict: bool = True) -> AdapterChange:
        """See :meth:`VllmClient.load_adapter`."""
        req = load_request(name, path, replace=replace, sha256=sha256,
                           allow_base_model_mismatch=allow_base_model_mismatch, allow_unverified=allow_unverified)
        return await self._run(_op_load(req, check_conflict))

    async def unload_adapter(self, name: str) -> AdapterChange:
        return await self._run(_op_unload(name))

    async def complete(self, model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                       **extra: Any) -> Completion:
        return await self._run(_op_complete(completion_request(model, prompt, max_tokens, temperature, **extra)))

    async def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int = 16, temperature: float = 0.0,
                   **extra: Any) -> dict[str, Any]:
        return await self._run(_op_chat(chat_request(model, messages, max_tokens, temperature, **extra)))

    async def metrics(self) -> dict[str, list[Sample]]:
        return await self._run(_op_metrics())

    async def lora_info(self) -> Optional[dict[str, Any]]:
        return lora_info_of(await self.metrics())
