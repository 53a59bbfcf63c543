"""AdapterDeployment through the real kopf loop against kmock, with fake vLLM admin servers.

Each "pod" is a real HTTP server on 127.0.0.1 (aiohttp, its own thread) that keeps a real set of
loaded adapters, speaks vLLM's runtime LoRA API (GET /v1/models, POST /v1/load_lora_adapter,
POST /v1/unload_lora_adapter) and can answer 500s on demand. The operator reaches it through the
pod annotation ``tuneop.dev/admin-url`` (honored only because the test config turns it on). The
tests play kubelet and the Deployment controller: they create pods from the Deployment's
template and write the Deployment's status. Assertions are on outcomes and request counts.
"""
from __future__ import annotations

import asyncio
import copy
import json
import threading
from typing import Any, Callable, Iterator, Optional

import kopf
import pytest
from aiohttp import web
from kopf.testing import KopfRunner
from prometheus_client.parser import text_string_to_metric_families

from kmockenv import FTJ_PATH, NS, KMockThread, wait_for
from tuneop.adapterdeployment import handlers as handlers
from tuneop.metrics import METRICS

AD_PATH = f"/apis/tuneop.dev/v1alpha1/namespaces/{NS}/adapterdeployments"
DEPLOYS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SERVICES = f"/api/v1/namespaces/{NS}/services"
HPAS = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers"
PODS = f"/api/v1/namespaces/{NS}/pods"
BASE = "Qwen/Qwen3-8B"
SHA = "b" * 64


# ---------------------------------------------------------------------------------- fake vLLM


class FakeVllm:
    """vLLM's runtime LoRA API with a real set of loaded adapters (name -> path)."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.shas: dict[str, Optional[str]] = {}  # tuneop_sha256 of each load
        # The admin token the pod has (its mounted Secret volume); None: not checked. Like tuneop's
        # guard, load/unload without the header is 401, with another token 403.
        self.token: Optional[Callable[[], Optional[str]]] = None
        self.refused = 0
        self.fail_loads = 0  # answer this many load requests with a 500
        # vLLM's --max-lora-rank of this pod (start_pod reads it from the pod's args) and the rank of the
        # adapter at each path (its adapter_config.json's r): a higher one is refused as vLLM refuses it.
        self.max_lora_rank: Optional[int] = None
        self.ranks: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-vllm")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        self.calls.append(("list", ""))
        data = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
        data += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in sorted(self.loaded.items())]
        return web.json_response({"object": "list", "data": data})

    def _refusal(self, request: web.Request) -> Optional[web.Response]:
        if self.token is None:
            return None
        given = request.headers.get("X-Tuneop-Admin-Token")
        want = self.token()
        if given and want and given == want:
            return None
        self.refused += 1
        reason = "missing_credential" if not given else "bad_credential" if want else "no_credential_configured"
        return web.json_response({"error": {"message": "only the tuneop operator may load or unload adapters",
                                            "type": "tuneop_admin_refused", "reason": reason}},
                                 status=401 if not given else 403)

    async def _load(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        body = await request.json()
        name, path = body["lora_name"], body["lora_path"]
        self.shas[name] = body.get("tuneop_sha256")
        self.calls.append(("load", name))
        if self.fail_loads > 0:
            self.fail_loads -= 1
            return web.json_response({"object": "error", "message": "CUDA hiccup", "code": 500}, status=500)
        rank = self.ranks.get(path)
        if rank is not None and self.max_lora_rank is not None and rank > self.max_lora_rank:
            return web.json_response({"object": "error", "code": 400, "message": (
                f"Call to add_lora method failed: Worker failed with error 'LoRA rank {rank} is greater than "
                f"max_lora_rank {self.max_lora_rank}.', please check the stack trace above for the root cause")},
                status=400)
        if name in self.loaded:
            return web.json_response(
                {"object": "error", "message": f"The lora adapter '{name}' has already been loaded.", "code": 400},
                status=400,
            )
        self.loaded[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        body = await request.json()
        name = body["lora_name"]
        self.calls.append(("unload", name))
        if name not in self.loaded:
            return web.json_response(
                {"object": "error", "message": f"The lora adapter '{name}' cannot be found.", "code": 404},
                status=404,
            )
        del self.loaded[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def start(self) -> "FakeVllm":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def count(self, op: str) -> int:
        return sum(1 for o, _ in self.calls if o == op)


@pytest.fixture()
def vllm_pods() -> Iterator[Callable[[], FakeVllm]]:
    started: list[FakeVllm] = []

    def make() -> FakeVllm:
        s = FakeVllm().start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# ---------------------------------------------------------------------------------- operator


class Operator:
    def __init__(self, interval: float = 0.3, workload_defaults: Optional[dict[str, Any]] = None) -> None:
        self.interval = interval
        self.workload_defaults = workload_defaults or {}
        self.runner: Optional[KopfRunner] = None

    def __enter__(self) -> "Operator":
        registry = kopf.OperatorRegistry()
        handlers.register(
            registry,
            handlers.AdapterConfig(
                vllm_image="vllm:test", trainer_image="trainer:test", interval=self.interval,
                admin_timeout=5, admin_url_annotation=True, workload_defaults=self.workload_defaults,
            ),
            with_common=True,
        )
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        self.runner = KopfRunner(
            ["run", "--standalone", "--namespace", NS], registry=registry, settings=settings, timeout=30,
        )
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.runner is not None
        self.runner.__exit__(*exc)
        assert self.runner.exception is None, self.runner.exception


# ---------------------------------------------------------------------------------- helpers


def ad(name: str = "qwen", adapters: Optional[list[dict[str, Any]]] = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "generation": 1},
        "spec": {"baseModel": BASE, "adapters": adapters or [], "replicas": 2, **spec},
    }


def pvc_adapter(name: str, claim: str = "adapters") -> dict[str, Any]:
    return {"name": name, "source": {"pvc": {"claimName": claim, "path": f"{name}/adapter"}}}


def ftj(name: str, phase: str = "Running") -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "backend": "kubernetes", "baseModel": BASE,
            "dataset": {"train": {"pvc": {"claimName": "datasets", "path": "t.jsonl"}}},
            "output": {"pvc": {"claimName": "trained", "path": name}},
        },
        "status": {"phase": phase},
    }


def get_ad(api: KMockThread, name: str = "qwen") -> dict[str, Any]:
    return api.get(f"{AD_PATH}/{name}") or {}


def status_of(api: KMockThread, name: str = "qwen") -> dict[str, Any]:
    return get_ad(api, name).get("status") or {}


def adapter_states(api: KMockThread, name: str = "qwen") -> dict[str, str]:
    return {a["name"]: a["state"] for a in status_of(api, name).get("adapters") or []}


def cond(api: KMockThread, type_: str, name: str = "qwen") -> dict[str, Any]:
    return next((c for c in status_of(api, name).get("conditions") or [] if c["type"] == type_), {})


def patch_spec(api: KMockThread, spec: dict[str, Any], name: str = "qwen") -> None:
    cur = get_ad(api, name)
    gen = int(cur["metadata"].get("generation", 1)) + 1
    api.patch(f"{AD_PATH}/{name}", {"metadata": {"generation": gen}, "spec": spec})


REPLICASETS = f"/apis/apps/v1/namespaces/{NS}/replicasets"


def replicaset_of(api: KMockThread, deployment: str = "qwen-vllm") -> tuple[dict[str, Any], dict[str, Any]]:
    """Play the Deployment controller: the ReplicaSet of the Deployment's current template (created
    once per template: controller ownerReference to the Deployment's uid, ``pod-template-hash``
    label) and a copy of that template, labelled and owned like the ReplicaSet's pods."""
    dep = api.get(f"{DEPLOYS}/{deployment}")
    tmpl = copy.deepcopy(dep["spec"]["template"])
    pth = tmpl["metadata"]["annotations"]["tuneop.dev/template-hash"][:10]
    rs_name = f"{deployment}-{pth}"
    rs = api.get(f"{REPLICASETS}/{rs_name}")
    if rs is None:
        rs = api.create(REPLICASETS, {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": rs_name, "labels": {**tmpl["metadata"]["labels"], "pod-template-hash": pth},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
                                              "uid": dep["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"template": tmpl},
        })
    tmpl["metadata"]["labels"]["pod-template-hash"] = pth
    tmpl["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                                            "uid": rs["metadata"]["uid"], "controller": True,
                                            "blockOwnerDeletion": True}]
    return rs, tmpl


