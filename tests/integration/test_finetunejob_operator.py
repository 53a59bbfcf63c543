"""FineTuneJob (backend: kubernetes) through the real kopf loop against kmock.

The tests play the cluster's part: they create pods with termination messages and write Job
statuses, as the Job controller and kubelet would, and assert the operator's outcomes (objects,
status, Events, request counts), never timings.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from kmockenv import FTJ_PATH, NS, KMockThread, Operator, wait_for

JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
CMS = f"/api/v1/namespaces/{NS}/configmaps"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"

SHA = "a" * 64
GOOD_JSONL = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
    for i in range(5)
)


# ---------------------------------------------------------------------------------- helpers


def ftj(name: str = "news", *, train: Optional[dict[str, Any]] = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "backend": "kubernetes",
            "baseModel": "Qwen/Qwen3-8B",
            "dataset": {"train": train or {"pvc": {"claimName": "datasets", "path": "news/train.jsonl"}}},
            "output": {"pvc": {"claimName": "adapters", "path": name}},
            **spec,
        },
    }


def pvc(api: KMockThread, name: str) -> None:
    api.create(PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}})


def configmap(api: KMockThread, name: str, data: dict[str, str]) -> None:
    api.create(CMS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})


def get_ftj(api: KMockThread, name: str = "news") -> dict[str, Any]:
    return api.get(f"{FTJ_PATH}/{name}") or {}


def status_of(api: KMockThread, name: str = "news") -> dict[str, Any]:
    return get_ftj(api, name).get("status") or {}


def wait_phase(api: KMockThread, phase: str, name: str = "news", timeout: float = 30) -> dict[str, Any]:
    wait_for(lambda: status_of(api, name).get("phase") == phase, timeout, f"phase {phase}")
    return status_of(api, name)


def finish_job(
    api: KMockThread, job: str, *, container: str, message: str, exit_code: int = 0,
    job_condition: Optional[dict[str, Any]] = None,
) -> None:
    """Play kubelet + Job controller: a terminated pod, then the Job's final status."""
    owner = job.rsplit("-", 1)[0]
    api.create(PODS, {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-x1",
            "labels": {"batch.kubernetes.io/job-name": job, "job-name": job, "tuneop.dev/finetunejob": owner},
        },
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{
                "name": container,
                "state": {"terminated": {
                    "exitCode": exit_code,
                    "reason": "Completed" if exit_code == 0 else "Error",
                    "message": message,
                    "finishedAt": "2026-01-01T01:00:00Z",
                }},
            }],
        },
    })
    if exit_code == 0:
        status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    else:
        status = {"failed": 1, "conditions": [job_condition or {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    api.patch(f"{JOBS}/{job}/status", {"status": status})


def start_job(api: KMockThread, job: str, *, container: str = "trainer", pod: Optional[str] = None) -> None:
    """Play kubelet + Job controller: the Job's pod runs, and the Job counts it ready."""
    owner = job.rsplit("-", 1)[0]
    api.create(PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod or f"{job}-x0",
            "labels": {"batch.kubernetes.io/job-name": job, "job-name": job, "tuneop.dev/finetunejob": owner},
        },
        "status": {"phase": "Running", "containerStatuses": [{"name": container, "state": {"running": {}}}]},
    })
    api.patch(f"{JOBS}/{job}/status", {"status": {"active": 1, "ready": 1}})


def job_posts(api: KMockThread, name: Optional[str] = None) -> list[Any]:
    posts = api.requests("POST", JOBS)
    if name is not None:
        posts = [r for r in posts if (r.data or {}).get("metadata", {}).get("name") == name]
    return posts


def reasons(api: KMockThread) -> list[str]:
    return [e["reason"] for e in api.events()]


def owned_by(obj: dict[str, Any], name: str) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(
        r["kind"] == "FineTuneJob" and r["name"] == name and r["controller"] and r["blockOwnerDeletion"]
        for r in refs
    )


# ---------------------------------------------------------------------------------- tests


def test_pvc_dataset_validates_trains_and_succeeds(api: KMockThread) -> None:
    pvc(api, "datasets")
    pvc(api, "adapters")
    # The training pod's log, for the progress timer (kubelet's /log endpoint).
    api.emulator["get", f"{PODS}/news-train-x0/log"] << (
        b'plain text line\n'
        b'{"event":"progress","step":10,"total_steps":90,"epoch":0.3,"loss":1.23}\n'
        b'{"event":"progress","step":20,"total_steps":90,"epoch":0.6,"loss":0.91,"eta_seconds":40}\n'
    )
    api.create(FTJ_PATH, ftj(resources={"gpus": 1, "nodes": 1}))

    with Operator():
        # 1. ConfigMap with the resolved config + the CPU-only validation Job; no training Job yet.
        vjob = wait_for(lambda: api.get(f"{JOBS}/news-validate"), what="validation Job")
        cm = wait_for(lambda: api.get(f"{CMS}/news-config"), what="config ConfigMap")
        config = json.loads(cm["data"]["job.json"])
        assert config["paths"]["train"] == "/mnt/pvc/datasets/news/train.jsonl"
        assert config["paths"]["output"] == "/mnt/pvc/adapters/news"
        container = vjob["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][-1] == "--validate-only"
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
        assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] != "dshm")
        assert api.get(f"{JOBS}/news-train") is None
        # Pending until the validation pod runs.
        assert wait_phase(api, "Pending")["reason"] == "ValidationPending"
        start_job(api, "news-validate", container="validate")
        assert wait_phase(api, "Validating")["reason"] == "Validating"

        # 2. The validator succeeds -> the training Job.
        # What `python -m tuneop.trainer --validate-only` writes as its termination message.
        summary = {"format": "messages", "trainRows": 4000, "validationRows": 0, "testRows": 0, "estimatedTokens": 900000}
        finish_job(api, "news-validate", container="validate",
                   message=json.dumps({"event": "validated", "dataset": summary}))
        tjob = wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        spec = tjob["spec"]
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"] == "trainer:test"
        assert c["command"] == ["python", "-m", "tuneop.trainer", "--config", "/etc/tuneop/job.json"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert spec["suspend"] is False and spec["backoffLimit"] == 2
        assert pod["restartPolicy"] == "Never"
        assert {"name": "TUNEOP_TERMINATION_LOG", "value": "/dev/termination-log"} in c["env"]
        mounts = {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]}
        assert mounts["/mnt/pvc/datasets"] is True and mounts["/mnt/pvc/adapters"] is False
        assert wait_phase(api, "Pending")["reason"] == "TrainingPending"
        assert api.requests("GET", f"{PODS}/news-train-x0/log") == []  # no pod yet: no log read
        # 3. The training pod runs (the Job counts it ready: its event reaches the operator) -> Running,
        # and progress comes from the newest progress line of its log.
        start_job(api, "news-train")
        st = wait_phase(api, "Running")
        assert st["dataset"] == summary
        assert st["jobName"] == "news-train"
        for obj in (cm, vjob, tjob):
            assert owned_by(obj, "news")
            assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tuneop"
            assert obj["metadata"]["labels"]["tuneop.dev/finetunejob"] == "news"

        progress = wait_for(lambda: status_of(api).get("progress"), what="progress")
        assert progress["step"] == 20 and progress["totalSteps"] == 90 and progress["loss"] == 0.91

        # 4. The trainer succeeds -> Succeeded with the adapter's location and sha256.
        done = {"event": "done", "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA, "sizeBytes": 1234},
                "evaluation": {"metric": "exact_match", "samples": 50, "base": 0.1, "adapter": 0.8}}
        finish_job(api, "news-train", container="trainer", message=json.dumps(done))
        st = wait_phase(api, "Succeeded")
        wait_for(lambda: "Succeeded" in reasons(api), what="Succeeded event")

    assert st["adapter"]["location"] == "pvc://adapters/news/adapter"
    assert st["adapter"]["sha256"] == SHA
    assert st["evaluation"]["adapter"] == 0.8
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Succeeded"]["status"] == "True"
    assert conds["Validated"]["reason"] == "DatasetValid"
    assert st["observedGeneration"] == 1
    # One Event per transition, each exactly once; exactly one Job of each kind.
    assert reasons(api) == [
        "ValidationPending", "Validating", "DatasetValid", "TrainingPending", "TrainingStarted", "Succeeded",
    ]
    assert len(job_posts(api, "news-validate")) == 1
    assert len(job_posts(api, "news-train")) == 1


