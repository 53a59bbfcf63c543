"""A small async Kubernetes REST client over aiohttp, built from kopf's login credentials.

The operator's ``@kopf.on.login`` handler (finetunejob/handlers.py) calls kopf's own login
functions and hands the resulting ``kopf.ConnectionInfo`` to :func:`set_connection`; every
handler then uses :func:`client` (one client per event loop, closed at operator cleanup).

Only what the operator needs: get / list / create (409 = already there) / merge or strategic
patch / delete / pod log tail / post an Event. Errors are :class:`ApiError` with the status code.

The API server's ``Warning`` response headers (RFC 7234 ``299 - "text"``; e.g. Pod Security's
``warn`` mode: ``would violate PodSecurity "restricted:latest": ...``) are logged at WARNING
level with the request's method and object, once per distinct text per object, and handed to
whoever asks with :func:`capture_warnings` (a context variable: per asyncio task).

A GET joins an identical GET (same path and parameters) of the same client already in flight
instead of sending another: a burst of FineTuneJobs reading the same dataset ConfigMap and output
PVC costs one read, not one each. Nothing is kept once the answer is there (it is no cache), and
a write through the client forgets the reads in flight of what it writes (the object, its
subresources, its collection): a GET that starts after a write of this process never gets an
answer read before it.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import datetime
import functools
import json
import logging
import re
import ssl
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import quote

import aiohttp

# (apiVersion, kind) -> (plural, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Pod"): ("pods", True),
    ("v1", "PersistentVolumeClaim"): ("persistentvolumeclaims", True),
    ("v1", "Service"): ("services", True),
    ("v1", "Event"): ("events", True),
    ("v1", "Namespace"): ("namespaces", False),
    ("batch/v1", "Job"): ("jobs", True),
    ("tuneop.dev/v1alpha1", "FineTuneJob"): ("finetunejobs", True),
    ("tuneop.dev/v1alpha1", "AdapterDeployment"): ("adapterdeployments", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("apps/v1", "ReplicaSet"): ("replicasets", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
}

log = logging.getLogger("tuneop.kube")

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
DEFAULT_TIMEOUT = 30.0
CONNECTIONS = 16  # per client (one per event loop)


class ApiError(Exception):
    """A non-2xx answer of the API server (or no answer: status 0)."""

    def __init__(self, status: int, reason: str = "", message: str = "", body: Any = None):
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.status in (0, 408, 429) or self.status >= 500


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


def resource_path(
    api_version: str,
    kind: str,
    namespace: Optional[str] = None,
    name: Optional[str] = None,
    subresource: Optional[str] = None,
) -> str:
    """``/api/v1/namespaces/ns/pods/name/log`` and friends."""
    try:
        plural, namespaced = RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"unknown resource {api_version} {kind}; add it to kube.RESOURCES") from None
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name, safe='')}"
    if subresource:
        base += f"/{subresource}"
    return base


def _error(status: int, text: str) -> ApiError:
    reason, message, body = "", text, None
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            reason = str(body.get("reason") or "")
            message = str(body.get("message") or text)
    except ValueError:
        pass
    message = message[:500]
    cls = NotFound if status == 404 else Conflict if status == 409 else ApiError
    return cls(status, reason, message, body)


_WARNING = re.compile(r'(\d{3})\s+(\S+)\s+"((?:[^"\\]|\\.)*)"(?:\s+"[^"]*")?')
_captured: contextvars.ContextVar[Optional[list[str]]] = contextvars.ContextVar("tuneop_kube_warnings", default=None)
WARNED_MAX = 1024  # (object, text) pairs remembered per client for "log once"


def parse_warnings(values: Iterable[str]) -> list[str]:
    """The texts of ``Warning`` header values (RFC 7234 ``299 - "text"``, several per header
    value separated by commas, escaped quotes inside), in order, without duplicates."""
    out: list[str] = []
    for value in values:
        found = _WARNING.findall(value or "")
        texts = [re.sub(r"\\(.)", r"\1", t) for _, _, t in found]
        if not found and (value or "").strip():
            texts = [value.strip()]  # not RFC 7234: keep it as it came
        for t in texts:
            if t and t not in out:
                out.append(t)
    return out


@contextlib.contextmanager
def capture_warnings() -> Iterator[list[str]]:
    """``with capture_warnings() as w: await kc.create(...)``: `w` gets the API server's warning
    texts of the requests made inside (by this asyncio task), whether logged before or not."""
    got: list[str] = []
    token = _captured.set(got)
    try:
        yield got
    finally:
        _captured.reset(token)


# GET parameters of a read from the API server's watch cache (KubeClient.get_recent)
RECENT = {"resourceVersion": "0"}


class _Read:
    """A GET in flight and how many callers wait for it."""

    def __init__(self, task: asyncio.Future[str]) -> None:
        self.task = task
        self.waiters = 0


class KubeClient:
    """One aiohttp session against one API server. Use within one event loop."""

    def __init__(
        self,
        server: str,
        *,
        headers: Optional[dict[str, str]] = None,
        ssl_context: ssl.SSLContext | bool | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        default_namespace: Optional[str] = None,
        proxy: Optional[str] = None,
        trust_env: bool = False,
    ):
        self.server = server.rstrip("/")
        self.default_namespace = default_namespace
        self._headers = {"User-Agent": "tuneop", **(headers or {})}
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._proxy = proxy
        self._trust_env = trust_env
        self._session: Optional[aiohttp.ClientSession] = None
        self._warned: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        # GETs in flight: (path, params, raw) -> the task sending it (see the module's docstring)
        self._reads: dict[tuple[str, tuple[tuple[str, str], ...], bool], _Read] = {}
        self.last_warnings: list[str] = []  # of the latest request of this client (any task)

    def _note_warnings(self, method: str, subject: str, texts: list[str]) -> None:
        self.last_warnings = texts
        if not texts:
            return
        captured = _captured.get()
        for text in texts:
            if captured is not None and text not in captured:
                captured.append(text)
            key = (subject, text)
            if key in self._warned:
                self._warned.move_to_end(key)
                continue
            self._warned[key] = None
            while len(self._warned) > WARNED_MAX:
                self._warned.popitem(last=False)
            log.warning("Kubernetes API warning on %s %s: %s", method, subject, text)

    @classmethod
    def from_connection(cls, info: Any, *, timeout: float = DEFAULT_TIMEOUT) -> "KubeClient":
        """From a ``kopf.ConnectionInfo`` (what kopf's login handlers return)."""
        ssl_context: ssl.SSLContext | bool | None = None
        if str(info.server).startswith("https"):
            ssl_context = info.as_ssl_context()
        return cls(
            info.server,
            headers=info.as_http_headers(),
            ssl_context=ssl_context,
            timeout=timeout,
            default_namespace=info.default_namespace,
            proxy=getattr(info, "proxy_url", None),
            trust_env=bool(getattr(info, "trust_env", False)),
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # At most CONNECTIONS open connections: on TLS each holds asyncio's 256 KiB read buffer
            # (about 0.3 MB of RSS), and a burst would otherwise open up to 100.
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True, limit=CONNECTIONS)
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=connector,
                timeout=self._timeout,
                trust_env=self._trust_env,
            )
        return self._session

    async def close(self) -> None:
        reads = [read.task for read in self._reads.values()]
        self._reads.clear()
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[dict[str, Any]] = None,
        body: Any = None,
        content_type: str = "application/json",
        raw: bool = False,
        subject: Optional[str] = None,
    ) -> Any:
        """subject: the object the request is about, for the log of API warnings (default: path)."""
        if method == "GET" and body is None:
            text = await self._shared_get(path, params, raw, subject)
        else:
            self._forget_reads(method, path, body)
            text = await self._send(method, path, params=params, body=body, content_type=content_type,
                                    raw=raw, subject=subject)
        if raw:
            return text
        return json.loads(text) if text else {}

    def _start_read(
        self, path: str, params: Optional[dict[str, Any]], raw: bool, subject: Optional[str],
    ) -> tuple[tuple[str, tuple[tuple[str, str], ...], bool], _Read]:
        """The GET of `path` in flight (started now if none is)."""
        key = (path, tuple(sorted((str(k), str(v)) for k, v in (params or {}).items())), raw)
        read = self._reads.get(key)
        if read is None:
            read = self._reads[key] = _Read(
                asyncio.ensure_future(self._send("GET", path, params=params, raw=raw, subject=subject)))
            read.task.add_done_callback(functools.partial(self._read_done, key, read))
        return key, read

    async def _shared_get(
        self, path: str, params: Optional[dict[str, Any]], raw: bool, subject: Optional[str],
    ) -> str:
        key, read = self._start_read(path, params, raw, subject)
        read.waiters += 1
        try:
            # shielded: a caller that is cancelled does not cancel the read of the others ...
            return await asyncio.shield(read.task)
        finally:
            read.waiters -= 1
            if read.waiters == 0 and not read.task.done():
                # ... but the last one does: nobody waits for the answer (and nobody joins it now)
                if self._reads.get(key) is read:
                    del self._reads[key]
                read.task.cancel()

    def _read_done(self, key: tuple[str, tuple[tuple[str, str], ...], bool], read: "_Read", task: asyncio.Future[str]) -> None:
        if self._reads.get(key) is read:
            del self._reads[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter that is left gets it raised

    def _forget_reads(self, method: str, path: str, body: Any) -> None:
        """A write to `path` (POST: to the object named in `body`): later GETs of what it may
        change do not join a read in flight that started before it."""
        if not self._reads:
            return
        target = path
        name = ((body.get("metadata") or {}).get("name") if isinstance(body, dict) else None)
        if method == "POST" and name:
            target = f"{path}/{quote(str(name), safe='')}"
        for key in [k for k in self._reads if k[0] == target or target.startswith(k[0] + "/")
                    or k[0].startswith(target + "/")]:
            del self._reads[key]

    async def _send(
        self, method: str, path: str, *, params: Optional[dict[str, Any]] = None, body: Any = None,
        content_type: str = "application/json", raw: bool = False, subject: Optional[str] = None,
    ) -> str:
        session = self._get_session()
        headers = {"Accept": "*/*" if raw else "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        try:
            async with session.request(
                method, self.server + path, params=params, data=data, headers=headers,
                proxy=self._proxy,
            ) as rsp:
                self._note_warnings(method, subject or path, parse_warnings(rsp.headers.getall("Warning", [])))
                text = await rsp.text()
                if rsp.status >= 400:
                    raise _error(rsp.status, text)
        except ApiError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ApiError(0, type(e).__name__, str(e) or repr(e)) from e
        return text

    # --- verbs

    async def get(
        self, api_version: str, kind: str, name: str, namespace: Optional[str] = None
    ) -> Optional[dict[str, Any]]:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", resource_path(api_version, kind, namespace, name))
        except NotFound:
            return None

    async def get_recent(
        self, api_version: str, kind: str, name: str, namespace: Optional[str] = None
    ) -> Optional[dict[str, Any]]:
        """The object as the API server's watch cache has it (``resourceVersion=0``: no read from
        etcd; about 1 ms less than :meth:`get` on kube-apiserver 1.36), at most as old as the
        cache lags behind etcd (milliseconds), like any read is by the time it is used. Absence
        is never taken from the cache: a 404 there is read again from etcd (an object created
        just before may not be in the cache yet). None when it does not exist."""
        try:
            return await self.request("GET", resource_path(api_version, kind, namespace, name), params=dict(RECENT))
        except NotFound:
            return await self.get(api_version, kind, name, namespace)

    def read_ahead(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> None:
        """Start the read a coming :meth:`get_recent` of this object makes: that call then joins
        the GET in flight instead of sending its own. Nothing waits for it here; a read nobody
        joins finishes and is dropped (nothing keeps its answer: a later call reads again).
        Only in a running event loop (the one the client belongs to)."""
        self._start_read(resource_path(api_version, kind, namespace, name), dict(RECENT), False, None)

    async def list(
        self,
        api_version: str,
        kind: str,
        namespace: Optional[str] = None,
        *,
        label_selector: Optional[str | dict[str, str]] = None,
        field_selector: Optional[str | dict[str, str]] = None,
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {}
        if isinstance(label_selector, dict):
            label_selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        if label_selector:
            params["labelSelector"] = label_selector
        if isinstance(field_selector, dict):
            field_selector = ",".join(f"{k}={v}" for k, v in field_selector.items())
        if field_selector:
            params["fieldSelector"] = field_selector
        out = await self.request("GET", resource_path(api_version, kind, namespace), params=params)
        items = out.get("items") or []
        for item in items:  # list items come without apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    async def create(
        self, obj: dict[str, Any], namespace: Optional[str] = None
    ) -> tuple[dict[str, Any], bool]:
        """(object, created). A 409 (it already exists) is success: (the sent object, False)."""
        ns = namespace or (obj.get("metadata") or {}).get("namespace")
        path = resource_path(obj["apiVersion"], obj["kind"], ns)
        meta = obj.get("metadata") or {}
        subject = f"{obj['kind']} {ns + '/' if ns else ''}{meta.get('name') or meta.get('generateName') or ''}"
        try:
            return await self.request("POST", path, body=obj, subject=subject), True
        except Conflict:
            return obj, False

    async def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: Optional[str],
        patch: dict[str, Any],
        *,
        subresource: Optional[str] = None,
        strategic: bool = False,
    ) -> dict[str, Any]:
        path = resource_path(api_version, kind, namespace, name, subresource)
        ctype = STRATEGIC_PATCH if strategic else MERGE_PATCH
        subject = f"{kind} {namespace + '/' if namespace else ''}{name}{'/' + subresource if subresource else ''}"
        return await self.request("PATCH", path, body=patch, content_type=ctype, subject=subject)

    async def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: Optional[str] = None,
        *,
        propagation: str = "Background",
    ) -> bool:
        """True if deleted now; False if it was already gone."""
        path = resource_path(api_version, kind, namespace, name)
        try:
            await self.request(
                "DELETE", path,
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation},
            )
            return True
        except NotFound:
            return False

    async def pod_log(
        self,
        namespace: str,
        name: str,
        *,
        container: Optional[str] = None,
        tail_lines: Optional[int] = 100,
        limit_bytes: Optional[int] = 256 * 1024,
        previous: bool = False,
    ) -> str:
        """The tail of a container's log; previous: of its previous (crashed) instance."""
        params: dict[str, Any] = {}
        if container:
            params["container"] = container
        if previous:
            params["previous"] = "true"
        if tail_lines is not None:
            params["tailLines"] = str(tail_lines)
        if limit_bytes is not None:
            params["limitBytes"] = str(limit_bytes)
        path = resource_path("v1", "Pod", namespace, name, "log")
        return await self.request("GET", path, params=params, raw=True)

    async def post_event(
        self,
        involved: dict[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
        component: str = "tuneop",
    ) -> dict[str, Any]:
        """A core/v1 Event about `involved` (kopf.event does the same from handlers)."""
        meta = involved.get("metadata") or {}
        ns = meta.get("namespace") or self.default_namespace or "default"
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        ref = {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": ns,
        }
        if meta.get("uid"):
            ref["uid"] = meta["uid"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'tuneop')}.", "namespace": ns},
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "involvedObject": ref,
            "source": {"component": component},
            "reportingComponent": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        out, _ = await self.create(event, ns)
        return out


