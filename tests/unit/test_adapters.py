"""adapterdeployment/reconcile.py: desired adapters, the load/unload plan, per-adapter status, the reducer."""
from __future__ import annotations

from typing import Any

from tuneop.adapterdeployment import reconcile as sa
from tuneop.adapterdeployment.reconcile import Action
from tuneop.api.adapterdeployment import AdapterDeploymentSpec

SHA = "d" * 64
NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T01:00:00Z"


def spec(*adapters: dict[str, Any], **more: Any) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate({"baseModel": "Qwen/Qwen3-8B", "adapters": list(adapters), **more})


NEWS = {"name": "news", "source": {"pvc": {"claimName": "adapters", "path": "news/adapter"}}}
WEB = {"name": "web", "source": {"url": "https://example.com/web.tar.gz", "sha256": SHA}}
SUPPORT = {"name": "support", "fineTuneJobRef": {"name": "support-job"}}


def ftj(phase: str, sha: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if sha:
        status["adapter"] = {"location": "pvc://trained/support/adapter", "sha256": sha}
    return {"spec": {"output": {"pvc": {"claimName": "trained", "path": "support"}}}, "status": status}


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in items}


# ---------------------------------------------------------------------------------- desired


def test_desired_paths_and_readiness() -> None:
    d = by_name(sa.desired_adapters(spec(NEWS, WEB, SUPPORT), {"support-job": ftj("Succeeded", SHA)}))
    assert d["news"] == {"name": "news", "path": "/mnt/pvc/adapters/news/adapter", "sha256": None, "ready": True,
                         "reason": "", "requires": "pvc:adapters"}
    assert d["web"]["path"] == "/adapters/web" and d["web"]["sha256"] == SHA and d["web"]["requires"] == "url:web"
    assert d["support"]["path"] == "/mnt/pvc/trained/support/adapter"
    assert d["support"]["ready"] and d["support"]["sha256"] == SHA and d["support"]["requires"] == "pvc:trained"


def test_finetunejob_not_succeeded_or_missing_waits() -> None:
    running = by_name(sa.desired_adapters(spec(SUPPORT), {"support-job": ftj("Running")}))["support"]
    assert running["ready"] is False and running["reason"] == "FineTuneJob support-job is Running"
    assert running["path"] == "/mnt/pvc/trained/support/adapter"  # known: its claim can be mounted already
    missing = by_name(sa.desired_adapters(spec(SUPPORT), {}))["support"]
    assert missing["ready"] is False and missing["reason"] == "FineTuneJob support-job not found"
    assert missing["path"] is None
    assert sa.adapter_claims(spec(NEWS, SUPPORT), {}) == ["adapters"]
    assert sa.adapter_claims(spec(NEWS, SUPPORT), {"support-job": ftj("Running")}) == ["adapters", "trained"]


# ---------------------------------------------------------------------------------- plan


def desired(*names: str, ready: bool = True) -> list[dict[str, Any]]:
    return [{"name": n, "path": f"/mnt/pvc/a/{n}", "ready": ready, "requires": "pvc:a"} for n in names]


def test_plan_loads_missing_on_every_pod_unloads_extra_in_order() -> None:
    actions = sa.plan(desired("b", "a"), {"pod-2": {"a", "old"}, "pod-1": set()})
    assert actions == [
        Action("pod-1", "load", "a", "/mnt/pvc/a/a"),
        Action("pod-1", "load", "b", "/mnt/pvc/a/b"),
        Action("pod-2", "unload", "old"),
        Action("pod-2", "load", "b", "/mnt/pvc/a/b"),
    ]
    assert sa.plan(desired("a", "b"), {"pod-1": {"a", "b"}}) == []  # converged: nothing


def test_plan_waiting_adapter_is_not_loaded_and_is_unloaded_if_present() -> None:
    d = desired("a") + desired("w", ready=False)
    assert sa.plan(d, {"p": {"w"}}) == [Action("p", "unload", "w"), Action("p", "load", "a", "/mnt/pvc/a/a")]


def test_plan_restarted_pod_gets_everything_again() -> None:
    d = desired("a", "b")
    actions = sa.plan(d, {"old-pod": {"a", "b"}, "new-pod": set()})
    assert actions == [Action("new-pod", "load", "a", "/mnt/pvc/a/a"), Action("new-pod", "load", "b", "/mnt/pvc/a/b")]


def test_plan_removal_and_base_model_untouched() -> None:
    assert sa.plan([], {"p": {"a", "Qwen/Qwen3-8B"}}, base_model="Qwen/Qwen3-8B") == [Action("p", "unload", "a")]


