"""Do the library-backed clients of benchmarks/kube_clients.py behave like tuneop.kube.KubeClient?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kube_clients_check.py [lightkube kubernetes_asyncio]

Each client runs the same script of calls (every verb the operator uses: get / list with label and
field selectors / create + 409 / merge, strategic and status patches / delete + 404 / pod log /
post_event / refused request / no server) against a fresh kmock (tests/integration/kmockenv.py),
logged in through kopf's ConnectionInfo like the operator; the answers (less resourceVersion,
uid and generated names) must equal the hand-written client's. Exit status 1 on any difference.
"""
from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))

NS = "team-a"
VOLATILE = {"resourceVersion", "uid", "creationTimestamp", "managedFields"}


def clean(v: Any) -> Any:
    if isinstance(v, dict):
        out = {k: clean(x) for k, x in v.items() if k not in VOLATILE}
        if isinstance(out.get("name"), str) and "generateName" in out:
            out["name"] = out["generateName"] + "*"
        if "firstTimestamp" in out:
            out["firstTimestamp"] = out["lastTimestamp"] = "*"
        return out
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, str):  # kmock's pod "log" is the pod's JSON
        return re.sub(r'"(uid|resourceVersion)": "[^"]*"', r'"\1": "*"', v)
    return v


async def script(kc: Any, kube: Any, server: Any) -> list[Any]:
    out: list[Any] = []

    async def step(label: str, coro: Any) -> None:
        try:
            r = await coro
            out.append((label, clean(r)))
        except kube.ApiError as e:
            out.append((label, f"{type(e).__name__} {e.status} {e.reason}"))
        except Exception as e:  # noqa: BLE001
            out.append((label, f"UNEXPECTED {type(e).__name__}: {e}"))

    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c1", "namespace": NS, "labels": {"a": "1"}},
          "data": {"k": "v"}}
    await step("create", kc.create(cm))
    await step("create again (409)", kc.create(dict(cm)))
    await step("create cm2 ns arg", kc.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c2", "labels": {"a": "2"}}}, NS))
    await step("get", kc.get("v1", "ConfigMap", "c1", NS))
    await step("get missing", kc.get("v1", "ConfigMap", "nope", NS))
    await step("list", kc.list("v1", "ConfigMap", NS))
    await step("list label dict", kc.list("v1", "ConfigMap", NS, label_selector={"a": "1"}))
    await step("list label str", kc.list("v1", "ConfigMap", NS, label_selector="a=1"))
    await step("list field dict", kc.list("v1", "Event", NS, field_selector={"involvedObject.kind": "Pod", "type": "Warning"}))
    await step("merge patch", kc.patch("v1", "ConfigMap", "c1", NS, {"data": {"k2": "v2"}}))
    await step("strategic patch", kc.patch("v1", "ConfigMap", "c1", NS, {"data": {"k3": "v3"}}, strategic=True))
    await step("patch missing", kc.patch("v1", "ConfigMap", "nope", NS, {"data": {}}))
    ftj = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "f1", "namespace": NS},
           "spec": {"backend": "kubernetes"}}
    await step("create CR", kc.create(ftj))
    await step("patch CR status", kc.patch("tuneop.dev/v1alpha1", "FineTuneJob", "f1", NS, {"status": {"phase": "Running"}},
                                           subresource="status"))
    await step("get CR", kc.get("tuneop.dev/v1alpha1", "FineTuneJob", "f1", NS))
    await step("list CR", kc.list("tuneop.dev/v1alpha1", "FineTuneJob", NS))
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j1", "namespace": NS},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}], "restartPolicy": "Never"}}}}
    await step("create Job", kc.create(job))
    await step("get Job", kc.get("batch/v1", "Job", "j1", NS))
    await step("delete Job", kc.delete("batch/v1", "Job", "j1", NS))
    await step("delete Job again", kc.delete("batch/v1", "Job", "j1", NS))
    await step("get Job deleted", kc.get("batch/v1", "Job", "j1", NS))
    await step("create Deployment", kc.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d1", "namespace": NS}, "spec": {"replicas": 1}}))
    await step("patch Deployment", kc.patch("apps/v1", "Deployment", "d1", NS, {"spec": {"replicas": 2}}))
    await step("create HPA", kc.create({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h1", "namespace": NS}, "spec": {"maxReplicas": 2}}))
    await step("delete HPA", kc.delete("autoscaling/v2", "HorizontalPodAutoscaler", "h1", NS))
    await step("list ReplicaSets", kc.list("apps/v1", "ReplicaSet", NS, label_selector={"x": "y"}))
    await step("create Pod", kc.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "namespace": NS}, "spec": {}}))
    await step("pod log", kc.pod_log(NS, "p1", container="c", previous=True, tail_lines=10))
    await step("pod log missing pod", kc.pod_log(NS, "nope"))
    await step("post_event", kc.post_event(ftj, type="Normal", reason="Test", message="hello"))
    await step("list pods all namespaces", kc.list("v1", "Pod"))
    await step("list namespaces", kc.list("v1", "Namespace"))
    server.emulator.refusals[("POST", f"/api/v1/namespaces/{NS}/secrets")] = (403, "Forbidden", "refused by the check")
    await step("refused create (403)", kc.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1", "namespace": NS}}))
    await step("get with kube.client()", kube.client().get("v1", "ConfigMap", "c1", NS))
    out.append(("client class", type(kube.client()).__name__))
    return out


async def unreachable(kube: Any, cls: Any) -> str:
    import kopf

    kc = cls.from_connection(kopf.ConnectionInfo(server="http://127.0.0.1:9", token="x", scheme="Bearer"), timeout=3)
    try:
        await kc.get("v1", "ConfigMap", "x", NS)
        return "no error"
    except kube.ApiError as e:
        return f"{type(e).__name__} {e.status}"
    except Exception as e:  # noqa: BLE001
        return f"UNEXPECTED {type(e).__name__}: {e}"
    finally:
        await kc.close()


async def warnings_and_auth(kube: Any, cls: Any) -> Any:
    """API Warning headers (logged once, captured per task) and kopf's Authorization header, seen
    by a bare aiohttp server (kmock sends no warnings)."""
    import kopf
    from aiohttp import web

    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path} {request.headers.get('Authorization')} {request.headers.get('User-Agent')}")
        return web.json_response({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w"}}, headers={
            "Warning": '299 - "would violate PodSecurity \\"restricted:latest\\": x", 299 - "second"'})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    kc = cls.from_connection(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token="tok", scheme="Bearer"))
    try:
        with kube.capture_warnings() as got:
            await kc.get("v1", "ConfigMap", "w", NS)
            await kc.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w", "namespace": NS}})
        return {"captured": got, "last": kc.last_warnings, "logged_once": sorted(kc._warned), "requests": seen}
    finally:
        await kc.close()
        await runner.cleanup()