def test_inline_dataset_training_failure_reports_trainer_message(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator():
        tjob = wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        # ConfigMap datasets are checked by the operator: no validation Job.
        assert api.get(f"{JOBS}/news-validate") is None
        mounts = {m["mountPath"] for m in tjob["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/mnt/configmap/news-data" in mounts
        start_job(api, "news-train")
        st = wait_phase(api, "Running")
        assert st["dataset"]["trainRows"] == 5

        error = {"event": "error", "reason": "TrainingError", "message": "CUDA out of memory at step 3"}
        finish_job(api, "news-train", container="trainer", message=json.dumps(error), exit_code=1)
        st = wait_phase(api, "Failed")
        wait_for(lambda: "TrainingFailed" in reasons(api), what="TrainingFailed event")

    assert st["reason"] == "TrainingFailed"
    assert "CUDA out of memory at step 3" in st["message"]
    failed = [c for c in st["conditions"] if c["type"] == "Failed"][0]
    assert failed["status"] == "True" and failed["reason"] == "TrainingFailed"
    event = [e for e in api.events() if e["reason"] == "TrainingFailed"][0]
    assert event["type"] == "Warning" and "CUDA out of memory" in event["message"]
    assert len(job_posts(api)) == 1


def test_bad_configmap_data_fails_without_any_job(api: KMockThread) -> None:
    pvc(api, "adapters")
    bad = GOOD_JSONL.splitlines()
    bad[1] = '{"messages": [{"role": "user"'  # line 2: broken JSON
    configmap(api, "news-data", {"train.jsonl": "\n".join(bad)})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator():
        st = wait_phase(api, "Failed")
        wait_for(lambda: "DatasetInvalid" in reasons(api), what="DatasetInvalid event")

    assert st["reason"] == "DatasetInvalid"
    assert "line 2" in st["message"]
    validated = [c for c in st["conditions"] if c["type"] == "Validated"][0]
    assert validated["status"] == "False" and validated["reason"] == "DatasetInvalid"
    assert job_posts(api) == []


def test_missing_pvc_is_reported_retried_and_recovers(api: KMockThread) -> None:
    pvc(api, "adapters")
    api.create(FTJ_PATH, ftj())
    with Operator(retry_interval=0.2):
        st = wait_phase(api, "Pending")
        assert st["reason"] == "DependencyMissing"
        assert "PersistentVolumeClaim datasets" in st["message"]
        validated = [c for c in st["conditions"] if c["type"] == "Validated"][0]
        assert validated["reason"] == "DependencyMissing"
        assert "PersistentVolumeClaim datasets" in validated["message"]
        # Retried (it looks again), but no new Event for the same reason and no Job.
        wait_for(lambda: len(api.requests("GET", f"{PVCS}/datasets")) >= 4, what="retries")
        assert reasons(api) == ["DependencyMissing"]
        assert job_posts(api) == []

        pvc(api, "datasets")
        wait_for(lambda: api.get(f"{JOBS}/news-validate"), what="validation Job after the PVC appeared")
        wait_for(lambda: status_of(api).get("reason") == "ValidationPending", what="ValidationPending")
    assert reasons(api) == ["DependencyMissing", "ValidationPending"]


def test_suspend_and_resume_mirror_to_the_job(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator():
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        start_job(api, "news-train")
        wait_phase(api, "Running")

        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 2}, "spec": {"suspend": True}})
        wait_for(lambda: api.get(f"{JOBS}/news-train")["spec"]["suspend"] is True, what="Job suspended")
        st = wait_phase(api, "Suspended")
        assert st["observedGeneration"] == 2
        # The Job controller deletes the suspended Job's pod.
        api.call("DELETE", f"{PODS}/news-train-x0")
        api.patch(f"{JOBS}/news-train/status", {"status": {"active": 0, "ready": 0}})

        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 3}, "spec": {"suspend": False}})
        wait_for(lambda: api.get(f"{JOBS}/news-train")["spec"]["suspend"] is False, what="Job resumed")
        # Pending until a new pod runs, then Running (Resumed).
        assert wait_phase(api, "Pending")["reason"] == "Resuming"
        start_job(api, "news-train", pod="news-train-x1")
        st = wait_phase(api, "Running")
        wait_for(lambda: "Resumed" in reasons(api), what="Resumed event")

    assert st["reason"] == "Resumed"
    assert reasons(api) == ["DatasetValid", "TrainingPending", "TrainingStarted", "Suspended", "Resuming", "Resumed"]
    # Suspending never replaces the Job.
    assert len(job_posts(api)) == 1
    assert api.requests("DELETE", JOBS) == []


