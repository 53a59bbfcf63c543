"""Short operator scenarios against kmock that record every API call the operator makes.

Used by test_chart.py to check the chart's RBAC against what the handlers really do: every
request of the operator (kopf and tuneop's own client; not the test's own requests, which play
kubelet and the Job controller) becomes a (apiGroup, resource[/subresource], verb) triple.

The scenarios cover both backends: kubernetes (validate -> multi-node train with progress from
the pod log -> suspend/resume -> spec change replacing the children -> delete) and together
(Secret check -> upload Job -> Together job -> download Job -> delete with cancel).
"""
from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

TESTS = Path(__file__).resolve().parents[1]
for p in (TESTS, TESTS / "integration"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import kopf  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402

from kmockenv import FTJ_PATH, NS, KMockThread  # noqa: E402
from kmockenv import wait_for as _wait_for  # noqa: E402


def wait_for(check: Any, timeout: float = 30.0, what: str = "") -> Any:
    """kmockenv.wait_for with generous timeouts: these runs share small, busy CI machines."""
    return _wait_for(check, max(timeout, 30.0), what)

JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
KEY = "tk-rbac-scenario-not-a-key"

Triple = tuple[str, str, str]  # (apiGroup, resource or resource/subresource, verb)


# ---------------------------------------------------------------------------------- recording


def request_triple(method: str, path: str, query: dict[str, str]) -> Optional[Triple]:
    """(group, resource[/sub], verb) of one request; None for non-resource URLs (discovery)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    if parts[0] == "api" and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /apis, /apis/<group>/<version>, /version ...
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]  # namespaced resource
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    method = method.upper()
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list")
    elif method == "POST":
        verb = "create"
    elif method == "PATCH":
        verb = "patch"
    elif method == "PUT":
        verb = "update"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        raise AssertionError(f"unexpected method {method} {path}")
    return group, f"{resource}/{sub}" if sub else resource, verb


def _method(r: Any) -> str:
    m = r.method
    return str(getattr(m, "value", m)).split(".")[-1].upper()


def operator_triples(api: KMockThread) -> set[Triple]:
    out: set[Triple] = set()
    for r in list(api.emulator._requests):
        agent = str((r.headers or {}).get("User-Agent", ""))
        if agent.startswith("Python-urllib"):
            continue  # the test itself, playing kubectl/kubelet/controllers
        t = request_triple(_method(r), r.url.path, dict(r.url.query))
        if t is not None:
            out.add(t)
    return out


# ---------------------------------------------------------------------------------- operator


class Operator:
    """The operator's handlers registered like ``tuneop.handlers.run_operator`` does (every
    resource kind, so every watch kopf opens is recorded), with short test intervals."""

    def __init__(self, *, args: tuple[str, ...] = (), **config: Any):
        self.args = list(args)
        self.config = {"progress_interval": 0.2, "retry_interval": 0.3, **config}
        self.runner: Optional[KopfRunner] = None

    def __enter__(self) -> "Operator":
        from tuneop.finetunejob import handlers as finetunejob

        registry = kopf.OperatorRegistry()
        finetunejob.register(registry, finetunejob.OperatorConfig(image="trainer:test", **self.config))
        ad = _adapterdeployment_handlers()
        if ad is not None:
            ad.register(registry, ad.AdapterConfig(
                vllm_image="vllm:test", trainer_image="trainer:test", interval=0.3,
                admin_timeout=5, admin_url_annotation=True,
            ))
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        self.runner = KopfRunner(
            ["run", "--standalone", "--namespace", NS, *self.args], registry=registry, settings=settings,
            timeout=60,
        )
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.runner is not None
        self.runner.__exit__(*exc)


def _adapterdeployment_handlers() -> Any:
    try:
        from tuneop.adapterdeployment import handlers as adapterdeployment
    except ImportError:
        return None
    return adapterdeployment


# ---------------------------------------------------------------------------------- cluster play


def _obj(api: KMockThread, path: str, kind: str, name: str, **extra: Any) -> None:
    api.create(path, {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}, **extra})


def finish_job(api: KMockThread, job: str, *, container: str, message: str) -> None:
    """Play kubelet + Job controller: a terminated pod, then the Job's Complete status."""
    owner = job.rsplit("-", 1)[0]
    api.create(PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job}-x1", "labels": {
            "batch.kubernetes.io/job-name": job, "job-name": job, "tuneop.dev/finetunejob": owner}},
        "status": {"phase": "Succeeded", "containerStatuses": [{"name": container, "state": {"terminated": {
            "exitCode": 0, "reason": "Completed", "message": message, "finishedAt": "2026-01-01T01:00:00Z"}}}]},
    })
    api.patch(f"{JOBS}/{job}/status", {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})


def _status(api: KMockThread, name: str) -> dict[str, Any]:
    return (api.get(f"{FTJ_PATH}/{name}") or {}).get("status") or {}


def _phase(api: KMockThread, name: str, phase: str, timeout: float = 15) -> None:
    wait_for(lambda: _status(api, name).get("phase") == phase, timeout, f"{name} phase {phase}")


