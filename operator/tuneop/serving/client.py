"""A small client for one vLLM server's OpenAI-compatible API and its runtime LoRA endpoints.

Sync (stdlib urllib, no extra dependency); `AsyncVllmClient` runs the same calls in a worker
thread. Adapter changes are idempotent: loading an adapter that is already loaded from the same
path answers `ALREADY_LOADED`, unloading one that is not loaded answers `NOT_LOADED`; neither is
an exception. Everything else that goes wrong raises a `VllmError` subclass with vLLM's message.

vLLM's answers (0.11 .. 0.32): load/unload succeed with 200 and a plain-text body; failures are
`{"error": {"message", "type", "param", "code"}}` (older releases: `{"message", "type", "code"}`):
  load, name already loaded     400 "The lora adapter 'x' has already been loaded. ..."
  load, no adapter at the path  404 (older: 400) "Loading lora x failed: No adapter found for ..."
  unload, name not loaded       404 (older: 400) "The lora adapter 'x' cannot be found."
  completion, unknown model     404 "The model `x` does not exist."
  /v1/load_lora_adapter without VLLM_ALLOW_RUNTIME_LORA_UPDATING: 404 {"detail": "Not Found"}
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
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

LORA_INFO_METRIC = "vllm:lora_requests_info"


class VllmError(Exception):
    """vLLM answered with an error (or not at all)."""

    def __init__(self, message: str, *, status: Optional[int] = None, type: Optional[str] = None,
                 method: str = "", path: str = "") -> None:
        where = f"{method} {path}".strip()
        prefix = f"vLLM {where}" + (f" -> {status}" if status is not None else "")
        super().__init__(f"{prefix}: {message}" if prefix.strip() else message)
        self.message = message
        self.status = status
        self.type = type
        self.method = method
        self.path = path


class VllmUnavailable(VllmError):
    """Connection refused / reset / timed out: the server is not (yet) there."""


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


GUARD_ERROR_TYPE = "tuneop_admin_refused"


class AdminRefused(VllmError):
    """tuneop's admin guard refused a load/unload (no or wrong credential, a path outside the
    adapter roots, a bad name, a sha256 mismatch, an adapter of another base model: 409); the message
    says which."""


class ModelNotFound(VllmError):
    """A completion named a model (base or adapter) the server does not serve."""


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
    """One entry of /v1/models: the base model (parent None) or a LoRA adapter (parent = base)."""

    id: str
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


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


class VllmClient:
    """Client of one vLLM server, e.g. VllmClient("http://10.0.0.7:8000")."""

    def __init__(self, base_url: str, *, api_key: Optional[str] = None, timeout: float = 30.0,
                 admin_token: Optional[str] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_token = admin_token  # tuneop's guard: X-Tuneop-Admin-Token
        self.timeout = timeout

    def __repr__(self) -> str:  # never the key
        return f"VllmClient({self.base_url!r})"

    # -- HTTP -----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None,
                 timeout: Optional[float] = None) -> tuple[int, bytes]:
        """(status, body) for any HTTP answer; VllmUnavailable when there is none."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        if self.admin_token:
            req.add_header("X-Tuneop-Admin-Token", self.admin_token)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            try:
                return e.code, e.read()
            finally:
                e.close()
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise VllmUnavailable(f"no answer from {self.base_url}: {reason}", method=method, path=path) from None

    @staticmethod
    def _error_of(status: int, body: bytes) -> tuple[str, Optional[str]]:
        """(message, type) out of vLLM's / FastAPI's error bodies, or the raw text."""
        text = body.decode("utf-8", "replace").strip()
        try:
            doc = json.loads(text)
        except ValueError:
            return text or f"HTTP {status}", None
        if isinstance(doc, dict):
            err = doc.get("error", doc)
            if isinstance(err, dict) and ("message" in err or "detail" in err):
                detail = err.get("message", err.get("detail"))
                return str(detail), err.get("type")
            if isinstance(err, str):
                return err, doc.get("type")
        return text, None

    def _raise(self, method: str, path: str, status: int, body: bytes, cls: type[VllmError] = VllmError):
        message, typ = self._error_of(status, body)
        raise cls(message, status=status, type=typ, method=method, path=path)

    def _json(self, method: str, path: str, body: Optional[dict[str, Any]] = None,
              timeout: Optional[float] = None) -> Any:
        status, raw = self._request(method, path, body, timeout)
        if status >= 400:
            if status == 404 and path.startswith("/v1/") and method == "POST" and "model" in (body or {}):
                message, typ = self._error_of(status, raw)
                if "does not exist" in message or (typ or "").startswith("NotFound"):
                    raise ModelNotFound(message, status=status, type=typ, method=method, path=path)
            self._raise(method, path, status, raw)
        try:
            return json.loads(raw)
        except ValueError:
            raise VllmError(f"not JSON: {raw[:200]!r}", status=status, method=method, path=path) from None

    # -- API ------------------------------------------------------------------------------------

    def health(self) -> bool:
        """True when /health answers 200 (the engine is up)."""
        try:
            status, _ = self._request("GET", "/health", timeout=min(self.timeout, 5.0))
        except VllmUnavailable:
            return False
        return status == 200

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
                raise VllmUnavailable(f"{self.base_url} not ready after {timeout:.0f}s ({last})")
            time.sleep(interval)

    def models(self) -> list[ServedModel]:
        """/v1/models: the base model first, then the loaded adapters."""
        doc = self._json("GET", "/v1/models")
        return [
            ServedModel(id=m["id"], root=m.get("root"), parent=m.get("parent"),
                        max_model_len=m.get("max_model_len"), raw=m)
            for m in doc.get("data", [])
        ]

    def base_models(self) -> list[str]:
        return [m.id for m in self.models() if not m.is_adapter]

    def loaded_adapters(self) -> dict[str, ServedModel]:
        """Adapters the server serves now, by name (root = the path it was loaded from)."""
        return {m.id: m for m in self.models() if m.is_adapter}

    def load_adapter(self, name: str, path: str, *, replace: bool = False,
                     sha256: Optional[str] = None, allow_base_model_mismatch: bool = False,
                     allow_unverified: bool = False) -> AdapterChange:
        """Load a PEFT adapter directory (a path the *server* can read) under `name`.

        Already loaded from the same path: ALREADY_LOADED. Loaded from another path: AdapterConflict,
        unless replace=True (vLLM's load_inplace: RELOADED). sha256: the expected sha256 of the
        weights file, checked by tuneop's guard. allow_base_model_mismatch: skip the guard's base model
        check. allow_unverified: load an adapter without tuneop-manifest.json. A refusal by the guard: AdminRefused (``reason`` e.g. base_model_mismatch, status 409)."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if replace:
            body["load_inplace"] = True
        if sha256:
            body["tuneop_sha256"] = sha256
        if allow_base_model_mismatch:
            body["tuneop_allow_base_model_mismatch"] = True
        if allow_unverified:
            body["tuneop_allow_unverified"] = True
        method, route = "POST", "/v1/load_lora_adapter"
        status, raw = self._request(method, route, body)
        if status < 300:
            msg = raw.decode("utf-8", "replace").strip()
            return AdapterChange(name, Outcome.RELOADED if replace else Outcome.LOADED, msg)
        message, typ = self._error_of(status, raw)
        self._raise_admin_route_errors(status, message, typ, method, route)
        if "already been loaded" in message:
            current = self.loaded_adapters().get(name)
            if current is None or current.root in (None, path):
                return AdapterChange(name, Outcome.ALREADY_LOADED, message)
            if not replace:
                raise AdapterConflict(
                    f"adapter {name!r} is already loaded from {current.root!r}, not {path!r}",
                    status=status, type=typ, method=method, path=route)
        if "conflicts with a served base model" in message:
            raise AdapterConflict(message, status=status, type=typ, method=method, path=route)
        if "No adapter found" in message or (status == 404 and (typ or "").startswith("NotFound")):
            raise AdapterNotFound(message, status=status, type=typ, method=method, path=route)
        if status in (400, 422, 500) and "lora" in message.lower():
            raise AdapterLoadFailed(message, status=status, type=typ, method=method, path=route)
        raise VllmError(message, status=status, type=typ, method=method, path=route)

    @staticmethod
    def _raise_admin_route_errors(status: int, message: str, typ: Optional[str], method: str, route: str) -> None:
        """Errors of the load/unload routes themselves: refused by tuneop's guard, or not served."""
        if typ == GUARD_ERROR_TYPE:
            raise AdminRefused(message, status=status, type=typ, method=method, path=route)
        if status == 404 and message == "Not Found" and typ is None:
            raise RuntimeLoraDisabled(
                f"{route} is not served: start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
                status=status, method=method, path=route)

    def unload_adapter(self, name: str) -> AdapterChange:
        """Unload `name`; NOT_LOADED (no exception) when the server does not have it."""
        method, route = "POST", "/v1/unload_lora_adapter"
        status, raw = self._request(method, route, {"lora_name": name})
        if status < 300:
            return AdapterChange(name, Outcome.UNLOADED, raw.decode("utf-8", "replace").strip())
        message, typ = self._error_of(status, raw)
        self._raise_admin_route_errors(status, message, typ, method, route)
        if status in (400, 404) and "cannot be found" in message:
            return AdapterChange(name, Outcome.NOT_LOADED, message)
        raise VllmError(message, status=status, type=typ, method=method, path=route)

    def complete(self, model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                 **extra: Any) -> Completion:
        """/v1/completions, one prompt. ModelNotFound when `model` is not served."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
        doc = self._json("POST", "/v1/completions", body)
        choice = (doc.get("choices") or [{}])[0]
        usage = doc.get("usage") or {}
        return Completion(
            model=doc.get("model", model), text=choice.get("text", ""), finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0), raw=doc,
        )

    def metrics_text(self) -> str:
        status, raw = self._request("GET", "/metrics")
        if status >= 400:
            self._raise("GET", "/metrics", status, raw)
        return raw.decode("utf-8", "replace")

    def metrics(self) -> dict[str, list[Sample]]:
        """/metrics parsed (prometheus_client.parser): metric family name -> its samples."""
        out: dict[str, list[Sample]] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            out[family.name] = [Sample(s.name, dict(s.labels), s.value) for s in family.samples]
        return out

    def lora_info(self) -> Optional[dict[str, Any]]:
        """The newest vllm:lora_requests_info sample: {"running": [...], "waiting": [...], "max_lora": int}
        (the gauge's value is a timestamp; vLLM keeps one series per label set)."""
        samples = self.metrics().get(LORA_INFO_METRIC)
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


class AsyncVllmClient:
    """The same calls, awaitable (each runs the sync client in a worker thread)."""

    def __init__(self, base_url: str, *, api_key: Optional[str] = None, timeout: float = 30.0,
                 admin_token: Optional[str] = None) -> None:
        self.sync = VllmClient(base_url, api_key=api_key, timeout=timeout, admin_token=admin_token)

    def __repr__(self) -> str:
        return f"AsyncVllmClient({self.sync.base_url!r})"

    async def health(self) -> bool:
        return await asyncio.to_thread(self.sync.health)

    async def models(self) -> list[ServedModel]:
        return await asyncio.to_thread(self.sync.models)

    async def loaded_adapters(self) -> dict[str, ServedModel]:
        return await asyncio.to_thread(self.sync.loaded_adapters)

    async def load_adapter(self, name: str, path: str, *, replace: bool = False) -> AdapterChange:
        return await asyncio.to_thread(self.sync.load_adapter, name, path, replace=replace)

    async def unload_adapter(self, name: str) -> AdapterChange:
        return await asyncio.to_thread(self.sync.unload_adapter, name)

    async def complete(self, model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                       **extra: Any) -> Completion:
        return await asyncio.to_thread(self.sync.complete, model, prompt, max_tokens, temperature, **extra)

    async def metrics(self) -> dict[str, list[Sample]]:
        return await asyncio.to_thread(self.sync.metrics)

    async def lora_info(self) -> Optional[dict[str, Any]]:
        return await asyncio.to_thread(self.sync.lora_info)

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not await self.health():
            if time.monotonic() >= deadline:
                raise VllmUnavailable(f"{self.sync.base_url} not ready after {timeout:.0f}s")
            await asyncio.sleep(interval)
