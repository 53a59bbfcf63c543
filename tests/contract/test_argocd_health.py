"""The Argo CD health.lua scripts of charts/tuneop/files/argocd, run for real (Lua via lupa).

Argo CD runs a health script with the live object in the global ``obj`` (JSON turned into Lua
tables, arrays 1-based) and reads ``status`` / ``message`` of the table it returns. The samples are
statuses the operator writes: FineTuneJob ones in the shapes of tuneop.finetunejob.reconcile, AdapterDeployment
ones produced by the real reducer (tuneop.adapterdeployment.reconcile.reduce_status).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

lupa = pytest.importorskip("lupa", reason="lupa (the test extra) runs the Lua")

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "charts" / "tuneop" / "files" / "argocd"
FTJ_LUA = ARGOCD / "finetunejob-health.lua"
AD_LUA = ARGOCD / "adapterdeployment-health.lua"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def run_health(script: Path, obj: dict[str, Any]) -> dict[str, Any]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    out = lua.execute(script.read_text())
    result = dict(out.items())
    assert result["status"] in ARGO_STATUSES
    assert isinstance(result.get("message", ""), str)
    return result


def cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}


def ftj(status: Optional[dict[str, Any]], generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "news", "namespace": "team-a", "generation": generation},
        "spec": {"baseModel": "Qwen/Qwen3-8B"},
    }
    if status is not None:
        obj["status"] = {"observedGeneration": 1, **status}
    return obj


FTJ_SAMPLES = {
    "no status yet": (ftj(None), "Progressing", "Waiting for the tuneop operator"),
    "pending, PVC missing": (ftj({
        "phase": "Pending", "reason": "DependencyMissing",
        "message": "waiting for PersistentVolumeClaim datasets (namespace team-a)",
        "conditions": [cond("Validated", "False", "DependencyMissing", "waiting for ...")],
    }), "Progressing", "DependencyMissing: waiting for PersistentVolumeClaim datasets"),
    "validating": (ftj({"phase": "Validating", "reason": "Validating", "message": "validating the dataset",
                        "conditions": [cond("Validated", "Unknown", "Validating")]}), "Progressing", "Validating"),
    "pending on an unschedulable training pod": (ftj({
        "phase": "Pending", "reason": "Unschedulable",
        "message": "Job news-train: waiting for its pod to start: pod news-train-x cannot be scheduled: "
                   "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
        "conditions": [cond("Validated", "True", "DatasetValid"), cond("Running", "False", "TrainingPending")],
    }), "Progressing", "Unschedulable: Job news-train"),
    "evaluating": (ftj({
        "phase": "Evaluating", "reason": "Evaluating", "message": "scoring the adapter on the test split (20/60 rows)",
        "progress": {"step": 30, "totalSteps": 30, "evaluation": {"stage": "adapter", "done": 20, "total": 60}},
        "conditions": [cond("Validated", "True", "DatasetValid"), cond("Running", "True", "Evaluating")],
    }), "Progressing", "scoring the adapter"),
    "running with progress": (ftj({
        "phase": "Running", "reason": "TrainingStarted", "message": "training Job news-train started",
        "jobName": "news-train", "progress": {"step": 20, "totalSteps": 90, "loss": 0.91},
        "conditions": [cond("Validated", "True", "DatasetValid"), cond("Running", "True", "TrainingStarted")],
    }), "Progressing", "(step 20/90)"),
    "running after an eviction retry": (ftj({
        "phase": "Running", "reason": "PodEvicted", "message": "pod evicted; the Job retries",
        "conditions": [cond("Validated", "True", "DatasetValid"), cond("Running", "True", "PodEvicted")],
    }), "Progressing", "PodEvicted"),
    "running at Together": (ftj({
        "phase": "Running", "reason": "TogetherJobCreated", "together": {"jobId": "ft-1", "status": "running"},
    }), "Progressing", "TogetherJobCreated"),
    "running, API error retried": (ftj({
        "phase": "Pending", "reason": "ApiError", "message": "Kubernetes API error: 403 exceeded quota: gpus",
    }), "Progressing", "exceeded quota"),
    "succeeded": (ftj({
        "phase": "Succeeded", "reason": "Succeeded", "message": "adapter written",
        "adapter": {"location": "pvc://adapters/news/adapter", "sha256": "a" * 64},
        "conditions": [cond("Validated", "True", "DatasetValid"), cond("Succeeded", "True", "Succeeded")],
    }), "Healthy", "pvc://adapters/news/adapter"),
    "failed": (ftj({
        "phase": "Failed", "reason": "TrainingFailed", "message": "CUDA out of memory at step 3",
        "conditions": [cond("Validated", "True", "DatasetValid"), cond("Failed", "True", "TrainingFailed")],
    }), "Degraded", "TrainingFailed: CUDA out of memory at step 3"),
    "dataset invalid": (ftj({
        "phase": "Failed", "reason": "DatasetInvalid", "message": "train: line 2: not JSON",
        "conditions": [cond("Validated", "False", "DatasetInvalid"), cond("Failed", "True", "DatasetInvalid")],
    }), "Degraded", "DatasetInvalid"),
    "failed condition wins over a stale phase": (ftj({
        "phase": "Running", "conditions": [cond("Failed", "True", "TogetherError", "worker lost")],
    }), "Degraded", ""),
    "suspended": (ftj({"phase": "Suspended", "reason": "Suspended", "message": "spec.suspend is true"}),
                  "Suspended", "spec.suspend is true"),
    "old failure, new spec not observed yet": (ftj({
        "phase": "Failed", "reason": "TrainingFailed", "message": "old",
    }, generation=2), "Progressing", "generation 2"),
    "unknown future phase": (ftj({"phase": "Queued"}), "Progressing", "Queued"),
}


@pytest.mark.parametrize("name", list(FTJ_SAMPLES))
def test_finetunejob_health(name):
    obj, want, text = FTJ_SAMPLES[name]
    got = run_health(FTJ_LUA, obj)
    assert got["status"] == want, got
    assert text in got["message"], got


def test_a_running_job_is_never_degraded():
    for reason in ("TrainingStarted", "Resumed", "PodEvicted", "OOMKilled", "TogetherRateLimited", "TogetherUnavailable",
                   "Downloading", "ApiError"):
        obj = ftj({"phase": "Running", "reason": reason, "message": "x",
                   "conditions": [cond("Running", "True", reason), cond("Failed", "False", reason)]})
        assert run_health(FTJ_LUA, obj)["status"] == "Progressing", reason


# ---------------------------------------------------------------------------------- AdapterDeployment


def ad_obj(status: Optional[dict[str, Any]], generation: int = 1, replicas: int = 2) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "qwen", "namespace": "team-a", "generation": generation},
        "spec": {"baseModel": "Qwen/Qwen3-8B", "replicas": replicas, "adapters": []},
    }
    if status is not None:
        obj["status"] = status
    return obj


def reduced(adapter_states: list[str], *, ready: int, replicas: int = 2, deployment: bool = True,
            spec_error: Optional[str] = None, generation: int = 1) -> dict[str, Any]:
    """A status from the operator's own reducer."""
    sa = pytest.importorskip("tuneop.adapterdeployment.reconcile")
    body = ad_obj(None, generation=generation, replicas=replicas)
    adapters = [{"name": f"a{i}", "state": s, "message": f"{s.lower()} a{i}"} for i, s in enumerate(adapter_states)]
    dep = None
    if deployment:
        dep = {"spec": {"replicas": replicas},
               "status": {"replicas": replicas, "readyReplicas": ready, "availableReplicas": ready}}
    status = sa.reduce_status(body, adapters=adapters, deployment=dep, now="2026-01-01T00:00:00Z",
                              spec_error=spec_error)
    return ad_obj(status, generation=generation, replicas=replicas)