def test_operator_restart_midway_creates_exactly_one_training_job(api: KMockThread) -> None:
    pvc(api, "datasets")
    pvc(api, "adapters")
    api.create(FTJ_PATH, ftj())
    with Operator():
        wait_for(lambda: api.get(f"{JOBS}/news-validate"), what="validation Job")
        wait_phase(api, "Pending")

    # While the operator is down, validation finishes.
    report = {"ok": True, "format": "messages", "rows": 10, "estimatedTokens": 100, "errors": []}
    finish_job(api, "news-validate", container="validate",
               message=json.dumps({"event": "validated", "datasets": {"train": report}}))

    with Operator():
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job after restart")
        start_job(api, "news-train")
        wait_phase(api, "Running")
    before = len(api.requests("GET", f"{FTJ_PATH}/news"))
    with Operator():
        # Resumed again: every object replayed, reconciled, nothing new created.
        wait_for(lambda: len(api.requests("GET", f"{FTJ_PATH}/news")) > before, what="a reconcile")
        wait_phase(api, "Running")

    assert len(job_posts(api, "news-validate")) == 1
    assert len(job_posts(api, "news-train")) == 1
    assert len(api.requests("POST", CMS)) == 1  # the operator's news-config, once
    assert reasons(api).count("TrainingStarted") == 1


