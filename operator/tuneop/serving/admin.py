"""The operator's small async client of vLLM's runtime LoRA API (aiohttp).

- ``list_adapters(base_url) -> set[str]``: ``GET /v1/models``; entries with a ``parent`` (the
  base model) are adapters; the base model itself is never returned.
- ``load(base_url, name, path)``: ``POST /v1/load_lora_adapter {lora_name, lora_path}``.
- ``unload(base_url, name)``: ``POST /v1/unload_lora_adapter {lora_name}``.

Idempotent: "already loaded" (load) and "not found" (unload) answers are success. Any other
non-2xx answer raises :class:`AdminError` with the status code (0: no answer) and, for refusals
by tuneop's guard (``serving/guard.py``), its ``reason``. The server needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. Behind the guard pass ``admin_token`` (header
``X-Tuneop-Admin-Token``; the guard then authenticates the call to vLLM's own API-key check); a
plain vLLM with ``VLLM_API_KEY`` set takes ``api_key``. ``load(..., sha256=...)`` asks the guard
to check the weights file against it before vLLM loads it; ``allow_base_model_mismatch=True`` lets
the guard load an adapter recorded as trained on another base model (else refused: 409
``base_model_mismatch``).
``base_url`` is ``http://<podIP>:<port>`` (no ``/v1``).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

import aiohttp

DEFAULT_TIMEOUT = 60.0  # loading a large adapter from a network volume takes a while
_ALREADY = ("already been loaded", "already loaded", "already exists")
_NOT_FOUND = ("not found", "cannot be found", "does not exist", "no such")


class AdminError(Exception):
    def __init__(self, status: int, message: str, *, op: str = "", url: str = "", body: Optional[str] = None):
        self.reason, guard_message = guard_error(body if body is not None else message)
        if self.reason and guard_message:
            message = guard_message
        super().__init__(f"vLLM {op} at {url}: {status} {message}".strip())
        self.status = status
        self.message = message


def guard_error(text: str) -> tuple[Optional[str], Optional[str]]:
    """(reason, message) of a refusal by tuneop's guard in an error body, else (None, None)."""
    import json as _json

    try:
        err = (_json.loads(text) or {}).get("error") or {}
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(err, dict) or err.get("type") != "tuneop_admin_refused":
        return None, None
    return str(err.get("reason") or "") or None, str(err.get("message") or "")[:500] or None


ADMIN_HEADER = "X-Tuneop-Admin-Token"


def _headers(api_key: Optional[str], admin_token: Optional[str] = None) -> dict[str, str]:
    out = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if admin_token:
        out[ADMIN_HEADER] = admin_token
    return out


async def _request(
    method: str, url: str, *, json: Any = None, api_key: Optional[str], timeout: float, op: str,
    session: Optional[aiohttp.ClientSession] = None, admin_token: Optional[str] = None,
) -> tuple[int, str]:
    own = session is None
    s = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
    try:
        async with s.request(method, url, json=json, headers=_headers(api_key, admin_token)) as rsp:
            return rsp.status, await rsp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise AdminError(0, str(e) or type(e).__name__, op=op, url=url) from e
    finally:
        if own:
            await s.close()


async def list_models(
    base_url: str, *, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
    session: Optional[aiohttp.ClientSession] = None, admin_token: Optional[str] = None,
) -> dict[str, Optional[str]]:
    """Adapters served: name -> the path vLLM loaded it from (``root``), or None."""
    import json as _json

    url = base_url.rstrip("/") + "/v1/models"
    status, text = await _request("GET", url, api_key=api_key, timeout=timeout, op="list", session=session,
                                  admin_token=admin_token)
    if status >= 400:
        raise AdminError(status, text[:300], op="list", url=url, body=text)
    try:
        data = _json.loads(text).get("data") or []
    except (ValueError, AttributeError) as e:
        raise AdminError(status, f"not a model list: {text[:200]}", op="list", url=url) from e
    return {m["id"]: m.get("root") for m in data if isinstance(m, dict) and m.get("parent") and m.get("id")}


async def list_adapters(base_url: str, **kw: Any) -> set[str]:
    return set(await list_models(base_url, **kw))


async def load(
    base_url: str, name: str, path: str, *, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
    session: Optional[aiohttp.ClientSession] = None, admin_token: Optional[str] = None,
    sha256: Optional[str] = None, allow_base_model_mismatch: bool = False, allow_unverified: bool = False,
) -> bool:
    """Load adapter `name` from `path`. True: loaded now; False: it was already loaded.
    sha256 (only behind tuneop's guard): the expected sha256 of the weights file;
    allow_base_model_mismatch: skip the guard's base model check (the adapter's allowBaseModelMismatch);
    allow_unverified: load an adapter that has no tuneop-manifest.json (the adapter's allowUnverified)."""
    url = base_url.rstrip("/") + "/v1/load_lora_adapter"
    body: dict[str, Any] = {"lora_name": name, "lora_path": path}
    if sha256:
        body["tuneop_sha256"] = sha256
    if allow_base_model_mismatch:
        body["tuneop_allow_base_model_mismatch"] = True
    if allow_unverified:
        body["tuneop_allow_unverified"] = True
    status, text = await _request(
        "POST", url, json=body, api_key=api_key, timeout=timeout,
        op="load", session=session, admin_token=admin_token,
    )
    if status < 300:
        return True
    if status in (400, 409) and guard_error(text)[0] is None and any(s in text.lower() for s in _ALREADY):
        return False
    raise AdminError(status, text[:300], op=f"load {name}", url=url, body=text)


async def unload(
    base_url: str, name: str, *, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
    session: Optional[aiohttp.ClientSession] = None, admin_token: Optional[str] = None,
) -> bool:
    """Unload adapter `name`. True: unloaded now; False: it was not loaded."""
    url = base_url.rstrip("/") + "/v1/unload_lora_adapter"
    status, text = await _request(
        "POST", url, json={"lora_name": name}, api_key=api_key, timeout=timeout, op="unload", session=session,
        admin_token=admin_token,
    )
    if status < 300:
        return True
    if status == 404 and _route_missing(text):
        # The endpoint itself is absent: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not set on the server.
        raise AdminError(status, "runtime LoRA updating is disabled on this server", op=f"unload {name}", url=url)
    if status in (400, 404) and any(s in text.lower() for s in _NOT_FOUND):
        return False
    raise AdminError(status, text[:300], op=f"unload {name}", url=url, body=text)


def _route_missing(text: str) -> bool:
    """FastAPI's answer for an unknown route, as opposed to vLLM's "adapter not found" message."""
    import json as _json

    try:
        return _json.loads(text) == {"detail": "Not Found"}
    except ValueError:
        return False