def _ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "baseModel": "Qwen/Qwen3-8B",
            "dataset": {"train": {"pvc": {"claimName": "datasets", "path": "x/train.jsonl"}}},
            "output": {"pvc": {"claimName": "adapters", "path": name}},
            **spec,
        },
    }


def kubernetes_backend(api: KMockThread) -> None:
    _obj(api, PVCS, "PersistentVolumeClaim", "datasets")
    _obj(api, PVCS, "PersistentVolumeClaim", "adapters")
    _obj(api, SECRETS, "Secret", "hf", data={"token": base64.b64encode(b"hf_x").decode()})
    api.emulator["get", f"{PODS}/k8s-train-x0/log"] << (
        b'{"event":"progress","step":2,"total_steps":9,"epoch":0.3,"loss":1.2}\n'
    )
    api.create(FTJ_PATH, _ftj("k8s", backend="kubernetes", resources={"gpus": 1, "nodes": 2},
                              hfTokenSecretRef={"name": "hf", "key": "token"}))
    with Operator(retry_interval=0.2):
        wait_for(lambda: api.get(f"{JOBS}/k8s-validate"), what="validation Job")
        summary = {"format": "messages", "trainRows": 10, "validationRows": 0, "testRows": 0, "estimatedTokens": 100}
        finish_job(api, "k8s-validate", container="validate",
                   message=json.dumps({"event": "validated", "dataset": summary}))
        wait_for(lambda: api.get(f"{JOBS}/k8s-train"), what="training Job")
        _phase(api, "k8s", "Pending")  # until its pod runs
        api.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": "k8s-train-x0", "labels": {
                              "batch.kubernetes.io/job-name": "k8s-train", "tuneop.dev/finetunejob": "k8s"}},
                          "status": {"phase": "Pending"}})
        # a pod that waits: its Warning Events are read (a FailedMount says why)
        wait_for(lambda: [r for r in api.requests("GET", f"/api/v1/namespaces/{NS}/events")
                          if "fieldSelector" in str(r.url.query)], what="the waiting pod's events read")
        api.patch(f"{PODS}/k8s-train-x0", {"status": {"phase": "Running"}})
        _phase(api, "k8s", "Running")
        wait_for(lambda: _status(api, "k8s").get("progress"), what="progress")
        api.patch(f"{FTJ_PATH}/k8s", {"metadata": {"generation": 2}, "spec": {"suspend": True}})
        wait_for(lambda: api.get(f"{JOBS}/k8s-train")["spec"]["suspend"] is True, what="Job suspended")
        api.patch(f"{FTJ_PATH}/k8s", {"metadata": {"generation": 3}, "spec": {"suspend": False}})
        wait_for(lambda: api.get(f"{JOBS}/k8s-train")["spec"]["suspend"] is False, what="Job resumed")
        # A new spec: the old children are deleted and replaced.
        api.patch(f"{FTJ_PATH}/k8s", {"metadata": {"generation": 4}, "spec": {"baseModel": "Qwen/Qwen3-4B"}})
        wait_for(lambda: api.requests("DELETE", f"{JOBS}/"), what="old Jobs deleted")
        wait_for(lambda: len([r for r in api.requests("POST", JOBS)
                              if (r.data or {}).get("metadata", {}).get("name") == "k8s-validate"]) == 2,
                 what="the new spec's validation Job")
        api.call("DELETE", f"{FTJ_PATH}/k8s")
        wait_for(lambda: api.get(f"{FTJ_PATH}/k8s") is None, what="deleted")