def test_children_left_by_a_reconcile_that_never_wrote_the_status_are_adopted(api: KMockThread) -> None:
    """The first reconcile of a new FineTuneJob creates its children at once without reading them
    first. When one is there already (an earlier reconcile created it and died before writing any
    status), its create answers 409: the reconcile then reads the children and goes on from what
    exists. Here the ConfigMap is the one this spec and owner need: the Job stays, made once."""
    from tuneop.finetunejob import builders

    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    api.create(CMS, builders.build_config_map(get_ftj(api)))
    with Operator():
        st = wait_phase(api, "Pending")
    assert st["observedGeneration"] == 1 and st["reason"] == "TrainingPending"
    assert len(job_posts(api, "news-train")) == 1 and api.requests("DELETE", f"{JOBS}/news-train") == []
    assert len([r for r in api.requests("GET", f"{CMS}/news-config") if "tuneop" in str(r.headers.get("User-Agent"))]) == 1
    assert reasons(api) == ["DatasetValid", "TrainingPending"]


def test_a_job_made_next_to_an_outdated_config_is_made_again(api: KMockThread) -> None:
    """As above, but the ConfigMap there is not this spec's (an outdated news-config, e.g. of a
    deleted FineTuneJob of the same name): the Job created at the same time as the 409 could read
    it, so it is deleted, the ConfigMap brought up to date, and the Job made again."""
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    configmap(api, "news-config", {"job.json": "{}"})
    with Operator(retry_interval=0.2):
        api.wait_watching(FTJ_PATH)
        api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
        wait_for(lambda: len(job_posts(api, "news-train")) == 2, what="the Job made again")
        st = wait_for(lambda: status_of(api) if status_of(api).get("reason") == "TrainingPending" else None,
                      what="TrainingPending")
        assert json.loads(api.get(f"{CMS}/news-config")["data"]["job.json"]).get("spec")
    assert st["observedGeneration"] == 1
    assert len(api.requests("DELETE", f"{JOBS}/news-train")) == 1
    assert api.get(f"{JOBS}/news-train") is not None