def start_pod(api: KMockThread, server: FakeVllm, pod_name: str, deployment: str = "qwen-vllm") -> None:
    """Play the ReplicaSet + kubelet: a ready pod from the Deployment's current template."""
    _, tmpl = replicaset_of(api, deployment)
    meta = tmpl["metadata"]
    meta["name"] = pod_name
    meta.setdefault("annotations", {})["tuneop.dev/admin-url"] = server.url
    args = tmpl["spec"]["containers"][0]["args"]
    server.max_lora_rank = int(args[args.index("--max-lora-rank") + 1])
    api.create(PODS, {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tmpl["spec"],
        "status": {"phase": "Running", "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })


def deployment_ready(api: KMockThread, n: int, deployment: str = "qwen-vllm") -> None:
    api.patch(f"{DEPLOYS}/{deployment}/status",
              {"status": {"replicas": n, "readyReplicas": n, "availableReplicas": n, "updatedReplicas": n}})


def template_patches(api: KMockThread, deployment: str = "qwen-vllm") -> list[Any]:
    return [
        r for r in api.requests("PATCH", f"{DEPLOYS}/{deployment}")
        if not r.url.path.endswith("/status") and "template" in json.dumps(r.data or {})
    ]


def pods_serving(api: KMockThread, adapter: str, name: str = "qwen") -> list[str]:
    a = next((a for a in status_of(api, name).get("adapters") or [] if a["name"] == adapter), {})
    return [p["pod"] for p in a.get("pods") or []]


def reasons(api: KMockThread) -> list[str]:
    return [e["reason"] for e in api.events()]


SECRETS = f"/api/v1/namespaces/{NS}/secrets"


def admin_token(api: KMockThread, name: str = "qwen") -> Optional[str]:
    """What the kubelet would project into the pods from Secret <name>-vllm-admin."""
    import base64

    sec = api.get(f"{SECRETS}/{name}-vllm-admin")
    raw = ((sec or {}).get("data") or {}).get("token")
    return base64.b64decode(raw).decode() if raw else None


# ---------------------------------------------------------------------------------- tests


def test_adapters_loaded_live_on_every_pod_and_template_never_changes(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    api.create(FTJ_PATH, ftj("support"))
    api.create(AD_PATH, ad(adapters=[pvc_adapter("news"), {"name": "support", "fineTuneJobRef": {"name": "support"}}]))
    p1, p2 = vllm_pods(), vllm_pods()

    with Operator():
        # 1. Deployment + Service, vLLM args without any adapter; both adapter claims mounted.
        dep = wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        svc = wait_for(lambda: api.get(f"{SERVICES}/qwen-vllm"), what="Service")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == "vllm:test"
        assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        assert "--enable-lora" in c["args"] and c["args"][c["args"].index("--model") + 1] == BASE
        assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
        assert "news" not in json.dumps(c["args"]) and "support" not in json.dumps(c["args"])
        mounts = {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]}
        assert mounts["/mnt/pvc/adapters"] is True and mounts["/mnt/pvc/trained"] is True
        assert dep["spec"]["replicas"] == 2
        assert svc["spec"]["ports"][0]["port"] == 8000
        for obj in (dep, svc):
            assert obj["metadata"]["labels"]["tuneop.dev/adapterdeployment"] == "qwen"
            assert obj["metadata"]["ownerReferences"][0]["kind"] == "AdapterDeployment"
        assert api.get(f"{HPAS}/qwen-vllm") is None
        st = wait_for(lambda: status_of(api).get("adapters") and status_of(api), what="status")
        assert st["endpoint"] == f"http://qwen-vllm.{NS}.svc:8000/v1"
        assert cond(api, "Available")["status"] == "False"

        # 2. Two ready pods: the PVC adapter is loaded on both; the FineTuneJob one waits.
        start_pod(api, p1, "qwen-vllm-a")
        start_pod(api, p2, "qwen-vllm-b")
        deployment_ready(api, 2)
        wait_for(lambda: pods_serving(api, "news") == ["qwen-vllm-a", "qwen-vllm-b"], what="news on both pods")
        assert adapter_states(api)["news"] == "Loaded"
        assert p1.loaded == {"news": "/mnt/pvc/adapters/news/adapter"} and p2.loaded == p1.loaded
        support = next(a for a in status_of(api)["adapters"] if a["name"] == "support")
        assert support["state"] == "Waiting" and "support is Running" in support["message"]
        assert cond(api, "AdaptersReady")["reason"] == "AdaptersWaiting"
        assert cond(api, "Ready")["status"] == "False"

        # 3. The FineTuneJob Succeeds later: its adapter is loaded then, everything Ready.
        api.patch(f"{FTJ_PATH}/support/status", {"status": {
            "phase": "Succeeded", "adapter": {"location": "pvc://trained/support/adapter", "sha256": SHA}}})
        wait_for(lambda: cond(api, "Ready").get("status") == "True", what="Ready")
        st = status_of(api)
        assert p1.loaded["support"] == "/mnt/pvc/trained/support/adapter" and set(p2.loaded) == {"news", "support"}
        assert st["phase"] == "Ready" and st["adaptersReady"] == 2 and st["adaptersDesired"] == 2
        assert st["readyReplicas"] == 2 and st["observedGeneration"] == 1
        assert p1.shas == {"news": None, "support": SHA}  # the guard checks the weights against it
        sup = next(a for a in st["adapters"] if a["name"] == "support")
        assert sup["sha256"] == SHA and [p["pod"] for p in sup["pods"]] == ["qwen-vllm-a", "qwen-vllm-b"]
        assert all(p["since"] for p in sup["pods"])

        # 4. A new adapter from an already-mounted claim: loaded live, template untouched.
        patch_spec(api, {"adapters": [pvc_adapter("news"), {"name": "support", "fineTuneJobRef": {"name": "support"}},
                                      pvc_adapter("legal")]})
        wait_for(lambda: "legal" in p1.loaded and "legal" in p2.loaded, what="legal loaded")
        wait_for(lambda: pods_serving(api, "legal") == ["qwen-vllm-a", "qwen-vllm-b"], what="legal in status")
        assert adapter_states(api)["legal"] == "Loaded"

        # 5. Removed from the spec: unloaded from every pod.
        patch_spec(api, {"adapters": [{"name": "support", "fineTuneJobRef": {"name": "support"}}, pvc_adapter("legal")]})
        wait_for(lambda: "news" not in p1.loaded and "news" not in p2.loaded, what="news unloaded")
        wait_for(lambda: "news" not in adapter_states(api), what="news gone from status")
        assert cond(api, "Ready").get("status") == "True"

        # 6. The FineTuneJob is retrained (new sha256, same path): reloaded on every pod.
        new_sha = "e" * 64
        api.patch(f"{FTJ_PATH}/support/status", {"status": {"adapter": {"sha256": new_sha}}})
        wait_for(lambda: p1.count("unload") == 2 and p2.count("unload") == 2, what="support reloaded")
        wait_for(lambda: next(a for a in status_of(api)["adapters"] if a["name"] == "support").get("sha256") == new_sha
                 and cond(api, "Ready").get("status") == "True", what="new sha in status")
        assert "support" in p1.loaded and "support" in p2.loaded

    assert template_patches(api) == []
    assert len(api.requests("POST", DEPLOYS)) == 1
    assert p1.count("load") == 4 and p2.count("load") == 4  # news, support, legal once each + support again
    assert p1.count("unload") == 2 and p2.count("unload") == 2
    r = reasons(api)
    assert r.count("AdapterLoaded") == 8 and r.count("AdapterUnloaded") == 4
    assert "AdapterLoadFailed" not in r
    assert log_reads(api) == []  # healthy pods: no log is read
    assert not [e for e in api.events() if e["reason"] in ("PodAdmissionRefused", "ImagePullFailed", "CrashLoop",
                                                            "Unschedulable", "DeploymentWarning")]


def test_finetunejob_success_reaches_only_the_adapterdeployments_referencing_it(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    """A FineTuneJob that Succeeds gets its adapter loaded by the AdapterDeployment that names it,
    through the in-memory index of AdapterDeployments (the timer is off here): no FineTuneJob
    event lists AdapterDeployments (unit tests: one that nobody references reconciles none)."""
    api.create(FTJ_PATH, ftj("support"))
    api.create(FTJ_PATH, ftj("unrelated"))
    api.create(AD_PATH, ad(adapters=[{"name": "support", "fineTuneJobRef": {"name": "support"}}], replicas=1))
    pod = vllm_pods()

    with Operator(interval=3600):
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        start_pod(api, pod, "qwen-vllm-a")
        deployment_ready(api, 1)
        wait_for(lambda: cond(api, "Available").get("status") == "True", what="Available")
        assert adapter_states(api) == {"support": "Waiting"}

        api.patch(f"{FTJ_PATH}/unrelated/status", {"status": {
            "phase": "Succeeded", "adapter": {"location": "pvc://trained/unrelated/adapter", "sha256": SHA}}})
        api.patch(f"{FTJ_PATH}/support/status", {"status": {
            "phase": "Succeeded", "adapter": {"location": "pvc://trained/support/adapter", "sha256": SHA}}})
        wait_for(lambda: cond(api, "Ready").get("status") == "True", what="Ready")
        assert pod.loaded == {"support": "/mnt/pvc/trained/support/adapter"}
        assert adapter_states(api) == {"support": "Loaded"}
    lists = [r for r in api.requests("GET", AD_PATH) if r.url.path == AD_PATH and "watch" not in str(r.url.query)]
    assert len(lists) <= 1  # kopf's own listing when its watch starts; none per FineTuneJob event


def test_restarted_pod_gets_adapters_again_and_500s_are_retried(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    api.create(AD_PATH, ad(adapters=[pvc_adapter("news"), pvc_adapter("legal")], replicas=1))
    first = vllm_pods()
    first.fail_loads = 3  # the first three loads fail with a 500

    with Operator():
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        start_pod(api, first, "qwen-vllm-1")
        deployment_ready(api, 1)
        wait_for(lambda: cond(api, "Ready").get("status") == "True", what="Ready after retries")
        assert set(first.loaded) == {"news", "legal"}
        assert first.count("load") == 5  # 3 failures + 2 successes
        failed = [e for e in api.events() if e["reason"] == "AdapterLoadFailed"]
        assert failed and all(e["type"] == "Warning" and "500" in e["message"] for e in failed)
        assert len(failed) <= 2  # one per adapter and distinct message, not one per retry

        # The pod is replaced (crash, eviction): the new one serves nothing yet -> loaded again.
        api.call("DELETE", f"{PODS}/qwen-vllm-1")
        second = vllm_pods()
        start_pod(api, second, "qwen-vllm-2")
        wait_for(lambda: set(second.loaded) == {"news", "legal"}, what="re-loaded on the new pod")
        wait_for(
            lambda: all([p["pod"] for p in a["pods"]] == ["qwen-vllm-2"] for a in status_of(api)["adapters"]),
            what="status lists the new pod",
        )
        assert cond(api, "Ready").get("status") == "True"
    assert second.count("unload") == 0
    assert template_patches(api) == []
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(METRICS.render().decode()) for s in fam.samples
    }
    assert samples[("tuneop_adapter_operations_total", (("op", "load"), ("result", "error")))] >= 3
    assert samples[("tuneop_adapter_operations_total", (("op", "load"), ("result", "success")))] >= 4
    assert samples[("tuneop_adapters", (("name", "qwen"), ("namespace", NS), ("state", "loaded")))] == 2
    assert samples[("tuneop_adapterdeployment_replicas", (("name", "qwen"), ("namespace", NS), ("state", "desired")))] == 1
    assert samples[("tuneop_adapter_operation_seconds_count", (("op", "load"),))] >= 7


def test_vllm_setting_rolls_the_deployment_replicas_and_autoscaling_do_not(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    api.create(AD_PATH, ad(adapters=[pvc_adapter("news")], replicas=1))
    with Operator():
        dep = wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        hash1 = dep["spec"]["template"]["metadata"]["annotations"]["tuneop.dev/template-hash"]
        assert dep["spec"]["template"]["spec"]["containers"][0]["args"][dep["spec"]["template"]["spec"]["containers"][0]["args"].index("--max-loras") + 1] == "32"

        # replicas only: patched, no template change.
        patch_spec(api, {"replicas": 3})
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm")["spec"]["replicas"] == 3, what="replicas 3")
        assert template_patches(api) == []

        # a vLLM setting: the template is patched once -> the Deployment rolls.
        patch_spec(api, {"vllm": {"maxLoras": 16}})

        def rolled() -> bool:
            d = api.get(f"{DEPLOYS}/qwen-vllm")
            args = d["spec"]["template"]["spec"]["containers"][0]["args"]
            return args[args.index("--max-loras") + 1] == "16" and d
        dep = wait_for(rolled, what="template patched")
        assert dep["spec"]["template"]["metadata"]["annotations"]["tuneop.dev/template-hash"] != hash1
        wait_for(lambda: "RollingUpdate" in reasons(api), what="RollingUpdate event")

        # autoscaling on: an HPA on vllm:num_requests_waiting; off again: deleted.
        patch_spec(api, {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}})
        hpa = wait_for(lambda: api.get(f"{HPAS}/qwen-vllm"), what="HPA")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
        patch_spec(api, {"autoscaling": {"enabled": False}})
        wait_for(lambda: api.get(f"{HPAS}/qwen-vllm") is None, what="HPA deleted")
    assert len(template_patches(api)) == 1
    assert len(api.requests("POST", DEPLOYS)) == 1


def test_admin_credential_is_generated_mounted_used_and_recreated_without_restarts(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    api.create(AD_PATH, ad(adapters=[pvc_adapter("news")], replicas=1))
    pod = vllm_pods()
    pod.token = lambda: admin_token(api)  # the kubelet projects the Secret at once

    with Operator():
        # 1. The operator generates the Secret, owned by the AdapterDeployment, and the pods mount it.
        sec = wait_for(lambda: api.get(f"{SECRETS}/qwen-vllm-admin"), what="admin Secret")
        assert sec["metadata"]["ownerReferences"][0]["kind"] == "AdapterDeployment"
        first = admin_token(api)
        assert first and len(first) >= 32
        dep = wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert vols["tuneop-admin"]["secret"]["secretName"] == "qwen-vllm-admin"
        assert api.get(f"/api/v1/namespaces/{NS}/configmaps/qwen-vllm-guard")["data"]["tuneop_vllm_guard.py"]

        # 2. ... and uses it: the pod only accepts calls with the current token.
        start_pod(api, pod, "qwen-vllm-a")
        deployment_ready(api, 1)
        wait_for(lambda: adapter_states(api).get("news") == "Loaded", what="news loaded")
        assert pod.refused == 0 and "news" in pod.loaded

        # 3. The Secret is deleted: recreated with a new token. The pod still has the old one for a
        #    while (the kubelet refreshes Secret volumes eventually): calls are refused, the status
        #    says why, nothing restarts; once the volume is refreshed, the adapter is loaded.
        pod.token = lambda: first
        api.call("DELETE", f"{SECRETS}/qwen-vllm-admin")
        wait_for(lambda: admin_token(api) not in (None, first), what="admin Secret recreated")
        patch_spec(api, {"adapters": [pvc_adapter("news"), pvc_adapter("legal")]})
        wait_for(lambda: adapter_states(api).get("legal") == "Failed", what="legal refused with the stale token")
        legal = next(a for a in status_of(api)["adapters"] if a["name"] == "legal")
        assert "admin credential" in legal["message"]
        assert "legal" not in pod.loaded and pod.refused > 0
        pod.token = lambda: admin_token(api)
        wait_for(lambda: adapter_states(api).get("legal") == "Loaded", what="legal loaded with the new token")
        assert set(pod.loaded) == {"news", "legal"}

    assert len(api.requests("POST", SECRETS)) == 2
    assert len(api.requests("POST", DEPLOYS)) == 1 and template_patches(api) == []
    tokens = {first, admin_token(api)}
    for e in api.events():
        assert not any(t and t in json.dumps(e) for t in tokens)
    assert "AdminCredentialCreated" in reasons(api)


def test_look_alike_pods_never_get_an_admin_call_and_one_warning_each(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    """Labels are not identity: a pod with the vLLM pods' labels that its Deployment's ReplicaSet did
    not create (no owner, or a ReplicaSet of someone else's) never hears from the operator."""
    api.create(AD_PATH, ad(adapters=[pvc_adapter("news")], replicas=1))
    own, bare, foreign = vllm_pods(), vllm_pods(), vllm_pods()
    own.token = bare.token = foreign.token = lambda: admin_token(api)
    with Operator():
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        start_pod(api, own, "qwen-vllm-a")
        deployment_ready(api, 1)
        wait_for(lambda: pods_serving(api, "news") == ["qwen-vllm-a"], what="news on the own pod")

        # Same labels, same template, ready, reachable: one without an owner, one whose controller is
        # a ReplicaSet (with a pod-template-hash) of another Deployment.
        _, tmpl = replicaset_of(api)
        ready = {"phase": "Running", "podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]}
        for pod_name, server, owners in (
            ("qwen-vllm-x", bare, []),
            ("qwen-vllm-y", foreign, [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "lookalike-1",
                                       "uid": "uid-lookalike-1", "controller": True}]),
        ):
            meta = copy.deepcopy(tmpl["metadata"])
            meta.update(name=pod_name, ownerReferences=owners)
            meta["annotations"]["tuneop.dev/admin-url"] = server.url
            api.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tmpl["spec"],
                              "status": ready})
        api.create(REPLICASETS, {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "lookalike-1", "uid": "uid-lookalike-1",
                         "labels": {**tmpl["metadata"]["labels"]},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "lookalike",
                                              "uid": "uid-someone-else", "controller": True}]},
        })
        wait_for(lambda: len(warnings_named(api, "UntrustedPod")) == 2, what="one warning per look-alike")
        # Adding an adapter loads it on the own pod only; later reconciles warn no more.
        patch_spec(api, {"adapters": [pvc_adapter("news"), pvc_adapter("legal")]})
        wait_for(lambda: pods_serving(api, "legal") == ["qwen-vllm-a"], what="legal on the own pod")
        n = reconciles(api)
        wait_for(lambda: reconciles(api) >= n + 4, what="four more reconciles")
        assert pods_serving(api, "news") == ["qwen-vllm-a"] and cond(api, "Ready")["status"] == "True"
    assert bare.calls == [] and foreign.calls == [] and bare.refused == foreign.refused == 0
    assert set(own.loaded) == {"news", "legal"} and own.refused == 0
    warned = {e["message"].split()[1]: e["message"] for e in warnings_named(api, "UntrustedPod")}
    assert sorted(warned) == ["qwen-vllm-x", "qwen-vllm-y"] and len(warnings_named(api, "UntrustedPod")) == 2
    assert "no controller ownerReference" in warned["qwen-vllm-x"]
    assert "ReplicaSet lookalike-1" in warned["qwen-vllm-y"] and "not one of Deployment qwen-vllm's" in warned["qwen-vllm-y"]
    assert all(e["involvedObject"]["kind"] == "AdapterDeployment" for e in warnings_named(api, "UntrustedPod"))
    rs_lists = [r for r in api.requests("GET", REPLICASETS) if r.url.path == REPLICASETS]
    assert rs_lists and all(r.params.get("labelSelector") == "tuneop.dev/adapterdeployment=qwen,"
                            "app.kubernetes.io/component=vllm" for r in rs_lists)


def test_platform_defaults_fill_what_the_spec_leaves_empty(api: KMockThread) -> None:
    from tuneop import workload_defaults as wd

    defaults = wd.parse({"vllm": {"nodeSelector": {"pool": "serving"}, "memory": "24Gi",
                                  "tolerations": [{"key": "gpu", "operator": "Exists"}]}})
    api.create(AD_PATH, ad(name="mine", resources={"nodeSelector": {"pool": "mine"}}))
    api.create(AD_PATH, ad(name="plain"))
    with Operator(workload_defaults=defaults):
        mine = wait_for(lambda: api.get(f"{DEPLOYS}/mine-vllm"), what="Deployment mine")
        plain = wait_for(lambda: api.get(f"{DEPLOYS}/plain-vllm"), what="Deployment plain")
    p = plain["spec"]["template"]["spec"]
    assert p["nodeSelector"] == {"pool": "serving"} and p["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert p["containers"][0]["resources"]["limits"]["memory"] == "24Gi"
    m = mine["spec"]["template"]["spec"]
    assert m["nodeSelector"] == {"pool": "mine"} and m["containers"][0]["resources"]["requests"]["memory"] == "24Gi"
    assert get_ad(api, "mine")["spec"]["resources"] == {"nodeSelector": {"pool": "mine"}}  # the spec is untouched


# ---------------------------------------------------------------------------------- why no pods

PSA_REFUSAL = ('pods "qwen-vllm-7c9d8b6f5d-x2k4p" is forbidden: violates PodSecurity "restricted:latest": '
               'runAsNonRoot != true (pod or container "vllm" must set securityContext.runAsNonRoot=true)')
PSA_WARNING = ('would violate PodSecurity "restricted:latest": runAsNonRoot != true (pod or container "vllm" '
               'must set securityContext.runAsNonRoot=true)')


def warn_on_deployment_create(api: KMockThread, text: str) -> None:
    """Make kmock answer the Deployment's create like an API server whose namespace has Pod
    Security in ``warn`` mode: a ``Warning: 299 - "..."`` header."""
    em = api.emulator
    orig = em._handle
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')

    async def handle(request: Any) -> Any:
        rsp = await orig(request)
        if str(request.method.value).upper() == "POST" and request.url.path == DEPLOYS:
            rsp.headers.add("Warning", f'299 - "{quoted}"')
        return rsp

    em._handle = handle


def make_pod(api: KMockThread, pod_name: str, status: dict[str, Any], deployment: str = "qwen-vllm") -> None:
    """A pod of the Deployment's template in the given state (the ReplicaSet's and kubelet's part)."""
    _, tmpl = replicaset_of(api, deployment)
    tmpl["metadata"]["name"] = pod_name
    api.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": tmpl["metadata"], "spec": tmpl["spec"],
                      "status": status})