def together_backend(api: KMockThread, tmp_path: Path) -> None:
    from fake_together.server import FakeTogether
    from tuneop.backends.together import client as T

    _obj(api, PVCS, "PersistentVolumeClaim", "datasets")
    _obj(api, PVCS, "PersistentVolumeClaim", "adapters")
    _obj(api, SECRETS, "Secret", "together", type="Opaque", data={"api-key": base64.b64encode(KEY.encode()).decode()})
    with FakeTogether(api_key=KEY) as fake:
        import os

        old = os.environ.get("TOGETHER_BASE_URL")
        os.environ["TOGETHER_BASE_URL"] = fake.url
        try:
            fake.progression = ["pending", "queued", "running", "running", "uploading", "completed"]
            api.create(FTJ_PATH, _ftj(
                "tg", backend="together", baseModel="Qwen/Qwen2.5-7B-Instruct",
                hyperparameters={"epochs": 1, "batchSize": 16, "learningRate": 1e-4, "maxSeqLength": 2048},
                together={"apiKeySecretRef": {"name": "together", "key": "api-key"}, "suffix": "rbac"},
            ))
            with Operator(args=("--verbose",), together_poll_interval=0.2, retry_interval=0.3):
                wait_for(lambda: api.get(f"{JOBS}/tg-upload"), what="upload Job")
                data = tmp_path / "train.jsonl"
                data.write_text("".join(json.dumps({"messages": [
                    {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                    for i in range(8)))
                with T.TogetherClient(KEY, fake.url, sleep=lambda s: None) as client:
                    file_id = client.upload_file(str(data))["id"]
                result = {"event": "uploaded", "trainingFile": file_id, "validationFile": None, "format": "messages",
                          "dataset": {"format": "messages", "trainRows": 8, "validationRows": 0, "estimatedTokens": 64}}
                finish_job(api, "tg-upload", container="upload", message=json.dumps(result))
                wait_for(lambda: api.get(f"{JOBS}/tg-download"), timeout=20, what="download Job")
                api.call("DELETE", f"{FTJ_PATH}/tg")
                wait_for(lambda: api.get(f"{FTJ_PATH}/tg") is None, timeout=15, what="deleted")
        finally:
            if old is None:
                os.environ.pop("TOGETHER_BASE_URL", None)
            else:
                os.environ["TOGETHER_BASE_URL"] = old


def summarize(triples: Iterable[Triple]) -> str:
    return "\n".join(f"  {g or 'core'}\t{r}\t{v}" for g, r, v in sorted(triples))


AD_PATH = f"/apis/tuneop.dev/v1alpha1/namespaces/{NS}/adapterdeployments"
DEPLOYS = f"/apis/apps/v1/namespaces/{NS}/deployments"
HPAS = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers"


def adapterdeployment(api: KMockThread) -> bool:
    """AdapterDeployment: Deployment/Service, a pod with vLLM's admin API, replicas, a template
    change, autoscaling on and off, delete. False when the handlers do not exist (yet)."""
    if _adapterdeployment_handlers() is None:
        return False
    try:
        from test_adapterdeployment_operator import FakeVllm, start_pod
    except ImportError:  # the pod part needs the fake vLLM of the integration tests
        FakeVllm = None  # noqa: N806
    _obj(api, PVCS, "PersistentVolumeClaim", "adapters")
    _obj(api, SECRETS, "Secret", "hf", data={"token": base64.b64encode(b"hf_x").decode()})
    api.create(FTJ_PATH, {**_ftj("support", backend="kubernetes"), "status": {"phase": "Running"}})
    api.create(AD_PATH, {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "qwen", "generation": 1},
        "spec": {"baseModel": "Qwen/Qwen3-8B", "replicas": 1, "hfTokenSecretRef": {"name": "hf", "key": "token"},
                 "adapters": [{"name": "news", "source": {"pvc": {"claimName": "adapters", "path": "news/adapter"}}},
                              {"name": "support", "fineTuneJobRef": {"name": "support"}}]},
    })
    fake = FakeVllm().start() if FakeVllm is not None else None
    gen = iter(range(2, 100))

    def patch_spec(spec: dict[str, Any]) -> None:
        api.patch(f"{AD_PATH}/qwen", {"metadata": {"generation": next(gen)}, "spec": spec})

    try:
        with Operator():
            wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm"), what="Deployment")
            wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/services/qwen-vllm"), what="Service")
            if fake is not None:
                # a ReplicaSet of the Deployment and its pod (the operator trusts no other)
                start_pod(api, fake, "qwen-vllm-p1")
                api.patch(f"{DEPLOYS}/qwen-vllm/status", {"status": {
                    "replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}})
                wait_for(lambda: "news" in fake.loaded, what="adapter loaded")
            # The FineTuneJob finishes: its adapter gets loaded too.
            api.patch(f"{FTJ_PATH}/support/status", {"status": {
                "phase": "Succeeded", "adapter": {"location": "pvc://adapters/support/adapter", "sha256": "c" * 64}}})
            patch_spec({"replicas": 2})
            wait_for(lambda: api.get(f"{DEPLOYS}/qwen-vllm")["spec"].get("replicas") == 2, what="replicas 2")
            patch_spec({"vllm": {"maxLoras": 16}})
            wait_for(lambda: "16" in api.get(f"{DEPLOYS}/qwen-vllm")["spec"]["template"]["spec"]["containers"][0]["args"],
                     what="template patched")
            patch_spec({"service": {"port": 8080}})
            wait_for(lambda: api.get(f"/api/v1/namespaces/{NS}/services/qwen-vllm")["spec"]["ports"][0]["port"] == 8080,
                     what="Service patched")
            patch_spec({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}})
            wait_for(lambda: api.get(f"{HPAS}/qwen-vllm"), what="HPA")
            patch_spec({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 6}})
            wait_for(lambda: api.get(f"{HPAS}/qwen-vllm")["spec"]["maxReplicas"] == 6, what="HPA patched")
            patch_spec({"autoscaling": {"enabled": False}})
            wait_for(lambda: api.get(f"{HPAS}/qwen-vllm") is None, what="HPA deleted")
            if fake is not None:
                patch_spec({"adapters": [{"name": "support", "fineTuneJobRef": {"name": "support"}}]})
                wait_for(lambda: "news" not in fake.loaded, what="adapter unloaded")
            api.call("DELETE", f"{AD_PATH}/qwen")
            # a bound, not a timing: kopf stops the adapters timer before it drops its finalizer, and on a busy
            # machine that took over 30 s (the timer-per-object is itself a known cost, see the closing notes)
            wait_for(lambda: api.get(f"{AD_PATH}/qwen") is None, timeout=90, what="deleted")
    finally:
        if fake is not None:
            fake.stop()
    return True