def test_spec_change_replaces_the_children_of_the_old_spec(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator(retry_interval=0.2):
        old = wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        start_job(api, "news-train")
        wait_phase(api, "Running")
        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 2}, "spec": {"baseModel": "Qwen/Qwen3-4B"}})
        wait_for(lambda: len(job_posts(api, "news-train")) == 2, what="a second training Job")
        api.call("DELETE", f"{PODS}/news-train-x0")  # garbage-collected with the old Job
        assert wait_phase(api, "Pending")["reason"] == "TrainingPending"
        start_job(api, "news-train", pod="news-train-x1")
        new = api.get(f"{JOBS}/news-train")
        wait_for(lambda: json.loads(api.get(f"{CMS}/news-config")["data"]["job.json"])["spec"]["baseModel"] == "Qwen/Qwen3-4B",
                 what="config updated")
        st = wait_phase(api, "Running")
    assert len(api.requests("DELETE", f"{JOBS}/news-train")) == 1
    key = "tuneop.dev/spec-hash"
    assert old["metadata"]["annotations"][key] != new["metadata"]["annotations"][key]
    assert new["metadata"]["labels"]["tuneop.dev/generation"] == "2"
    assert st["observedGeneration"] == 2
    assert "SpecChanged" in reasons(api)


def test_refused_request_is_reported_and_retried(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.emulator.refusals[("POST", JOBS)] = (403, "Forbidden", 'jobs "news-train" is forbidden: exceeded quota: gpus')
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator(retry_interval=0.2):
        wait_for(lambda: status_of(api).get("reason") == "ApiError", what="ApiError in status")
        st = status_of(api)
        assert "exceeded quota" in st["message"]
        wait_for(lambda: len(api.requests("POST", JOBS)) >= 3, what="retries")
        assert api.get(f"{JOBS}/news-train") is None
        del api.emulator.refusals[("POST", JOBS)]
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job once allowed")
        start_job(api, "news-train")
        wait_phase(api, "Running")
    assert reasons(api).count("ApiError") == 1
    assert reasons(api)[-1] == "TrainingStarted"


def metric(metric_name: str, **labels: str) -> Optional[float]:
    from prometheus_client.parser import text_string_to_metric_families

    from tuneop.metrics import METRICS

    for family in text_string_to_metric_families(METRICS.render().decode()):
        for sample in family.samples:
            if sample.name == metric_name and sample.labels == labels:
                return sample.value
    return None


def test_metrics_follow_the_job_and_forget_it_when_deleted(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.emulator["get", f"{PODS}/metrics-train-p0/log"] << b'{"event":"progress","step":7,"total_steps":70,"loss":0.5}\n'
    api.create(FTJ_PATH, ftj("metrics", train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    job_labels = {"namespace": NS, "name": "metrics"}
    with Operator():
        wait_for(lambda: api.get(f"{JOBS}/metrics-train"), what="training Job")
        start_job(api, "metrics-train", pod="metrics-train-p0")
        wait_for(lambda: metric("tuneop_training_step", **job_labels) == 7, what="step gauge")
        assert metric("tuneop_training_progress_ratio", **job_labels) == 0.1
        assert metric("tuneop_training_loss", **job_labels) == 0.5
        assert (metric("tuneop_finetunejobs", phase="Running") or 0) >= 1
        assert (metric("tuneop_reconcile_total", kind="FineTuneJob", result="success") or 0) >= 1
        assert status_of(api, "metrics")["progress"]["totalSteps"] == 70
        api.call("DELETE", f"{FTJ_PATH}/metrics")
        wait_for(lambda: metric("tuneop_training_step", **job_labels) is None, what="series removed")


def test_event_of_the_job_version_already_reconciled_is_skipped(api: KMockThread) -> None:
    """The ADDED event of the training Job the reconcile itself created changes nothing: no
    second reconcile. A later change of the Job (here: the Job controller's status) reconciles."""
    import time

    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator(retry_interval=3600):  # no periodic reconcile of the pending job meanwhile
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        wait_phase(api, "Pending")
        time.sleep(1.0)  # the Job's ADDED event has long arrived
        # Every reconcile but the first (which assumes a new object has no children) reads the
        # config ConfigMap (the test's own GETs are of the FineTuneJob).
        assert len(api.requests("GET", f"{CMS}/news-config")) == 0  # the create reconcile only
        assert len(api.requests("PATCH", f"{FTJ_PATH}/news/status")) == 1

        # The Job controller counts the pod ready: one reconcile, and the phase says Running.
        api.patch(f"{JOBS}/news-train/status", {"status": {"active": 1, "ready": 1, "startTime": "2026-01-01T00:01:00Z"}})
        wait_for(lambda: len(api.requests("GET", f"{CMS}/news-config")) == 1, what="a reconcile of the Job change")
        wait_phase(api, "Running")
    assert len(job_posts(api)) == 1
    assert reasons(api) == ["DatasetValid", "TrainingPending", "TrainingStarted"]


def test_happy_path_costs_the_fewest_requests_and_leaves_no_kopf_trace(api: KMockThread) -> None:
    """From create to Pending on the training pod (dataset in a ConfigMap), with every handler of the operator
    registered (AdapterDeployments too): each request is one the reconcile needs. Reading the
    FineTuneJob and its 2 dependencies, creating 2 children (not read first: a new object has
    none), one status patch, two Events; kopf writes nothing of its own (no annotation, no
    finalizer) and nobody lists AdapterDeployments or reads the new job's progress yet."""
    import time

    import kopf
    from kopf.testing import KopfRunner

    from tuneop.adapterdeployment import handlers as adapterdeployment
    from tuneop.finetunejob import handlers as finetunejob

    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    registry = kopf.OperatorRegistry()
    finetunejob.register(registry, finetunejob.OperatorConfig(image="trainer:test", progress_interval=3600))
    adapterdeployment.register(registry, adapterdeployment.AdapterConfig(interval=3600))
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    with KopfRunner(["run", "--standalone", "--namespace", NS], registry=registry, settings=settings, timeout=30):
        api.wait_watching(FTJ_PATH)
        api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
        wait_for(lambda: api.requests("PATCH", f"{FTJ_PATH}/news/status"), what="status written")
        wait_for(lambda: len(api.events()) == 2, what="two Events")
        time.sleep(1.0)  # every event the create caused (the Job's ADDED, the status') has arrived

        def count(method: str, path: str) -> int:
            return len([r for r in api.requests(method, path) if r.url.path == path])

        assert count("GET", f"{FTJ_PATH}/news") == 0  # the first reconcile takes kopf's create event's body
        assert count("GET", f"{CMS}/news-config") == 0 and count("GET", f"{CMS}/news-data") == 1
        assert count("GET", f"{JOBS}/news-validate") == 0 and count("GET", f"{JOBS}/news-train") == 0
        assert count("GET", f"{PVCS}/adapters") == 1
        assert count("POST", CMS) == 2  # the test's own news-data + news-config
        assert count("POST", JOBS) == 1
        assert count("PATCH", f"{FTJ_PATH}/news/status") == 1
        assert count("PATCH", f"{FTJ_PATH}/news") == 0  # kopf: no annotation, no finalizer
        assert [r for r in api.requests("GET", PODS) if "finetunejob" in str(r.url.query)] == []  # no progress read
        ads = "/apis/tuneop.dev/v1alpha1/namespaces/team-a/adapterdeployments"
        lists = [r for r in api.requests("GET", ads) if "watch" not in str(r.url.query)]
        assert len(lists) <= 1  # kopf's own listing when its watch starts, never one per FineTuneJob
        body = get_ftj(api)
        assert not body["metadata"].get("finalizers")
        assert not [k for k in body["metadata"].get("annotations") or {} if k.startswith("tuneop.dev/")]
        assert body["status"]["phase"] == "Pending" and body["status"]["reason"] == "TrainingPending"
        assert body["status"]["observedGeneration"] == 1

        # The Job controller's first update of the new Job adds only what no reconcile reads
        # (startTime and zero counts): no reconcile. Its pod becoming ready is one.
        def reconciles() -> int:  # the operator's reads of the FineTuneJob (not the test's)
            return len([r for r in api.requests("GET", f"{FTJ_PATH}/news")
                        if r.url.path == f"{FTJ_PATH}/news" and "tuneop" in str(r.headers.get("User-Agent"))])

        created_rv = api.get(f"{JOBS}/news-train")["metadata"]["resourceVersion"]
        api.patch(f"{JOBS}/news-train/status", {"status": {
            "startTime": "2026-01-01T00:00:00Z", "ready": 0, "terminating": 0, "uncountedTerminatedPods": {}}})
        assert api.get(f"{JOBS}/news-train")["metadata"]["resourceVersion"] != created_rv
        time.sleep(1.0)
        assert reconciles() == 0 and count("PATCH", f"{FTJ_PATH}/news/status") == 1
        start_job(api, "news-train")
        wait_for(lambda: status_of(api).get("phase") == "Running", what="Running")
        assert reconciles() == 1

        # A spec change (new generation) is still seen, and handled by the same reconcile.
        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 2}, "spec": {"suspend": True}})
        wait_for(lambda: status_of(api).get("observedGeneration") == 2, what="generation 2 observed")
    assert reasons(api) == ["DatasetValid", "TrainingPending", "TrainingStarted", "Suspended"]


def test_a_pod_that_starts_without_a_job_event_is_noticed(api: KMockThread) -> None:
    """Jobs Pending on their pods are reconciled every retry interval (no Job event says why a pod
    waits, or that it started): the pod runs -> Running, with no change of the Job at all."""
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator(retry_interval=0.2):
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        assert wait_phase(api, "Pending")["reason"] == "TrainingPending"
        api.create(PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "news-train-x0", "labels": {"batch.kubernetes.io/job-name": "news-train"}},
            "status": {"phase": "Running"},
        })
        wait_phase(api, "Running")
        wait_for(lambda: "TrainingStarted" in reasons(api), what="TrainingStarted event")
    assert api.requests("PATCH", f"{JOBS}/news-train/status") == []
    assert reasons(api) == ["DatasetValid", "TrainingPending", "TrainingStarted"]


