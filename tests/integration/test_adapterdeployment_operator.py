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
from kmockenv import FTJ_PATH, NS, KMockThread, wait_for
from kopf.testing import KopfRunner
from prometheus_client.parser import text_string_to_metric_families

from tuneop.handlers import adapterdeployment as handlers
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


def start_pod(api: KMockThread, server: FakeVllm, pod_name: str, deployment: str = "qwen-vllm") -> None:
    """Play the ReplicaSet + kubelet: a ready pod from the Deployment's current template."""
    tmpl = copy.deepcopy(api.get(f"{DEPLOYS}/{deployment}")["spec"]["template"])
    meta = tmpl["metadata"]
    meta["name"] = pod_name
    meta.setdefault("annotations", {})["tuneop.dev/admin-url"] = server.url
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
        assert dep["spec"]["template"]["spec"]["containers"][0]["args"][dep["spec"]["template"]["spec"]["containers"][0]["args"].index("--max-loras") + 1] == "8"

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
