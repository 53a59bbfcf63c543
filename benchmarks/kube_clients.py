"""Drop-in replacements of ``tuneop.kube.KubeClient`` on top of async Kubernetes client libraries,
for ``benchmarks/operator_speed.py`` only (issue #17 item 4: is the hand-written aiohttp client
worth keeping?). Not part of the operator; the libraries are not tuneop dependencies:

    .venv/bin/pip install lightkube kubernetes_asyncio

- :class:`LightkubeClient`: ``lightkube.AsyncClient`` (httpx, msgspec) with *generic* resources
  for every kind tuneop touches (plain dicts in and out, no typed models).
- :class:`KubernetesAsyncioClient`: ``kubernetes_asyncio.client.ApiClient`` (aiohttp) with the
  generated typed APIs (``CoreV1Api.read_namespaced_config_map`` ...) and ``CustomObjectsApi`` for
  tuneop's CRDs, called with ``_preload_content=False`` so that objects stay dicts (the typed
  models would have to be turned back into dicts for the handlers).

Both subclass ``tuneop.kube.KubeClient`` and keep its contract: the same verbs and signatures,
dicts back, ``get`` -> None on 404, ``create`` -> (sent object, False) on 409, ``delete`` -> False on
404, errors as ``kube.ApiError`` / ``NotFound`` / ``Conflict`` with the HTTP status (0: no answer),
API ``Warning`` headers logged and captured as kube.py does. They are built by
``from_connection(kopf.ConnectionInfo)``, i.e. from the same login (kubeconfig, in-cluster service
account, ...) as the hand-written client, and created lazily per event loop by ``kube.client()``.

:func:`install` swaps ``tuneop.kube.KubeClient`` (what ``kube.client()`` instantiates) for one of them;
call it before the operator starts.
"""
from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import os
import tempfile
from typing import Any, Optional

from tuneop import kube

# What the request is about, for the log of API warnings (kube.py's "subject": "Kind ns/name" for
# create and patch, else the path), per asyncio task.
_subject: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("bench_kube_subject", default=None)


def _selector(sel: Optional[str | dict[str, str]]) -> Optional[str]:
    if isinstance(sel, dict):
        return ",".join(f"{k}={v}" for k, v in sel.items()) or None
    return sel or None


def _subject_of(kind: str, namespace: Optional[str], name: str, subresource: Optional[str] = None) -> str:
    return f"{kind} {namespace + '/' if namespace else ''}{name}{'/' + subresource if subresource else ''}"


def _pem(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


class _LibraryClient(kube.KubeClient):
    """What both library-backed clients share: built from kopf's ConnectionInfo; ``_session`` holds
    the library's client (kube.set_connection closes it with ``await _session.close()``)."""

    library = ""

    def __init__(self, info: Any, *, timeout: float = kube.DEFAULT_TIMEOUT):
        super().__init__(
            info.server, headers=info.as_http_headers(), timeout=timeout,
            default_namespace=info.default_namespace, proxy=getattr(info, "proxy_url", None),
            trust_env=bool(getattr(info, "trust_env", False)),
        )
        self.info = info
        self.timeout = timeout
        self._session: Any = None

    @classmethod
    def from_connection(cls, info: Any, *, timeout: float = kube.DEFAULT_TIMEOUT) -> "_LibraryClient":
        return cls(info, timeout=timeout)

    def _make(self) -> Any:
        raise NotImplementedError

    def _get_session(self) -> Any:  # the library's client, made in the running loop
        if self._session is None:
            self._session = self._make()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}: only the verbs go through {self.library}")


# ---------------------------------------------------------------------------------- lightkube