def run_one(name: str) -> list[Any]:
    import kopf

    import kube_clients
    from kmockenv import KMockThread
    from tuneop import kube

    server = KMockThread().start()
    try:
        cls = kube_clients.install(name)

        async def main() -> list[Any]:
            kube.set_connection(kopf.ConnectionInfo(server=server.url, token="bench", scheme="Bearer", default_namespace=NS))
            kc = cls.from_connection(kube.connection())
            try:
                out = await script(kc, kube, server)
            finally:
                await kc.close()
                await kube.close()
            out.append(("no server", await unreachable(kube, cls)))
            out.append(("warnings and auth", await warnings_and_auth(kube, cls)))
            return out

        return asyncio.run(main())
    finally:
        server.stop()


def main() -> int:
    names = [a for a in sys.argv[1:] if a != "-v"] or ["lightkube", "kubernetes_asyncio"]
    names += ["-v"] if "-v" in sys.argv[1:] else []
    want = run_one("tuneop")
    if "-v" in names:
        names.remove("-v")
        for label, w in want:
            print(f"  tuneop {label}: {json.dumps(w)[:160]}")
    bad = 0
    for name in names:
        got = run_one(name)
        diffs = [(w[0], w[1], g[1]) for w, g in zip(want, got) if w != g and w[0] != "client class"]
        print(f"{name}: {len(want) - len(diffs)}/{len(want)} steps as tuneop.kube.KubeClient")
        for label, w, g in diffs:
            bad += 1
            print(f"  {label}:\n    tuneop: {json.dumps(w)[:400]}\n    {name}: {json.dumps(g)[:400]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