def test_evaluation_after_training_is_its_own_phase(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.emulator["get", f"{PODS}/news-train-x0/log"] << (
        b'{"event":"progress","step":30,"total_steps":30,"loss":0.1}\n'
        b'{"event":"checkpoint","step":30,"path":"/mnt/pvc/adapters/news/checkpoints/x/checkpoint-30"}\n'
        b'{"event":"evaluating","stage":"base","done":12,"total":60,"eta_seconds":30}\n'
    )
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator():
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        start_job(api, "news-train")
        st = wait_phase(api, "Evaluating")
        wait_for(lambda: "Evaluating" in reasons(api), what="Evaluating event")
        assert st["progress"]["evaluation"] == {"stage": "base", "done": 12, "total": 60, "etaSeconds": 30}
        assert st["progress"]["lastCheckpointStep"] == 30 and st["progress"]["step"] == 30
        assert st["message"] == "scoring the base model on the test split (12/60 rows)"
        done = {"event": "done", "adapter": {"sha256": SHA}}
        finish_job(api, "news-train", container="trainer", message=json.dumps(done))
        wait_phase(api, "Succeeded")
        wait_for(lambda: "Succeeded" in reasons(api), what="Succeeded event")
    assert reasons(api) == ["DatasetValid", "TrainingPending", "TrainingStarted", "Evaluating", "Succeeded"]


def test_metrics_of_finished_jobs_come_back_after_a_restart(api: KMockThread) -> None:
    from tuneop.metrics import METRICS

    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj("done", train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator():
        wait_for(lambda: api.get(f"{JOBS}/done-train"), what="training Job")
    api.patch(f"{FTJ_PATH}/done/status", {"status": {"progress": {"step": 30, "totalSteps": 30, "loss": 0.25}}})
    finish_job(api, "done-train", container="trainer", message=json.dumps({"event": "done", "adapter": {"sha256": SHA}}))
    labels = {"namespace": NS, "name": "done"}
    METRICS.forget(NS, "done")  # a new operator process starts with no series
    assert metric("tuneop_training_step", **labels) is None
    with Operator():
        wait_phase(api, "Succeeded", "done")
        wait_for(lambda: metric("tuneop_training_step", **labels) == 30, what="step series re-exported")
        assert metric("tuneop_training_progress_ratio", **labels) == 1.0
        assert metric("tuneop_training_loss", **labels) == 0.25


def test_a_training_pod_that_cannot_be_scheduled_is_named_in_the_status(api: KMockThread) -> None:
    """On a real cluster a pod asking for a GPU no node has stayed Pending while the phase said
    Running: the phase stays Pending and the reason is the scheduler's."""
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    with Operator(retry_interval=0.2):
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        api.create(PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "news-train-x0", "labels": {"batch.kubernetes.io/job-name": "news-train"}},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
            }]},
        })
        wait_for(lambda: status_of(api).get("reason") == "Unschedulable", what="Unschedulable in status")
        st = status_of(api)
        assert st["phase"] == "Pending" and "Insufficient nvidia.com/gpu" in st["message"]
        wait_for(lambda: "Unschedulable" in reasons(api), what="Unschedulable event")
        # A GPU node appears: the pod runs.
        api.patch(f"{PODS}/news-train-x0", {"status": {"phase": "Running", "conditions": [
            {"type": "PodScheduled", "status": "True"}]}})
        wait_phase(api, "Running")
        wait_for(lambda: "TrainingStarted" in reasons(api), what="TrainingStarted event")
    warning = [e for e in api.events() if e["reason"] == "Unschedulable"]
    assert len(warning) == 1 and warning[0]["type"] == "Warning"
    assert reasons(api) == ["DatasetValid", "TrainingPending", "Unschedulable", "TrainingStarted"]


