"""kube.py against kmock's API server: the verbs the operator uses."""
from __future__ import annotations

import asyncio

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
    (event,) = api.events("Test")
    assert event["involvedObject"] == {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "name": "x", "namespace": NS, "uid": "u"}
    patch = api.requests("PATCH", f"/api/v1/namespaces/{NS}/configmaps/c1")[0]
    assert patch.headers["Content-Type"] == "application/merge-patch+json"


def test_resource_paths() -> None:
    assert kube.resource_path("v1", "Pod", "ns", "p", "log") == "/api/v1/namespaces/ns/pods/p/log"
    assert kube.resource_path("batch/v1", "Job", "ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert (kube.resource_path("tuneop.dev/v1alpha1", "FineTuneJob", "ns", "x", "status")
            == "/apis/tuneop.dev/v1alpha1/namespaces/ns/finetunejobs/x/status")
    assert kube.resource_path("v1", "Namespace", "ignored", "team-a") == "/api/v1/namespaces/team-a"