def test_plan_respects_what_a_pod_can_reach_and_reloads() -> None:
    d = desired("a") + [{"name": "t", "path": "/mnt/pvc/trained/t/adapter", "ready": True, "requires": "pvc:trained"}]
    # the old pod has no 'trained' claim mounted: it waits for the rolling update
    actions = sa.plan(d, {"old": set(), "new": set()}, provides={"old": {"pvc:a"}, "new": {"pvc:a", "pvc:trained"}})
    assert Action("old", "load", "t", "/mnt/pvc/trained/t/adapter") not in actions
    assert Action("new", "load", "t", "/mnt/pvc/trained/t/adapter") in actions
    # loaded from another path, or asked to reload (new sha256): unload then load
    assert sa.plan(desired("a"), {"p": {"a": "/elsewhere"}}) == [
        Action("p", "unload", "a"), Action("p", "load", "a", "/mnt/pvc/a/a")]
    assert sa.plan(desired("a"), {"p": {"a": "/mnt/pvc/a/a"}}) == []
    assert sa.plan(desired("a"), {"p": {"a"}}, reload=["a"]) == [
        Action("p", "unload", "a"), Action("p", "load", "a", "/mnt/pvc/a/a")]


def test_pod_provides_and_ready() -> None:
    pod = {
        "metadata": {"name": "p", "annotations": {"tuneop.dev/url-adapters": "web,x"}},
        "spec": {"volumes": [{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "adapters"}},
                             {"name": "dshm", "emptyDir": {}}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert sa.pod_provides(pod) == {"pvc:adapters", "url:web", "url:x"}
    assert sa.pod_ready(pod)
    assert not sa.pod_ready({**pod, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}})
    assert not sa.pod_ready({**pod, "metadata": {"deletionTimestamp": NOW}})


# ---------------------------------------------------------------------------------- status


def test_adapter_status_states_pods_and_since() -> None:
    d = desired("a", "b", "c") + [{"name": "w", "path": None, "ready": False, "reason": "FineTuneJob j is Running"}]
    d[0]["sha256"] = SHA
    prev = [{"name": "a", "state": "Loaded", "pods": [{"pod": "p1", "since": NOW}]}]
    out = by_name(sa.adapter_status(d, {"p1": {"a", "b"}, "p2": {"a"}}, failures={"c": "load on pod p1 failed: 500"},
                                    previous=prev, now=LATER))
    assert out["a"]["state"] == "Loaded" and out["a"]["sha256"] == SHA
    assert out["a"]["pods"] == [{"pod": "p1", "since": NOW}, {"pod": "p2", "since": LATER}]
    assert out["b"]["state"] == "Pending" and out["b"]["message"] == "loaded on 1/2 pods"
    assert out["c"]["state"] == "Failed" and "500" in out["c"]["message"]
    assert out["w"]["state"] == "Waiting" and out["w"]["message"] == "FineTuneJob j is Running"
    assert by_name(sa.adapter_status(desired("a"), {}, now=NOW))["a"]["state"] == "Pending"
    # a failed (re)load keeps the sha256 that was served, so the reload is tried again
    new = desired("a")
    new[0]["sha256"] = "e" * 64
    prev = [{"name": "a", "state": "Loaded", "sha256": SHA, "pods": []}]
    failed = sa.adapter_status(new, {"p1": {"a"}}, failures={"a": "500"}, previous=prev, now=NOW)
    assert failed[0]["state"] == "Failed" and failed[0]["sha256"] == SHA
    assert sa.adapter_status(new, {"p1": {"a"}}, previous=prev, now=NOW)[0]["sha256"] == "e" * 64


def body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "qwen", "namespace": "team-a", "generation": 4},
            "spec": {"baseModel": "m", "replicas": 2, **spec}, "status": status or {}}


def deployment(ready: int, available: int | None = None, replicas: int = 2) -> dict[str, Any]:
    return {"spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": ready,
                       "availableReplicas": ready if available is None else available}}