def reconciles(api: KMockThread, name: str = "qwen") -> int:
    return len(api.requests("GET", f"{AD_PATH}/{name}"))


def status_patches(api: KMockThread, name: str = "qwen") -> int:
    return len(api.requests("PATCH", f"{AD_PATH}/{name}/status"))


def log_reads(api: KMockThread) -> list[Any]:
    return [r for r in api.requests("GET", PODS) if r.url.path.endswith("/log")]


def warnings_named(api: KMockThread, reason: str) -> list[dict[str, Any]]:
    return [e for e in api.events(reason) if e["type"] == "Warning"]


def test_admission_refusal_reaches_status_and_one_event(api: KMockThread, vllm_pods: Callable[[], FakeVllm]) -> None:
    warn_on_deployment_create(api, PSA_WARNING)
    api.create(AD_PATH, ad(adapters=[pvc_adapter("news")], replicas=1))
    with Operator():
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        # The ReplicaSet controller's refusal, copied by the Deployment controller.
        api.patch(f"{DEPLOYS}/qwen-vllm/status", {"status": {
            "observedGeneration": 1, "replicas": 0, "availableReplicas": 0, "unavailableReplicas": 1,
            "conditions": [
                {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                 "message": "Deployment does not have minimum availability."},
                {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": PSA_REFUSAL},
                {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                 "message": 'ReplicaSet "qwen-vllm-7c9d8b6f5d" is progressing.'},
            ]}})
        wait_for(lambda: cond(api, "Available").get("reason") == "PodAdmissionRefused", what="Available says why")
        healthy = cond(api, "PodsHealthy")
        assert healthy["status"] == "False" and healthy["reason"] == "PodAdmissionRefused"
        assert healthy["message"] == f"Deployment qwen-vllm cannot create pods: {PSA_REFUSAL}"
        st = status_of(api)
        assert st["phase"] == "Pending" and "violates PodSecurity" in st["message"]
        assert cond(api, "Ready")["reason"] == "PodAdmissionRefused"
        # Later reconciles (timer, events) post nothing more and write no status.
        n, patches = reconciles(api), status_patches(api)
        wait_for(lambda: reconciles(api) >= n + 5, what="five more reconciles")
        assert status_patches(api) == patches
        (refused,) = warnings_named(api, "PodAdmissionRefused")
        assert refused["message"] == healthy["message"]
        assert refused["involvedObject"]["kind"] == "AdapterDeployment"

        # The namespace is fixed: a pod comes up, the condition clears.
        pod = vllm_pods()
        api.patch(f"{DEPLOYS}/qwen-vllm/status", {"status": {"conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}})
        start_pod(api, pod, "qwen-vllm-a")
        deployment_ready(api, 1)
        wait_for(lambda: cond(api, "Ready").get("status") == "True", what="Ready")
        assert cond(api, "PodsHealthy")["status"] == "True" and cond(api, "PodsHealthy")["reason"] == "PodsHealthy"
    # Pod Security's warn mode answered the Deployment's create with a warning: one Event.
    (warned,) = warnings_named(api, "DeploymentWarning")
    assert warned["message"] == f"the API server warned when creating Deployment qwen-vllm: {PSA_WARNING}"
    assert len(warnings_named(api, "PodAdmissionRefused")) == 1
    assert log_reads(api) == []  # no crash loop: no log read


def test_image_pull_backoff_reaches_status_and_one_event(api: KMockThread) -> None:
    api.create(AD_PATH, ad(replicas=1))
    image_msg = ('failed to pull and unpack image "docker.io/library/vllm:test": failed to resolve reference '
                 '"docker.io/library/vllm:test": pull access denied, repository does not exist or may require '
                 'authorization')

    def pulling(reason: str, message: str) -> dict[str, Any]:
        return {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [{"name": "vllm", "image": "vllm:test", "imageID": "", "ready": False,
                                   "restartCount": 0, "started": False,
                                   "state": {"waiting": {"reason": reason, "message": message}}}]}

    with Operator():
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        make_pod(api, "qwen-vllm-p", pulling("ErrImagePull", image_msg))
        wait_for(lambda: cond(api, "PodsHealthy").get("reason") == "ImagePullFailed", what="ImagePullFailed")
        assert cond(api, "Available")["reason"] == "ImagePullFailed"
        assert cond(api, "PodsHealthy")["message"] == f"pod qwen-vllm-p container vllm: ErrImagePull: {image_msg}"
        # The kubelet backs off: another waiting reason, the same cause (no second Event).
        api.patch(f"{PODS}/qwen-vllm-p/status", {"status": pulling("ImagePullBackOff", 'Back-off pulling image "vllm:test"')})
        wait_for(lambda: "ImagePullBackOff" in cond(api, "PodsHealthy").get("message", ""), what="back-off")
        n = reconciles(api)
        wait_for(lambda: reconciles(api) >= n + 3, what="three more reconciles")
    (ev,) = warnings_named(api, "ImagePullFailed")
    assert ev["message"] == f"pod qwen-vllm-p container vllm: ErrImagePull: {image_msg}"
    assert log_reads(api) == []


def test_crash_loop_names_the_last_log_line_read_once_per_restart(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    api.emulator["get", f"{PODS}/qwen-vllm-c/log"] << (
        b"INFO 05-01 10:01:02 api_server.py:1 vLLM API server version 0.11.0\n"
        b"ERROR 05-01 10:01:40 engine.py:9 ValueError: No available memory for the cache blocks.\n\n")
    api.create(AD_PATH, ad(adapters=[pvc_adapter("news")], replicas=2))

    def crashing(restarts: int) -> dict[str, Any]:
        return {"phase": "Running", "podIP": "10.0.0.2", "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [{
                "name": "vllm", "image": "vllm:test", "ready": False, "restartCount": restarts, "started": False,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                                      "message": "back-off 40s restarting failed container=vllm pod=qwen-vllm-c"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                             "startedAt": "2026-05-01T10:01:00Z", "finishedAt": "2026-05-01T10:01:40Z"}},
            }]}

    good = vllm_pods()
    with Operator():
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        start_pod(api, good, "qwen-vllm-a")  # one replica serves; the other crash-loops
        deployment_ready(api, 1)
        make_pod(api, "qwen-vllm-c", crashing(3))
        line = "ERROR 05-01 10:01:40 engine.py:9 ValueError: No available memory for the cache blocks."
        wait_for(lambda: cond(api, "PodsHealthy").get("reason") == "CrashLoop", what="CrashLoop")
        msg = cond(api, "PodsHealthy")["message"]
        assert msg == ("pod qwen-vllm-c container vllm is crash-looping (restarts 3): last exit code 1 (Error)"
                       f"; last log line: {line}")
        wait_for(lambda: cond(api, "Ready").get("status") == "True", what="Ready: the other pod serves")
        assert cond(api, "Available")["reason"] == "MinimumReplicasAvailable"
        n = reconciles(api)
        wait_for(lambda: reconciles(api) >= n + 4, what="four more reconciles")
        (read,) = log_reads(api)  # once for this restart, not once per reconcile
        assert read.params == {"container": "vllm", "previous": "true", "tailLines": "20", "limitBytes": "16384"}
        assert good.count("load") == 1
        # It crashes again: one more read, still one Event (the same cause).
        api.patch(f"{PODS}/qwen-vllm-c/status", {"status": crashing(4)})
        wait_for(lambda: "(restarts 4)" in cond(api, "PodsHealthy").get("message", ""), what="restarts 4")
        assert len(log_reads(api)) == 2
    (ev,) = warnings_named(api, "CrashLoop")
    assert ev["message"] == msg


# ---------------------------------------------------------------------------------- derived LoRA settings


def lora_args(api: KMockThread, deployment: str = "qwen-vllm") -> tuple[str, str]:
    args = api.get(f"{DEPLOYS}/{deployment}")["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--max-lora-rank") + 1], args[args.index("--max-loras") + 1]