def test_a_volume_that_cannot_be_mounted_is_named_in_the_status(api: KMockThread) -> None:
    """The kubelet says it only in an Event (FailedMount): read while the job waits on its pod."""
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}))
    events = f"/api/v1/namespaces/{NS}/events"
    with Operator(retry_interval=0.2):
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        wait_phase(api, "Pending")
        assert [r for r in api.requests("GET", events) if "fieldSelector" in str(r.url.query)] == []  # no pod yet
        api.create(PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "news-train-x0", "uid": "pod-1", "labels": {"batch.kubernetes.io/job-name": "news-train"}},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}]},
        })
        api.create(events, {
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": "news-train-x0.mount"},
            "involvedObject": {"kind": "Pod", "name": "news-train-x0", "uid": "pod-1"},
            "reason": "FailedMount", "type": "Warning", "lastTimestamp": "2026-01-01T00:01:00Z",
            "message": 'MountVolume.SetUp failed for volume "pvc-1" : hostPath type check failed: /data is not a directory',
        })
        wait_for(lambda: status_of(api).get("reason") == "VolumeMountFailed", what="VolumeMountFailed in status")
        assert "hostPath type check failed" in status_of(api)["message"]
        assert status_of(api)["phase"] == "Pending"
        wait_for(lambda: "VolumeMountFailed" in reasons(api), what="VolumeMountFailed event")


