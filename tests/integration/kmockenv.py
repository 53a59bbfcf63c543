"""The operator's real kopf loop against kmock (an in-memory Kubernetes API server).

kmock runs in its own thread and event loop; kopf runs in another thread (KopfRunner); the test
itself is synchronous and talks to kmock over HTTP, like kubectl would. Known gaps of kmock that
the tests live with: no garbage collection, no server-side apply, no schema validation, label
selectors are ignored (the operator filters pods itself), watches replay every object on connect.
Three gaps are patched in :class:`Emulator` (resourceVersion bumps, generateName, metadata.uid).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jsonpatch
import jsonpointer
import kmock
import kopf
import pytest
from kopf.testing import KopfRunner

from tuneop import kube
from tuneop.finetunejob import handlers as handlers

NS = "team-a"
FTJ_PATH = "/apis/tuneop.dev/v1alpha1/namespaces/team-a/finetunejobs"

RESOURCES = {
    "tuneop.dev/v1alpha1/finetunejobs": ("FineTuneJob", {"status"}),
    "tuneop.dev/v1alpha1/adapterdeployments": ("AdapterDeployment", {"status"}),
    "apps/v1/deployments": ("Deployment", {"status"}),
    "apps/v1/replicasets": ("ReplicaSet", {"status"}),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", set()),
    "batch/v1/jobs": ("Job", {"status"}),
    "v1/pods": ("Pod", {"status", "log"}),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/secrets": ("Secret", set()),
    "v1/services": ("Service", set()),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", set()),
    "v1/events": ("Event", set()),
    # kopf waits for these two in its discovery (even with scanning disabled).
    "v1/namespaces": ("Namespace", set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", set()),
}
CLUSTER_SCOPED = {"v1/namespaces", "apiextensions.k8s.io/v1/customresourcedefinitions"}

_rv = iter(range(1000, 10**9))


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator made a bit more like a real API server: every write gets a new
    resourceVersion (kopf's optimistic JSON-patch tests then work as in a cluster), a failed
    JSON-patch is a 422 (not a 500), ``generateName`` gets a name (Events do not collide) and a
    created object without ``metadata.uid`` gets one (ownerReferences match by uid)."""

    # (METHOD, path) -> (status, reason, message): refuse such requests, like quota or RBAC would.
    refusals: dict[tuple[str, str], tuple[int, str, str]]

    async def _handle(self, request: Any) -> Any:
        refusal = getattr(self, "refusals", {}).get((str(request.method.value).upper(), request.url.path))
        if refusal is not None:
            status, reason, message = refusal
            raise kmock.KubernetesError(status=status, reason=reason, message=message)
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            rv = str(next(_rv))
            if isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                if request.action == kmock.action.CREATE and not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{rv}"
                if request.action == kmock.action.CREATE and not meta.get("uid"):
                    meta["uid"] = f"uid-{meta.get('name')}-{rv}"  # the API server assigns one to every object
                meta["resourceVersion"] = rv
            elif isinstance(request.data, list):
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
        try:
            return await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e


class KMockThread:
    """kmock's KubernetesEmulator + HTTP server in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="kmock")
        self.url = ""
        self.emulator: Any = None
        self._stop: Optional[asyncio.Event] = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        em = Emulator()
        em.refusals = {}
        for key, (kind, subresources) in RESOURCES.items():
            em.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=key not in CLUSTER_SCOPED, subresources=subresources,
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            )
        self.emulator = em
        async with em, kmock.Server(em) as server:
            self.url = str(server.url).rstrip("/")
            self.ready.set()
            await self._stop.wait()

    def start(self) -> "KMockThread":
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("kmock did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    # --- HTTP, like kubectl

    def call(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=10) as rsp:
                text = rsp.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        try:
            return json.loads(text) if text else None
        except ValueError:
            return text

    def create(self, path: str, obj: dict[str, Any]) -> Any:
        obj.setdefault("metadata", {}).setdefault("namespace", NS)
        obj["metadata"].setdefault("resourceVersion", str(next(_rv)))
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}-{next(_rv)}")
        obj["metadata"].setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        return self.call("POST", path, obj)

    def patch(self, path: str, patch: dict[str, Any]) -> Any:
        # kmock keeps resourceVersion as seeded (it never bumps it); bumping it here would fail
        # kopf's JSON-patch "test resourceVersion" ops with a 500 that a real server answers
        # with a conflict, so the tests leave it alone.
        return self.call("PATCH", path, patch, "application/merge-patch+json")

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def requests(self, method: str, path_prefix: str) -> list[Any]:
        return [
            r for r in list(self.emulator._requests)
            if str(r.method).upper().endswith(method.upper()) and r.url.path.startswith(path_prefix)
        ]

    def wait_watching(self, path: str, timeout: float = 30.0) -> None:
        """Wait until someone (the operator) watches the collection at `path`. Tests that count
        reconciles create their objects after this: kmock replays, at the start of a watch, the
        objects that exist then, and that event may arrive after the operator has already handled
        the object from its listing (a real API server starts the watch at the listing's
        resourceVersion). The handling is idempotent either way; it is one more reconcile."""
        wait_for(lambda: [r for r in self.requests("GET", path) if r.url.path == path and "watch" in str(r.url.query)],
                 timeout, f"a watch of {path}")

    def events(self, reason: Optional[str] = None) -> list[dict[str, Any]]:
        out = []
        for r in self.requests("POST", f"/api/v1/namespaces/{NS}/events"):
            if isinstance(r.data, dict) and (reason is None or r.data.get("reason") == reason):
                out.append(r.data)
        return out


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (KeyError, TypeError, IndexError):
            last = None
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")


@pytest.fixture()
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KMockThread]:
    server = KMockThread().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server.url}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}],
        "current-context": "kmock",
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    try:
        yield server
    finally:
        server.stop()
        kube.set_connection(None)


class Operator:
    """Start/stop the operator (kopf's real loop) against the kmock server."""

    def __init__(self, progress_interval: float = 0.2, retry_interval: float = 0.5,
                 *, args: tuple[str, ...] = (), **config: Any):
        self.progress_interval = progress_interval
        self.retry_interval = retry_interval
        self.args = list(args)
        self.config = config  # more handlers.OperatorConfig fields
        self.runner: Optional[KopfRunner] = None

    def __enter__(self) -> "Operator":
        registry = kopf.OperatorRegistry()
        handlers.register(
            registry,
            handlers.OperatorConfig(
                image="trainer:test",
                progress_interval=self.progress_interval,
                retry_interval=self.retry_interval,
                **self.config,
            ),
        )
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        self.runner = KopfRunner(
            ["run", "--standalone", "--namespace", NS, *self.args], registry=registry, settings=settings,
            timeout=30,
        )
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.runner is not None
        self.runner.__exit__(*exc)


@pytest.fixture()
def operator_factory(api: KMockThread) -> Callable[..., Operator]:
    return Operator