class LightkubeClient(_LibraryClient):
    library = "lightkube"

    def __init__(self, info: Any, *, timeout: float = kube.DEFAULT_TIMEOUT):
        super().__init__(info, timeout=timeout)
        self._resources: dict[tuple[str, str], Any] = {}

    def _make(self) -> Any:
        import httpx2
        import lightkube
        from lightkube.config.kubeconfig import KubeConfig
        from lightkube.config.models import Cluster, User

        # httpx2 logs every request at INFO (kopf's log level): nobody would run an operator so
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        info = self.info
        # The credentials of kopf's login, as kube.py uses them: its Authorization header and its
        # SSL context (an httpx transport with that context; plain http needs none).
        transport = None
        if str(info.server).startswith("https"):
            transport = httpx2.AsyncHTTPTransport(verify=info.as_ssl_context(), trust_env=bool(info.trust_env),
                                                  proxy=info.proxy_url)
        config = KubeConfig.from_one(cluster=Cluster(server=info.server), user=User(),
                                     namespace=info.default_namespace)
        client = lightkube.AsyncClient(
            config, namespace=info.default_namespace, timeout=httpx2.Timeout(self.timeout),
            trust_env=bool(info.trust_env), transport=transport,
            proxy=None if transport is not None else info.proxy_url,
        )
        http = client._client._client  # the httpx2.AsyncClient lightkube made
        http.headers.update({"User-Agent": "tuneop", **info.as_http_headers()})
        http.event_hooks = {**http.event_hooks, "response": [*http.event_hooks.get("response", []), self._on_response]}
        return client

    async def _on_response(self, response: Any) -> None:
        texts = kube.parse_warnings(response.headers.get_list("Warning"))
        self._note_warnings(response.request.method, _subject.get() or response.request.url.path, texts)

    def _res(self, api_version: str, kind: str) -> Any:
        """A lightkube generic resource class (dict objects) for every kind in kube.RESOURCES."""
        res = self._resources.get((api_version, kind))
        if res is None:
            from lightkube import generic_resource as g
            from lightkube.core.resource_registry import resource_registry

            try:
                plural, namespaced = kube.RESOURCES[(api_version, kind)]
            except KeyError:
                raise ValueError(f"unknown resource {api_version} {kind}; add it to kube.RESOURCES") from None
            group, _, version = api_version.rpartition("/")
            make = g.create_namespaced_resource if namespaced else g.create_global_resource
            try:
                res = make(group, version, kind, plural)
            except ValueError:  # already registered (another client in this process)
                res = resource_registry.get(api_version, kind)
            self._resources[(api_version, kind)] = res
        return res

    async def _call(self, subject: str, coro: Any) -> Any:
        import httpx2

        token = _subject.set(subject)
        try:
            return await coro
        except httpx2.HTTPStatusError as e:  # lightkube.ApiError is one too
            raise kube._error(e.response.status_code, e.response.text) from e
        except httpx2.RequestError as e:  # no answer: connection, timeout
            raise kube.ApiError(0, type(e).__name__, str(e) or repr(e)) from e
        finally:
            _subject.reset(token)

    # --- verbs

    async def get(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> Optional[dict[str, Any]]:
        lk = self._get_session()
        try:
            obj = await self._call(kube.resource_path(api_version, kind, namespace, name),
                                   lk.get(self._res(api_version, kind), name, namespace=namespace))
        except kube.NotFound:
            return None
        return dict(obj)

    async def list(self, api_version: str, kind: str, namespace: Optional[str] = None, *,
                   label_selector: Optional[str | dict[str, str]] = None,
                   field_selector: Optional[str | dict[str, str]] = None) -> list[dict[str, Any]]:
        from lightkube.core.generic_client import ALL_NS

        lk = self._get_session()
        res = self._res(api_version, kind)
        _, namespaced = kube.RESOURCES[(api_version, kind)]
        ns = (namespace or ALL_NS) if namespaced else None
        if isinstance(label_selector, str) or isinstance(field_selector, str):
            # lightkube takes dict selectors; a string one goes as the raw query parameter
            br = lk._client.prepare_request("list", res, namespace=ns, params={
                "labelSelector": _selector(label_selector), "fieldSelector": _selector(field_selector)})
            listing = lk._client.list(br)
        else:
            listing = lk.list(res, namespace=ns, labels=label_selector or None, fields=field_selector or None)

        async def collect() -> list[dict[str, Any]]:
            return [dict(o) async for o in listing]

        items = await self._call(kube.resource_path(api_version, kind, namespace), collect())
        for item in items:  # list items come without apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    async def create(self, obj: dict[str, Any], namespace: Optional[str] = None) -> tuple[dict[str, Any], bool]:
        lk = self._get_session()
        meta = obj.get("metadata") or {}
        ns = namespace or meta.get("namespace")
        res = self._res(obj["apiVersion"], obj["kind"])
        try:
            out = await self._call(_subject_of(obj["kind"], ns, meta.get("name") or meta.get("generateName") or ""),
                                   lk.create(res(obj), namespace=ns))
        except kube.Conflict:
            return obj, False
        return dict(out), True

    async def patch(self, api_version: str, kind: str, name: str, namespace: Optional[str], patch: dict[str, Any], *,
                    subresource: Optional[str] = None, strategic: bool = False) -> dict[str, Any]:
        from lightkube.types import PatchType

        lk = self._get_session()
        res = self._res(api_version, kind)
        if subresource == "status":
            res = res.Status
        elif subresource:
            raise ValueError(f"subresource {subresource!r} is not supported here")
        out = await self._call(_subject_of(kind, namespace, name, subresource),
                               lk.patch(res, name, patch, namespace=namespace,
                                        patch_type=PatchType.STRATEGIC if strategic else PatchType.MERGE))
        return dict(out)

    async def delete(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None, *,
                     propagation: str = "Background") -> bool:
        from lightkube.types import CascadeType

        lk = self._get_session()
        try:
            await self._call(kube.resource_path(api_version, kind, namespace, name),
                             lk.delete(self._res(api_version, kind), name, namespace=namespace,
                                       cascade=CascadeType(propagation)))
            return True
        except kube.NotFound:
            return False

    async def pod_log(self, namespace: str, name: str, *, container: Optional[str] = None,
                      tail_lines: Optional[int] = 100, limit_bytes: Optional[int] = 256 * 1024,
                      previous: bool = False) -> str:
        # AsyncClient.log() has no `previous` nor `limitBytes`: the same request, built by lightkube
        from lightkube.resources.core_v1 import PodLog

        lk = self._get_session()
        br = lk._client.prepare_request("get", PodLog, name=name, namespace=namespace, params={
            "container": container, "previous": "true" if previous else None,
            "tailLines": tail_lines, "limitBytes": limit_bytes,
        })

        async def fetch() -> str:
            resp = await lk._client.send(lk._client.build_adapter_request(br))
            resp.raise_for_status()
            return resp.text

        return await self._call(kube.resource_path("v1", "Pod", namespace, name, "log"), fetch())


# ---------------------------------------------------------------------------------- kubernetes_asyncio

# (apiVersion, kind) -> (typed API class, snake_case kind) for the built-in kinds of kube.RESOURCES;
# the rest (tuneop's CRDs) go through CustomObjectsApi.
TYPED = {
    ("v1", "ConfigMap"): ("CoreV1Api", "config_map"),
    ("v1", "Secret"): ("CoreV1Api", "secret"),
    ("v1", "Pod"): ("CoreV1Api", "pod"),
    ("v1", "PersistentVolumeClaim"): ("CoreV1Api", "persistent_volume_claim"),
    ("v1", "Service"): ("CoreV1Api", "service"),
    ("v1", "Event"): ("CoreV1Api", "event"),
    ("v1", "Namespace"): ("CoreV1Api", "namespace"),
    ("batch/v1", "Job"): ("BatchV1Api", "job"),
    ("apps/v1", "Deployment"): ("AppsV1Api", "deployment"),
    ("apps/v1", "ReplicaSet"): ("AppsV1Api", "replica_set"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("AutoscalingV2Api", "horizontal_pod_autoscaler"),
}


class KubernetesAsyncioClient(_LibraryClient):
    library = "kubernetes_asyncio"

    def __init__(self, info: Any, *, timeout: float = kube.DEFAULT_TIMEOUT):
        super().__init__(info, timeout=timeout)
        self._apis: dict[str, Any] = {}
        self._tmp: list[str] = []

    def _tmpfile(self, data: str | bytes) -> str:
        fd, path = tempfile.mkstemp(prefix="tuneop-bench-", suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(_pem(data))
        self._tmp.append(path)
        return path

    def _make(self) -> Any:
        from kubernetes_asyncio import client as k

        info = self.info
        cfg = k.Configuration()
        cfg.host = str(info.server).rstrip("/")
        # kopf's login, as kube.py uses it: CA, client certificate, insecure, proxy, Authorization
        cfg.verify_ssl = not info.insecure
        if info.ca_path or info.ca_data:
            cfg.ssl_ca_cert = str(info.ca_path) if info.ca_path else self._tmpfile(info.ca_data)
        if info.certificate_path or info.certificate_data:
            cfg.cert_file = str(info.certificate_path) if info.certificate_path else self._tmpfile(info.certificate_data)
        if info.private_key_path or info.private_key_data:
            cfg.key_file = str(info.private_key_path) if info.private_key_path else self._tmpfile(info.private_key_data)
        cfg.proxy = info.proxy_url
        api = k.ApiClient(cfg)
        api.user_agent = "tuneop"
        api.default_headers.update(info.as_http_headers())
        self._apis = {"ApiClient": api}
        return api

    async def close(self) -> None:
        await super().close()
        for path in self._tmp:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._tmp.clear()

    def _api(self, name: str) -> Any:
        api = self._get_session()
        out = self._apis.get(name)
        if out is None or self._apis.get("ApiClient") is not api:
            from kubernetes_asyncio import client as k

            if self._apis.get("ApiClient") is not api:
                self._apis = {"ApiClient": api}
            out = self._apis[name] = getattr(k, name)(api)
        return out

    def _method(self, api_version: str, kind: str, verb: str) -> tuple[Any, tuple[Any, ...], bool]:
        """(bound method, leading args, namespaced) for verb in read/list/create/patch/patch_status/delete."""
        try:
            plural, namespaced = kube.RESOURCES[(api_version, kind)]
        except KeyError:
            raise ValueError(f"unknown resource {api_version} {kind}; add it to kube.RESOURCES") from None
        typed = TYPED.get((api_version, kind))
        if typed is None:
            group, _, version = api_version.rpartition("/")
            api = self._api("CustomObjectsApi")
            name = {"read": "get", "patch_status": "patch"}.get(verb, verb)
            scope = "namespaced" if namespaced else "cluster"
            suffix = "_status" if verb == "patch_status" else ""
            return getattr(api, f"{name}_{scope}_custom_object{suffix}"), (group, version, plural), namespaced
        cls, snake = typed
        api = self._api(cls)
        base, suffix = ("patch", "_status") if verb == "patch_status" else (verb, "")
        scope = "namespaced_" if namespaced else ""
        return getattr(api, f"{base}_{scope}{snake}{suffix}"), (), namespaced

    async def _call(self, subject: str, method: str, coro: Any, *, raw: bool = False) -> Any:
        import json

        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            rsp = await coro  # _preload_content=False: aiohttp's response, status not checked
            try:
                self._note_warnings(method, subject, kube.parse_warnings(rsp.headers.getall("Warning", [])))
                text = await rsp.text()
            finally:
                rsp.release()
        except ApiException as e:
            raise kube._error(e.status or 0, e.body if isinstance(e.body, str) else str(e.reason or "")) from e
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise kube.ApiError(0, type(e).__name__, str(e) or repr(e)) from e
        if rsp.status >= 400:
            raise kube._error(rsp.status, text)
        if raw:
            return text
        return json.loads(text) if text else {}

    def _opts(self) -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": self.timeout}

    # --- verbs

    async def get(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> Optional[dict[str, Any]]:
        fn, lead, namespaced = self._method(api_version, kind, "read")
        if lead:  # custom object: (group, version, [namespace,] plural, name)
            args = (lead[0], lead[1], *((namespace,) if namespaced else ()), lead[2], name)
        else:
            args = (name, namespace) if namespaced else (name,)
        try:
            return await self._call(kube.resource_path(api_version, kind, namespace, name), "GET", fn(*args, **self._opts()))
        except kube.NotFound:
            return None

    async def list(self, api_version: str, kind: str, namespace: Optional[str] = None, *,
                   label_selector: Optional[str | dict[str, str]] = None,
                   field_selector: Optional[str | dict[str, str]] = None) -> list[dict[str, Any]]:
        kw: dict[str, Any] = {**self._opts()}
        if _selector(label_selector):
            kw["label_selector"] = _selector(label_selector)
        if _selector(field_selector):
            kw["field_selector"] = _selector(field_selector)
        fn, lead, namespaced = self._method(api_version, kind, "list")
        if lead:
            if namespaced and namespace:
                coro = fn(lead[0], lead[1], namespace, lead[2], **kw)
            else:
                coro = self._api("CustomObjectsApi").list_cluster_custom_object(*lead, **kw)
        elif namespaced and not namespace:
            snake = TYPED[(api_version, kind)][1]
            coro = getattr(self._api(TYPED[(api_version, kind)][0]), f"list_{snake}_for_all_namespaces")(**kw)
        else:
            coro = fn(namespace, **kw) if namespaced else fn(**kw)
        out = await self._call(kube.resource_path(api_version, kind, namespace), "GET", coro)
        items = out.get("items") or []
        for item in items:  # list items come without apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    async def create(self, obj: dict[str, Any], namespace: Optional[str] = None) -> tuple[dict[str, Any], bool]:
        meta = obj.get("metadata") or {}
        ns = namespace or meta.get("namespace")
        fn, lead, namespaced = self._method(obj["apiVersion"], obj["kind"], "create")
        if lead:
            args = (lead[0], lead[1], *((ns,) if namespaced else ()), lead[2], obj)
        else:
            args = (ns, obj) if namespaced else (obj,)
        subject = _subject_of(obj["kind"], ns, meta.get("name") or meta.get("generateName") or "")
        try:
            return await self._call(subject, "POST", fn(*args, **self._opts())), True
        except kube.Conflict:
            return obj, False

    async def patch(self, api_version: str, kind: str, name: str, namespace: Optional[str], patch: dict[str, Any], *,
                    subresource: Optional[str] = None, strategic: bool = False) -> dict[str, Any]:
        if subresource not in (None, "status"):
            raise ValueError(f"subresource {subresource!r} is not supported here")
        fn, lead, namespaced = self._method(api_version, kind, "patch_status" if subresource else "patch")
        if lead:
            args = (lead[0], lead[1], *((namespace,) if namespaced else ()), lead[2], name, patch)
        else:
            args = (name, namespace, patch) if namespaced else (name, patch)
        ctype = kube.STRATEGIC_PATCH if strategic else kube.MERGE_PATCH
        return await self._call(_subject_of(kind, namespace, name, subresource), "PATCH",
                                fn(*args, _content_type=ctype, **self._opts()))

    async def delete(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None, *,
                     propagation: str = "Background") -> bool:
        fn, lead, namespaced = self._method(api_version, kind, "delete")
        if lead:
            args = (lead[0], lead[1], *((namespace,) if namespaced else ()), lead[2], name)
        else:
            args = (name, namespace) if namespaced else (name,)
        try:
            await self._call(kube.resource_path(api_version, kind, namespace, name), "DELETE",
                             fn(*args, propagation_policy=propagation, **self._opts()))
            return True
        except kube.NotFound:
            return False

    async def pod_log(self, namespace: str, name: str, *, container: Optional[str] = None,
                      tail_lines: Optional[int] = 100, limit_bytes: Optional[int] = 256 * 1024,
                      previous: bool = False) -> str:
        kw: dict[str, Any] = {**self._opts()}
        if container:
            kw["container"] = container
        if previous:
            kw["previous"] = "true"  # a Python True goes on the wire as "True" (Go's ParseBool takes both)
        if tail_lines is not None:
            kw["tail_lines"] = tail_lines
        if limit_bytes is not None:
            kw["limit_bytes"] = limit_bytes
        return await self._call(kube.resource_path("v1", "Pod", namespace, name, "log"), "GET",
                                self._api("CoreV1Api").read_namespaced_pod_log(name, namespace, **kw), raw=True)


class KubernetesAsyncioNoEnvClient(KubernetesAsyncioClient):
    """kubernetes_asyncio's aiohttp session is made with trust_env=True (not configurable): every
    request then looks up ~/.netrc and the proxy variables, each in a thread. This variant turns it
    off through a private attribute, to tell that cost from the rest (micro benchmark only)."""

    def _make(self) -> Any:
        api = super()._make()
        api.rest_client.pool_manager._trust_env = bool(self.info.trust_env)
        return api


CLIENTS: dict[str, type[kube.KubeClient]] = {
    "tuneop": kube.KubeClient,
    "lightkube": LightkubeClient,
    "kubernetes_asyncio": KubernetesAsyncioClient,
    "kubernetes_asyncio-noenv": KubernetesAsyncioNoEnvClient,
}


def install(name: str) -> type[kube.KubeClient]:
    """Make ``kube.client()`` build `name`'s client from now on (before the operator starts)."""
    cls = CLIENTS[name]
    kube.set_connection(kube.connection())  # drop clients made before, if any
    kube.KubeClient = cls  # type: ignore[misc]  # kube.client() looks the name up at each call
    return cls
