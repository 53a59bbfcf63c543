"""kube.py against kmock's API server: the verbs the operator uses."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import multidict
import pytest
from aiohttp import web

from kmockenv import NS, KMockThread
from tuneop import kube


def test_kube_client_verbs(api: KMockThread) -> None:
    api.emulator["get", f"/api/v1/namespaces/{NS}/pods/p1/log"] << b"line 1\nline 2\n"

    async def main() -> None:
        kc = kube.KubeClient(api.url, headers={"Authorization": "Bearer t"}, timeout=5)
        try:
            cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c1", "namespace": NS}, "data": {"k": "v"}}
            obj, created = await kc.create(cm)
            assert created and obj["data"] == {"k": "v"}
            _, created = await kc.create(cm)
            assert created is False  # 409: it exists
            assert (await kc.get("v1", "ConfigMap", "c1", NS))["data"] == {"k": "v"}
            assert await kc.get("v1", "ConfigMap", "nope", NS) is None
            await kc.patch("v1", "ConfigMap", "c1", NS, {"data": {"k2": "v2"}})
            assert (await kc.get("v1", "ConfigMap", "c1", NS))["data"] == {"k": "v", "k2": "v2"}
            items = await kc.list("v1", "ConfigMap", NS, label_selector={"a": "b"})
            assert [i["metadata"]["name"] for i in items] == ["c1"]
            assert items[0]["kind"] == "ConfigMap"
            assert await kc.delete("v1", "ConfigMap", "c1", NS) is True
            assert await kc.delete("v1", "ConfigMap", "c1", NS) is False
            assert await kc.pod_log(NS, "p1", container="trainer", tail_lines=10) == "line 1\nline 2\n"
            await kc.pod_log(NS, "p1", container="vllm", tail_lines=5, limit_bytes=4096, previous=True)
            ftj = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x", "namespace": NS, "uid": "u"}}
            await kc.post_event(ftj, type="Normal", reason="Test", message="hello")
            try:
                await kc.request("GET", "/apis/nothing.example.com/v1/namespaces/x/things/y")
            except kube.ApiError as e:
                assert e.status == 404 and not e.retryable
            else:
                raise AssertionError("no error")
        finally:
            await kc.close()

    asyncio.run(main())
    log_req = api.requests("GET", f"/api/v1/namespaces/{NS}/pods/p1/log")[0]
    assert log_req.params == {"container": "trainer", "tailLines": "10", "limitBytes": str(256 * 1024)}
    assert log_req.headers["Authorization"] == "Bearer t"
    prev_req = api.requests("GET", f"/api/v1/namespaces/{NS}/pods/p1/log")[1]
    assert prev_req.params == {"container": "vllm", "tailLines": "5", "limitBytes": "4096", "previous": "true"}
    (event,) = api.events("Test")
    assert event["involvedObject"] == {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "name": "x", "namespace": NS, "uid": "u"}
    patch = api.requests("PATCH", f"/api/v1/namespaces/{NS}/configmaps/c1")[0]
    assert patch.headers["Content-Type"] == "application/merge-patch+json"


def test_identical_reads_in_flight_are_one_request_and_a_write_starts_fresh_ones(api: KMockThread) -> None:
    cm_path = f"/api/v1/namespaces/{NS}/configmaps"

    def server_gets(name: str) -> int:
        return len([r for r in api.requests("GET", f"{cm_path}/{name}") if r.url.path == f"{cm_path}/{name}"])

    async def main() -> None:
        kc = kube.KubeClient(api.url, timeout=5)
        try:
            cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c1", "namespace": NS}, "data": {"k": "v"}}
            await kc.create(cm)
            got = await asyncio.gather(*(kc.get("v1", "ConfigMap", "c1", NS) for _ in range(5)))
            assert [g["data"] for g in got] == [{"k": "v"}] * 5
            assert len({id(g) for g in got}) == 5  # each caller its own object
            assert server_gets("c1") == 1
            assert await asyncio.gather(*(kc.get("v1", "ConfigMap", "nope", NS) for _ in range(3))) == [None] * 3
            assert server_gets("nope") == 1
            # not joined: other parameters (a list with a selector), or a read after it returned
            await asyncio.gather(kc.list("v1", "ConfigMap", NS), kc.list("v1", "ConfigMap", NS, label_selector="a=b"))
            assert len([r for r in api.requests("GET", cm_path) if r.url.path == cm_path]) == 2
            await kc.get("v1", "ConfigMap", "c1", NS)
            assert server_gets("c1") == 2
            # A read in flight when this process writes the object is not joined after the write.
            early = asyncio.ensure_future(kc.get("v1", "ConfigMap", "c1", NS))
            await asyncio.sleep(0)  # it is in flight
            await kc.patch("v1", "ConfigMap", "c1", NS, {"data": {"k": "new"}})
            late = await kc.get("v1", "ConfigMap", "c1", NS)
            assert late["data"] == {"k": "new"}
            await early
            assert server_gets("c1") == 4
            # the same for a create of the object by name
            early = asyncio.ensure_future(kc.get("v1", "ConfigMap", "c2", NS))
            await asyncio.sleep(0)
            await kc.create({**cm, "metadata": {"name": "c2", "namespace": NS}})
            assert (await kc.get("v1", "ConfigMap", "c2", NS)) is not None
            await early
            assert server_gets("c2") == 2
            # A caller that gives up does not cancel the read of the others; the last one does, and
            # a caller after it starts a read of its own.
            first = asyncio.ensure_future(kc.get("v1", "ConfigMap", "c1", NS))
            second = asyncio.ensure_future(kc.get("v1", "ConfigMap", "c1", NS))
            await asyncio.sleep(0)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            assert (await second)["data"] == {"k": "new"}
            lone = asyncio.ensure_future(kc.get("v1", "ConfigMap", "c1", NS))
            await asyncio.sleep(0)
            lone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lone
            assert kc._reads == {}  # nothing left in flight for a later caller to join
            assert (await kc.get("v1", "ConfigMap", "c1", NS))["data"] == {"k": "new"}
            # close() leaves no read running
            left = asyncio.ensure_future(kc.get("v1", "ConfigMap", "c1", NS))
            await asyncio.sleep(0)
            await kc.close()
            assert kc._reads == {} and left.done()
        finally:
            await kc.close()

    asyncio.run(main())


def test_recent_reads_come_from_the_watch_cache_absence_from_etcd_and_a_read_ahead_is_joined(api: KMockThread) -> None:
    cm_path = f"/api/v1/namespaces/{NS}/configmaps"

    def server_gets(name: str) -> list[dict[str, str]]:
        """The parameters of each GET of ConfigMap `name` the API server got."""
        return [dict(r.params) for r in api.requests("GET", f"{cm_path}/{name}") if r.url.path == f"{cm_path}/{name}"]

    async def main() -> None:
        kc = kube.KubeClient(api.url, timeout=5)
        try:
            cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c1", "namespace": NS}, "data": {"k": "v"}}
            await kc.create(cm)
            assert (await kc.get_recent("v1", "ConfigMap", "c1", NS))["data"] == {"k": "v"}
            assert server_gets("c1") == [{"resourceVersion": "0"}]  # served by the watch cache
            # absent in the cache: asked again without resourceVersion (etcd) before it counts
            assert await kc.get_recent("v1", "ConfigMap", "nope", NS) is None
            assert server_gets("nope") == [{"resourceVersion": "0"}, {}]
            # a read ahead is the request the next get_recent joins: one GET for both
            kc.read_ahead("v1", "ConfigMap", "c1", NS)
            await asyncio.sleep(0)  # sent
            assert (await kc.get_recent("v1", "ConfigMap", "c1", NS))["data"] == {"k": "v"}
            assert len(server_gets("c1")) == 2
            # one nobody joins finishes and is dropped: a later read asks again
            kc.read_ahead("v1", "ConfigMap", "c1", NS)
            while kc._reads:
                await asyncio.sleep(0.01)
            assert len(server_gets("c1")) == 3
            await kc.get_recent("v1", "ConfigMap", "c1", NS)
            assert len(server_gets("c1")) == 4
            # a write of the object in between: the read ahead (older than the write) is not joined
            kc.read_ahead("v1", "ConfigMap", "c1", NS)
            await asyncio.sleep(0)
            await kc.patch("v1", "ConfigMap", "c1", NS, {"data": {"k": "new"}})
            assert (await kc.get_recent("v1", "ConfigMap", "c1", NS))["data"] == {"k": "new"}
            assert len(server_gets("c1")) == 6
            # the error (404) of a read ahead nobody joined is dropped with it
            kc.read_ahead("v1", "ConfigMap", "gone", NS)
            while kc._reads:
                await asyncio.sleep(0.01)
            assert server_gets("gone") == [{"resourceVersion": "0"}]
            # close() leaves no read ahead running
            kc.read_ahead("v1", "ConfigMap", "c1", NS)
            await kc.close()
            assert kc._reads == {}
        finally:
            await kc.close()

    asyncio.run(main())


def test_resource_paths() -> None:
    assert kube.resource_path("v1", "Pod", "ns", "p", "log") == "/api/v1/namespaces/ns/pods/p/log"
    assert kube.resource_path("batch/v1", "Job", "ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert (kube.resource_path("tuneop.dev/v1alpha1", "FineTuneJob", "ns", "x", "status")
            == "/apis/tuneop.dev/v1alpha1/namespaces/ns/finetunejobs/x/status")
    assert kube.resource_path("v1", "Namespace", "ignored", "team-a") == "/api/v1/namespaces/team-a"


def test_api_warnings_are_logged_once_per_object_and_captured(caplog: pytest.LogCaptureFixture) -> None:
    """The API server's Warning headers (Pod Security's warn mode puts its refusal there)."""
    psa = ('would violate PodSecurity "restricted:latest": runAsNonRoot != true (pod or container "vllm" '
           'must set securityContext.runAsNonRoot=true)')
    quoted = psa.replace('"', '\\"')
    seen: list[str] = []

    async def create(request: web.Request) -> web.Response:
        obj = await request.json()
        seen.append(obj["metadata"]["name"])
        headers = [("Warning", f'299 - "{quoted}"'),
                   ("Warning", '299 - "spec.template: a, b", 299 - "deprecated field"')]
        return web.json_response(obj, status=201, headers=multidict.CIMultiDict(headers))

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"kind": "Deployment"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post(f"/apis/apps/v1/namespaces/{NS}/deployments", create)
        app.router.add_get(f"/apis/apps/v1/namespaces/{NS}/deployments/d1", get)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        kc = kube.KubeClient(f"http://127.0.0.1:{port}", timeout=5)
        try:
            dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d1", "namespace": NS}}
            with kube.capture_warnings() as warned:
                await kc.create(dep)
            assert warned == [psa, "spec.template: a, b", "deprecated field"]
            assert kc.last_warnings == warned
            with kube.capture_warnings() as again:
                await kc.create(dep)  # the same texts, the same object: captured, not logged again
                await kc.get("apps/v1", "Deployment", "d1", NS)  # no warning: nothing added
            assert again == warned and kc.last_warnings == []
            await kc.create({**dep, "metadata": {"name": "d2", "namespace": NS}})  # another object: logged
            with kube.capture_warnings() as none:
                await kc.get("apps/v1", "Deployment", "d1", NS)
            assert none == []
        finally:
            await kc.close()
            await runner.cleanup()

    with caplog.at_level(logging.WARNING, logger="tuneop.kube"):
        asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records if r.name == "tuneop.kube"]
    assert logged == [
        f"Kubernetes API warning on POST Deployment {NS}/d1: {psa}",
        f"Kubernetes API warning on POST Deployment {NS}/d1: spec.template: a, b",
        f"Kubernetes API warning on POST Deployment {NS}/d1: deprecated field",
        f"Kubernetes API warning on POST Deployment {NS}/d2: {psa}",
        f"Kubernetes API warning on POST Deployment {NS}/d2: spec.template: a, b",
        f"Kubernetes API warning on POST Deployment {NS}/d2: deprecated field",
    ]
    assert seen == ["d1", "d1", "d2"]


def test_parse_warnings() -> None:
    assert kube.parse_warnings(['299 - "a \\"q\\" b"', '299 - "x, y", 299 kube "z" "Sat, 01 Jan 2026 00:00:00 GMT"']) \
        == ['a "q" b', "x, y", "z"]
    assert kube.parse_warnings(["not rfc", "", '299 - "a \\"q\\" b"']) == ["not rfc", 'a "q" b']
