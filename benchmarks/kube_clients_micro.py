"""Client-side CPU per API call of tuneop.kube.KubeClient vs the library-backed clients of
benchmarks/kube_clients.py, against a canned-answer aiohttp server in another process (so this
process's CPU time is the client's alone; kmock would dominate the operator benchmark's figures).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kube_clients_micro.py [--calls 500]

Each verb is called --calls times one after the other (as a reconcile does), and 8 at a time
(as a burst does); the answers are a FineTuneJob-sized object (~2 KB of JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

OBJ = {
    "apiVersion": "batch/v1", "kind": "Job",
    "metadata": {"name": "x-train", "namespace": "team-a", "uid": "u" * 36, "resourceVersion": "12345",
                 "labels": {f"tuneop.dev/l{i}": f"value-{i}" for i in range(8)},
                 "ownerReferences": [{"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "name": "x",
                                      "uid": "v" * 36, "controller": True}]},
    "spec": {"backoffLimit": 2, "template": {"spec": {"restartPolicy": "Never", "containers": [{
        "name": "trainer", "image": "ghcr.io/tuneop/trainer:latest",
        "command": ["python", "-m", "tuneop.trainer", "--config", "/etc/tuneop/job.json"],
        "env": [{"name": f"E{i}", "value": "v" * 40} for i in range(12)],
        "resources": {"limits": {"cpu": "4", "memory": "16Gi"}}}]}}},
    "status": {"active": 1, "conditions": [{"type": "Ready", "status": "True", "message": "m" * 200}]},
}


def serve(port_q: Any) -> None:
    from aiohttp import web

    body = json.dumps(OBJ).encode()
    missing = json.dumps({"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}).encode()

    async def handler(request: web.Request) -> web.Response:
        if request.method in ("POST", "PATCH"):
            await request.read()
        if request.path.endswith("/missing"):
            return web.Response(body=missing, status=404, content_type="application/json")
        if request.method == "GET" and not request.match_info["tail"].split("/")[-1].endswith("-train"):
            return web.Response(body=json.dumps({"kind": "JobList", "items": [OBJ] * 3}).encode(),
                                content_type="application/json")
        return web.Response(body=body, status=201 if request.method == "POST" else 200, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


async def measure(name: str, url: str, calls: int) -> dict[str, float]:
    import kopf

    import kube_clients
    from tuneop import kube

    cls = kube_clients.CLIENTS[name]
    kc = cls.from_connection(kopf.ConnectionInfo(server=url, token="t", scheme="Bearer", default_namespace="team-a"))
    ns = "team-a"
    verbs = {
        "get": lambda i: kc.get("batch/v1", "Job", f"j{i}-train", ns),
        "get 404": lambda i: kc.get("batch/v1", "Job", "missing", ns),
        "list": lambda i: kc.list("batch/v1", "Job", ns, label_selector={"tuneop.dev/finetunejob": "x"}),
        "create": lambda i: kc.create(dict(OBJ, metadata=dict(OBJ["metadata"], name=f"j{i}-train"))),
        "patch status": lambda i: kc.patch("tuneop.dev/v1alpha1", "FineTuneJob", f"f{i}", ns,
                                           {"status": {"phase": "Running", "message": "m" * 100}}, subresource="status"),
    }
    out: dict[str, float] = {}
    try:
        for _ in range(20):  # warm-up: connections, imports
            await kc.get("batch/v1", "Job", "w-train", ns)
        for verb, call in verbs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for i in range(calls):
                await call(i)
            out[f"{verb} cpu_us"] = round(1e6 * (time.process_time() - c0) / calls, 1)
            out[f"{verb} wall_us"] = round(1e6 * (time.perf_counter() - t0) / calls, 1)
        c0 = time.process_time()
        for k in range(0, calls, 8):
            await asyncio.gather(*(verbs["get"](k + j) for j in range(8)))
        out["get x8 concurrent cpu_us"] = round(1e6 * (time.process_time() - c0) / calls, 1)
    finally:
        await kc.close()
        await kube.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--clients", default="tuneop,lightkube,kubernetes_asyncio")
    p.add_argument("--json")
    args = p.parse_args()
    q: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(q,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{q.get(timeout=30)}"
    results = {}
    try:
        for name in args.clients.split(","):
            results[name] = asyncio.run(measure(name, url, args.calls))
    finally:
        server.terminate()
    names = list(results)
    keys = list(results[names[0]])
    rows = [["", *names, *[f"{n}/tuneop" for n in names if n != "tuneop"]]]
    for k in keys:
        base = results.get("tuneop", {}).get(k)
        rows.append([k, *[f"{results[n][k]:.0f}" for n in names],
                     *[f"{results[n][k] / base:.2f}x" if base else "" for n in names if n != "tuneop"]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "kube_clients_micro", "calls": args.calls, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