def ranked_ftj(name: str, r: int) -> dict[str, Any]:
    job = ftj(name, phase="Succeeded")
    job["spec"]["adapter"] = {"r": r}
    job["status"]["adapter"] = {"location": f"pvc://trained/{name}/adapter", "sha256": SHA}
    return job


def test_lora_rank_derived_from_the_adapters_grows_only_for_a_bigger_one(
    api: KMockThread, vllm_pods: Callable[[], FakeVllm]
) -> None:
    """spec.vllm leaves maxLoraRank and maxLoras unset: the pods get the smallest vLLM rank holding every
    adapter (a FineTuneJob's adapter.r, or the rank a pod refused a PVC adapter for), maxLoras from it.
    A smaller adapter added, or one removed, does not roll the pods; a bigger one does, once."""
    api.create(FTJ_PATH, ranked_ftj("support", 16))
    api.create(AD_PATH, ad(adapters=[{"name": "support", "fineTuneJobRef": {"name": "support"}}], replicas=1))
    p1 = vllm_pods()
    with Operator():
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        assert lora_args(api) == ("16", "32")
        serving = wait_for(lambda: status_of(api).get("serving"), what="status.serving")
        assert serving["maxLoraRank"] == 16 and serving["maxLoraRankFrom"] == "adapters"
        assert serving["maxLoras"] == 32 and serving["maxLorasFrom"] == "maxLoraRank"
        assert serving["derivedFrom"] == [{"name": "support", "rank": 16, "source": "fineTuneJob"}]
        start_pod(api, p1, "qwen-vllm-a")
        deployment_ready(api, 1)
        wait_for(lambda: cond(api, "Ready").get("status") == "True", what="Ready")

        # 1. A smaller adapter (rank 8): loaded live, no roll.
        api.create(FTJ_PATH, ranked_ftj("legal", 8))
        patch_spec(api, {"adapters": [{"name": "support", "fineTuneJobRef": {"name": "support"}},
                                      {"name": "legal", "fineTuneJobRef": {"name": "legal"}}]})
        wait_for(lambda: "legal" in p1.loaded, what="legal loaded")
        wait_for(lambda: len(status_of(api)["serving"]["derivedFrom"]) == 2, what="legal in status.serving")
        assert template_patches(api) == [] and lora_args(api) == ("16", "32")

        # 2. A bigger one (rank 50 -> vLLM's 64): the template is patched once, the pods roll.
        api.create(FTJ_PATH, ranked_ftj("code", 50))
        patch_spec(api, {"adapters": [{"name": "support", "fineTuneJobRef": {"name": "support"}},
                                      {"name": "legal", "fineTuneJobRef": {"name": "legal"}},
                                      {"name": "code", "fineTuneJobRef": {"name": "code"}}]})
        wait_for(lambda: lora_args(api) == ("64", "8"), what="rolled to rank 64")
        assert len(template_patches(api)) == 1
        wait_for(lambda: status_of(api)["serving"]["maxLoraRank"] == 64, what="status.serving 64")
        assert "largest adapter rank is 50 (code)" in status_of(api)["serving"]["message"]
        (changed,) = [e for e in api.events() if e["reason"] == "ServingSettingsChanged"]
        assert "maxLoraRank 16 -> 64" in changed["message"]
        api.call("DELETE", f"{PODS}/qwen-vllm-a")  # the Deployment controller replaces the pod
        p2 = vllm_pods()
        start_pod(api, p2, "qwen-vllm-b")
        assert p2.max_lora_rank == 64
        wait_for(lambda: set(p2.loaded) == {"support", "legal", "code"}, what="all three on the new pod")

        # 3. The big one removed again: kept at 64, no roll.
        patch_spec(api, {"adapters": [{"name": "support", "fineTuneJobRef": {"name": "support"}},
                                      {"name": "legal", "fineTuneJobRef": {"name": "legal"}}]})
        wait_for(lambda: "code" not in p2.loaded, what="code unloaded")
        wait_for(lambda: len(status_of(api)["serving"]["derivedFrom"]) == 2, what="code gone from status.serving")
        assert "kept at 64" in status_of(api)["serving"]["message"]
        assert len(template_patches(api)) == 1 and lora_args(api) == ("64", "8")

        # 4. A PVC adapter (on the claim already mounted), rank unknown to the operator: the pod refuses it for its rank (128 > 64), the
        # operator learns the rank from that refusal and rolls the pods once to 128.
        p2.ranks["/mnt/pvc/trained/huge/adapter"] = 128
        patch_spec(api, {"adapters": [{"name": "support", "fineTuneJobRef": {"name": "support"}},
                                      {"name": "legal", "fineTuneJobRef": {"name": "legal"}},
                                      pvc_adapter("huge", claim="trained")]})
        wait_for(lambda: lora_args(api) == ("128", "4"), what="rolled to rank 128")
        assert len(template_patches(api)) == 2
        wait_for(lambda: status_of(api)["serving"]["maxLoraRank"] == 128, what="status.serving 128")
        assert {"name": "huge", "rank": 128, "source": "pod"} in status_of(api)["serving"]["derivedFrom"]
        api.call("DELETE", f"{PODS}/qwen-vllm-b")
        p3 = vllm_pods()
        p3.ranks["/mnt/pvc/trained/huge/adapter"] = 128
        start_pod(api, p3, "qwen-vllm-c")
        wait_for(lambda: set(p3.loaded) == {"support", "legal", "huge"}, what="huge loaded on the new pod")
        wait_for(lambda: cond(api, "Ready").get("status") == "True", what="Ready again")
        # replays (the timer): nothing rolls again, the learnt rank stays
        n = reconciles(api)
        wait_for(lambda: reconciles(api) >= n + 3, what="three more reconciles")
        assert len(template_patches(api)) == 2 and lora_args(api) == ("128", "4")
        assert status_of(api)["serving"]["maxLoraRank"] == 128
    assert len(api.requests("POST", DEPLOYS)) == 1
    assert p2.count("load") >= 4 and "huge" not in p2.loaded


def test_explicit_lora_settings_win(api: KMockThread, vllm_pods: Callable[[], FakeVllm]) -> None:
    api.create(FTJ_PATH, ranked_ftj("support", 64))
    api.create(AD_PATH, ad(adapters=[{"name": "support", "fineTuneJobRef": {"name": "support"}}], replicas=1,
                           vllm={"maxLoraRank": 8, "maxLoras": 2}))
    with Operator():
        wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
        assert lora_args(api) == ("8", "2")
        serving = wait_for(lambda: status_of(api).get("serving"), what="status.serving")
        assert serving["maxLoraRankFrom"] == "spec" and serving["maxLorasFrom"] == "spec"
        assert "vLLM refuses adapters of a higher rank: support (64)" in serving["message"]