def conds(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_reduce_status_ready_when_available_and_all_loaded() -> None:
    adapters = [{"name": "a", "state": "Loaded", "message": "", "pods": []}]
    st = sa.reduce_status(body(service={"port": 9000}), adapters=adapters, deployment=deployment(2), now=NOW)
    c = conds(st)
    assert c["Available"]["status"] == "True" and c["AdaptersReady"]["status"] == "True"
    assert c["Ready"]["status"] == "True" and c["Ready"]["observedGeneration"] == 4
    assert st["phase"] == "Ready" and st["observedGeneration"] == 4
    assert (st["replicas"], st["readyReplicas"], st["adaptersDesired"], st["adaptersReady"]) == (2, 2, 1, 1)
    assert st["endpoint"] == "http://qwen-vllm.team-a.svc:9000/v1"
    # lastTransitionTime is kept while the condition's status stays
    again = sa.reduce_status(body(st), adapters=adapters, deployment=deployment(2), now=LATER)
    assert conds(again)["Ready"]["lastTransitionTime"] == NOW


def test_reduce_status_reasons() -> None:
    waiting = [{"name": "a", "state": "Waiting", "message": "FineTuneJob j is Running", "pods": []}]
    st = sa.reduce_status(body(), adapters=waiting, deployment=deployment(2), now=NOW)
    assert conds(st)["AdaptersReady"]["reason"] == "AdaptersWaiting" and st["phase"] == "Progressing"
    assert conds(st)["Ready"]["status"] == "False"
    failed = [{"name": "a", "state": "Failed", "message": "500", "pods": []}]
    assert conds(sa.reduce_status(body(), adapters=failed, deployment=deployment(2), now=NOW))["AdaptersReady"][
        "reason"] == "AdapterLoadFailed"
    st = sa.reduce_status(body(), adapters=[], deployment=deployment(0), now=NOW)
    assert conds(st)["Available"]["reason"] == "NoReplicasAvailable" and st["phase"] == "Pending"
    assert conds(st)["AdaptersReady"]["status"] == "True"
    st = sa.reduce_status(body(), adapters=[], deployment=None, now=NOW)
    assert conds(st)["Available"]["reason"] == "DeploymentMissing"
    st = sa.reduce_status(body(), adapters=[], deployment=None, now=NOW, spec_error="bad")
    assert st["phase"] == "Failed" and conds(st)["Ready"]["reason"] == "SpecInvalid"


def test_reduce_status_carries_the_pod_cause() -> None:
    cause = {"reason": "PodAdmissionRefused", "key": "k", "pod": None, "container": None,
             "message": 'Deployment qwen-vllm cannot create pods: pods "qwen-vllm-x" is forbidden: violates PodSecurity'}
    st = sa.reduce_status(body(), adapters=[], deployment=deployment(0), now=NOW, pod_cause=cause)
    c = conds(st)
    assert c["Available"]["status"] == "False" and c["Available"]["reason"] == "PodAdmissionRefused"
    assert c["Available"]["message"] == f"0/2 replicas available: {cause['message']}"
    assert c["Ready"]["reason"] == "PodAdmissionRefused" and st["message"] == c["Available"]["message"]
    assert c["PodsHealthy"] == {"type": "PodsHealthy", "status": "False", "reason": "PodAdmissionRefused",
                                "message": cause["message"], "lastTransitionTime": NOW, "observedGeneration": 4}
    assert st["phase"] == "Pending"
    # Some replicas serve (a rollout stuck on a crash-looping new pod): Available and Ready stay,
    # PodsHealthy says what is wrong.
    crash = {"reason": "CrashLoop", "message": "pod qwen-vllm-b container vllm is crash-looping", "key": "c"}
    loaded = [{"name": "a", "state": "Loaded", "message": "", "pods": []}]
    st = sa.reduce_status(body(st), adapters=loaded, deployment=deployment(2), now=LATER, pod_cause=crash)
    c = conds(st)
    assert c["Available"]["reason"] == "MinimumReplicasAvailable" and c["Ready"]["status"] == "True"
    assert (c["PodsHealthy"]["status"], c["PodsHealthy"]["reason"]) == ("False", "CrashLoop")
    assert c["PodsHealthy"]["lastTransitionTime"] == NOW  # still False: kept
    # None: healthy, and the existing conditions are as before.
    st = sa.reduce_status(body(st), adapters=loaded, deployment=deployment(2), now=LATER)
    assert (conds(st)["PodsHealthy"]["status"], conds(st)["PodsHealthy"]["reason"]) == ("True", "PodsHealthy")
    assert conds(st)["PodsHealthy"]["lastTransitionTime"] == LATER
    assert [x["type"] for x in st["conditions"]] == ["Available", "AdaptersReady", "Ready", "PodsHealthy"]
    st = sa.reduce_status(body(), adapters=[], deployment=deployment(0), now=NOW)
    assert conds(st)["Available"]["reason"] == "NoReplicasAvailable"