def test_max_cost_refuses_the_training_job_until_raised_and_the_actual_cost_is_recorded(api: KMockThread) -> None:
    """status.cost before the training Job (dataset tokens, the trainer's measured speed, the
    operator's GPU price); spec.maxCostUSD under it creates no training Job; raised, it runs; at
    the end the Job's run time x GPUs x price."""
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}},
                             maxCostUSD=0.0001, hyperparameters={"epochs": 100}, resources={"gpus": 2}))
    with Operator(gpu_hourly_price_usd={"nvidia.com/gpu": 3600.0}):
        st = wait_phase(api, "Pending")
        st = wait_for(lambda: status_of(api) if status_of(api).get("reason") == "CostLimitExceeded" else None,
                      what="CostLimitExceeded")
        est = st["cost"]["estimateUSD"]
        assert est > 0.0001 and st["cost"]["source"] == "throughput"
        assert f"${est:,.2f}" in st["message"] and "$0.00" in st["message"]
        assert api.get(f"{JOBS}/news-train") is None and job_posts(api) == []
        ev = [e for e in api.events() if e["reason"] == "CostLimitExceeded"]
        assert len(ev) == 1 and ev[0]["type"] == "Warning"
        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 2}, "spec": {"maxCostUSD": est + 1}})
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job once the limit is raised")
        # The Job controller's times (it sets completionTime with the Complete condition).
        api.patch(f"{JOBS}/news-train/status", {"status": {"startTime": "2026-01-01T00:00:00Z",
                                                           "completionTime": "2026-01-01T00:00:30Z"}})
        finish_job(api, "news-train", container="trainer",
                   message=json.dumps({"event": "done", "adapter": {"path": "/x", "sha256": SHA}}))
        st = wait_phase(api, "Succeeded")
        st = wait_for(lambda: status_of(api) if "actualUSD" in (status_of(api).get("cost") or {}) else None,
                      what="actual cost")
    assert st["cost"]["actualGpuHours"] == round(30 * 2 / 3600, 4) and st["cost"]["actualUSD"] == 60.0
    assert st["cost"]["estimateUSD"] == est
    assert len(job_posts(api, "news-train")) == 1
    assert metric("tuneop_finetunejob_cost_usd", namespace=NS, name="news") == 60.0
    assert metric("tuneop_finetunejob_estimated_cost_usd", namespace=NS, name="news") == est