# --- the operator's connection (set by the login handler)

_connection: Any = None
_clients: dict[int, tuple[asyncio.AbstractEventLoop, KubeClient]] = {}
_timeout: float = DEFAULT_TIMEOUT


def _close_soon(session: aiohttp.ClientSession) -> None:
    """Schedule closing `session` on the running loop it belongs to (called in that loop's thread)."""
    asyncio.ensure_future(session.close())


def set_connection(info: Any, *, timeout: Optional[float] = None) -> None:
    """Remember kopf's ConnectionInfo; clients built from an older one are replaced."""
    global _connection, _timeout
    _connection = info
    if timeout is not None:
        _timeout = timeout
    for _, (loop, c) in list(_clients.items()):
        if not loop.is_closed() and c._session is not None:
            session = c._session
            c._session = None
            try:
                if loop.is_running():
                    loop.call_soon_threadsafe(_close_soon, session)
            except RuntimeError:
                pass
    _clients.clear()


def connection() -> Any:
    return _connection


def client() -> KubeClient:
    """The client for the running event loop (created from the login's ConnectionInfo)."""
    if _connection is None:
        raise RuntimeError("no Kubernetes credentials yet: kopf's login handler has not run")
    loop = asyncio.get_running_loop()
    entry = _clients.get(id(loop))
    if entry is None or entry[0] is not loop:
        entry = (loop, KubeClient.from_connection(_connection, timeout=_timeout))
        _clients[id(loop)] = entry
    return entry[1]


async def close() -> None:
    """Close the running loop's client (operator cleanup)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    entry = _clients.pop(id(loop), None)
    if entry is not None:
        await entry[1].close()