AD_SAMPLES = {
    "no status yet": (lambda: ad_obj(None), "Progressing"),
    "deployment not created yet": (lambda: reduced([], ready=0, deployment=False), "Progressing"),
    "pods starting": (lambda: reduced(["Pending"], ready=0), "Progressing"),
    "adapter waits for its FineTuneJob": (lambda: reduced(["Loaded", "Waiting"], ready=2), "Progressing"),
    "adapter being loaded": (lambda: reduced(["Loaded", "Pending"], ready=2), "Progressing"),
    "all loaded": (lambda: reduced(["Loaded", "Loaded"], ready=2), "Healthy"),
    "no adapters, base model served": (lambda: reduced([], ready=1), "Healthy"),
    "adapter failed to load": (lambda: reduced(["Loaded", "Failed"], ready=2), "Degraded"),
    "invalid spec": (lambda: reduced([], ready=0, spec_error="adapters[0]: base model mismatch"), "Degraded"),
    "scaled to zero": (lambda: reduced(["Pending"], ready=0, replicas=0), "Suspended"),
    "healthy, but a newer spec not observed yet": (
        lambda: {**reduced(["Loaded"], ready=2), "metadata": {"name": "qwen", "namespace": "team-a", "generation": 2}},
        "Progressing"),
}


@pytest.mark.parametrize("name", list(AD_SAMPLES))
def test_adapterdeployment_health(name):
    make, want = AD_SAMPLES[name]
    got = run_health(AD_LUA, make())
    assert got["status"] == want, got


# ---------------------------------------------------------------------------------- shipping


def test_argocd_cm_snippet_carries_the_scripts():
    cm = yaml.safe_load((ARGOCD / "argocd-cm-health.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    data = cm["data"]
    assert data["resource.customizations.health.tuneop.dev_FineTuneJob"] == FTJ_LUA.read_text()
    assert data["resource.customizations.health.tuneop.dev_AdapterDeployment"] == AD_LUA.read_text()
    import kubernetes_validate

    kubernetes_validate.validate(cm, kubernetes_validate.latest_version(), strict=True)
