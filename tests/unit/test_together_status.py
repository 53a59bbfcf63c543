"""backends/together/status.py: the backend-together reducer, state in -> actions + status out. No cluster,
no network: Together jobs are wire dicts as ``TogetherClient.retrieve`` returns them."""
from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any, Optional

import pytest

from tuneop.backends import registered as backends
from tuneop.backends.together import builders as tb
from tuneop.backends.together import client as T
from tuneop.backends.together import status as TS
from tuneop.finetunejob import builders as b
from tuneop.finetunejob import reconcile as s

NOW = "2026-01-01T00:00:00Z"
SHA = "c" * 64
KEY_REF = {"name": "together", "key": "api-key"}


def body(status: Optional[dict[str, Any]] = None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "backend": "together",
        "baseModel": "Qwen/Qwen2.5-7B-Instruct",
        "dataset": {"train": {"pvc": {"claimName": "datasets", "path": "news/train.jsonl"}}},
        "output": {"pvc": {"claimName": "adapters", "path": "news"}},
        "hyperparameters": {"epochs": 2, "batchSize": 16},
        "together": {"apiKeySecretRef": KEY_REF, "suffix": "news-v1"},
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


def run(ftj: dict[str, Any], **observed: Any) -> s.Decision:
    return backends.reconcile(ftj, s.Observed(**observed), image="trainer:1", now=NOW,
                       together_base_url="http://127.0.0.1:9")


def after(ftj: dict[str, Any], d: s.Decision, **spec: Any) -> dict[str, Any]:
    out = copy.deepcopy(ftj)
    out["status"] = copy.deepcopy(d.status)
    if spec:
        out["spec"].update(spec)
        out["metadata"]["generation"] += 1
    return out


def finished(job: dict[str, Any], ok: bool = True) -> dict[str, Any]:
    j = copy.deepcopy(job)
    j["status"] = ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]} if ok else
                   {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]})
    return j


def pod(job_name: str, container: str, message: dict[str, Any], exit_code: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{job_name}-p", "labels": {"batch.kubernetes.io/job-name": job_name}},
        "status": {"containerStatuses": [{"name": container, "state": {"terminated": {
            "exitCode": exit_code, "message": json.dumps(message), "finishedAt": NOW}}}]},
    }


UPLOADED = {"event": "uploaded", "trainingFile": "file-train", "validationFile": None, "format": "messages",
            "dataset": {"format": "messages", "trainRows": 12, "validationRows": 0, "estimatedTokens": 300}}


def ft(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "ft-1", "status": status, "user_id": "u", "events": [], **extra}


def reasons(d: s.Decision) -> list[str]:
    return [e["reason"] for e in d.events]


def cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
    c = s.find_condition(st.get("conditions", []), type_)
    assert c is not None
    return c


def created(ftj: dict[str, Any]) -> dict[str, Any]:
    """A FineTuneJob walked to 'Together job ft-1 created'."""
    d = run(ftj)
    ftj = after(ftj, d)
    up = d.create[1]
    d = run(ftj, config_map=d.create[0], upload_job=finished(up),
            upload_pods=[pod("news-upload", "upload", UPLOADED)])
    ftj = after(ftj, d)
    d2 = TS.job_created(ftj, {"id": "ft-1", "status": "pending", "model_output_name": "acct/q-news"}, False, now=NOW)
    return after(ftj, d2)


# ---------------------------------------------------------------------------------- spec


def test_unsupported_settings_fail_validation_naming_the_field() -> None:
    d = run(body(hyperparameters={"maxSteps": 100}))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "UnsupportedByBackend"
    c = cond(d.status, "Validated")
    assert c["status"] == "False" and "hyperparameters.maxSteps" in c["message"]
    assert d.create == [] and d.calls == []


def test_unknown_model_needs_together_model() -> None:
    d = run(body(baseModel="some/unknown-model"))
    assert d.status["reason"] == "UnsupportedByBackend" and "together.model" in d.status["message"]
    d = run(body(baseModel="some/unknown-model",
                 together={"apiKeySecretRef": KEY_REF, "model": "acct/custom-base"}))
    assert d.status["phase"] == "Validating"


def test_ignored_settings_are_one_normal_event() -> None:
    ftj = body(resources={"gpus": 4}, hyperparameters={"epochs": 2, "batchSize": 16, "precision": "bf16"})
    d = run(ftj)
    ev = [e for e in d.events if e["reason"] == "SettingsIgnored"]
    assert len(ev) == 1 and ev[0]["type"] == "Normal"
    assert "resources" in ev[0]["message"] and "precision" in ev[0]["message"]
    d2 = run(after(ftj, d), upload_job=d.create[1], config_map=d.create[0])
    assert "SettingsIgnored" not in reasons(d2)


def test_missing_secret_is_a_dependency() -> None:
    d = run(body(), missing=["Secret together (key api-key)"])
    assert d.status["phase"] == "Pending" and d.status["reason"] == "DependencyMissing"
    assert "Secret together" in d.status["message"]
    assert d.create == [] and d.retry_after


def test_together_dependencies_name_pvcs_configmaps_and_the_key() -> None:
    spec = s.spec_of(body(dataset={"train": {"configMap": {"name": "d", "key": "t.jsonl"}},
                                   "test": {"pvc": {"claimName": "tests", "path": "t.jsonl"}}}))
    assert TS.together_dependencies(spec) == [
        ("PersistentVolumeClaim", "adapters", None),
        ("ConfigMap", "d", "t.jsonl"),
        ("Secret", "together", "api-key"),
    ]


# ---------------------------------------------------------------------------------- upload


def test_upload_job_then_create_with_suffix_recorded_first() -> None:
    ftj = body()
    d = run(ftj)
    assert [o["metadata"]["name"] for o in d.create] == ["news-config", "news-upload"]
    assert d.status["phase"] == "Validating" and d.status["reason"] == "Uploading"
    assert cond(d.status, "Validated")["status"] == "Unknown"
    assert d.calls == []
    ftj = after(ftj, d)

    d = run(ftj, config_map=d.create[0], upload_job=finished(d.create[1]),
            upload_pods=[pod("news-upload", "upload", UPLOADED)])
    tg = d.status["together"]
    suffix = T.unique_suffix("team-a", "news", "u1", 1, prefix="news-v1")
    assert tg == {"trainingFile": "file-train", "datasetFormat": "messages", "suffix": suffix}
    assert d.status["dataset"]["trainRows"] == 12
    assert cond(d.status, "Validated")["status"] == "True"
    assert d.status["phase"] == "Pending" and d.status["reason"] == "CreatingTogetherJob"
    [action] = d.calls
    assert action["op"] == "create"
    assert action["params"]["suffix"] == suffix
    assert action["params"]["training_file"] == "file-train"
    assert action["params"]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert "DatasetValid" in reasons(d) and "CreatingTogetherJob" not in reasons(d)
    assert d.retry_after  # looked at again if the create never reports back

    # A restart before the job id was written: the same suffix again (create_or_adopt adopts).
    d2 = run(after(ftj, d), config_map=d.create and d.create[0] or None,
             upload_job=finished(tb.build_upload_job(ftj)),
             upload_pods=[pod("news-upload", "upload", UPLOADED)])
    assert d2.calls[0]["params"]["suffix"] == suffix


def test_upload_failures_keep_user_and_platform_reasons_apart() -> None:
    ftj = body()
    d = run(ftj)
    ftj = after(ftj, d)
    bad = {"event": "error", "reason": "DatasetInvalid", "message": "line 3: invalid JSON"}
    d1 = run(ftj, upload_job=finished(d.create[1], ok=False),
             upload_pods=[pod("news-upload", "upload", bad, exit_code=2)])
    assert d1.status["reason"] == "DatasetInvalid" and "line 3" in d1.status["message"]
    assert cond(d1.status, "Validated")["status"] == "False"
    rejected = {"event": "error", "reason": "TogetherFileInvalid", "message": "Together rejected x: bad rows"}
    d2 = run(ftj, upload_job=finished(d.create[1], ok=False),
             upload_pods=[pod("news-upload", "upload", rejected, exit_code=2)])
    assert d2.status["reason"] == "DatasetInvalid" and "bad rows" in d2.status["message"]
    down = {"event": "error", "reason": "TogetherUnavailable", "message": "upload: HTTP 503"}
    d3 = run(ftj, upload_job=finished(d.create[1], ok=False),
             upload_pods=[pod("news-upload", "upload", down, exit_code=1)])
    assert d3.status["reason"] == "TogetherUnavailable" and d3.status["phase"] == "Failed"


def test_bad_inline_dataset_fails_before_any_pod() -> None:
    bad = {"ok": False, "rows": 2, "errors": [{"line": 2, "message": "invalid JSON"}], "source": "cm"}
    d = run(body(dataset={"train": {"configMap": {"name": "d", "key": "t"}}}), inline_datasets={"train": bad})
    assert d.status["reason"] == "DatasetInvalid" and d.create == []


def test_suspended_before_upload_runs_nothing() -> None:
    d = run(body(suspend=True))
    assert d.status["phase"] == "Suspended"
    assert [o["kind"] for o in d.create] == ["ConfigMap"] and d.calls == []


# ---------------------------------------------------------------------------------- monitor


def test_created_then_mirrors_together_status_progress_cost_and_events() -> None:
    ftj = created(body())
    assert ftj["status"]["together"]["jobId"] == "ft-1"
    assert ftj["status"]["reason"] == "TogetherJobCreated"
    assert TS.needs_poll(ftj) and TS.needs_finalizer(ftj)

    events = [
        {"type": "job_start", "message": "Job started", "level": "info"},
        {"type": "checkpoint_save", "message": "Checkpoint saved", "step": 15, "total_steps": 30},
    ]
    running = ft("running", token_count=15000, total_price=500_000_000, model_output_name="acct/q-news",
                 progress={"estimate_available": True, "seconds_remaining": 90}, events=events)
    d = run(ftj, upload_job=finished(tb.build_upload_job(ftj)), together_job=running,
            together_events=events, together_event_cursor=2)
    st_ = d.status
    assert st_["phase"] == "Running" and st_["reason"] == "TogetherRunning"
    assert st_["progress"]["step"] == 15 and st_["progress"]["totalSteps"] == 30
    assert st_["progress"]["etaSeconds"] == 90
    tg = st_["together"]
    assert tg["status"] == "running" and tg["eventCursor"] == 2
    assert tg["costUSD"] == pytest.approx(0.5) and tg["tokenCount"] == 15000
    assert tg["modelOutputName"] == "acct/q-news"
    # One Kubernetes Event per Together event; Together's status changes are not doubled.
    assert reasons(d) == ["JobStart", "CheckpointSave"]
    assert d.events[1]["message"].startswith("step 15/30")
    assert d.create == [] and d.calls == []

    # No poll this time (e.g. a Job event): the status stays as it was.
    d2 = run(after(ftj, d), upload_job=finished(tb.build_upload_job(ftj)))
    assert d2.status["reason"] == "TogetherRunning" and d2.events == []


def test_poll_errors_wait_and_404_fails() -> None:
    ftj = created(body())
    d = run(ftj, together_error={"reason": "TogetherRateLimited", "message": "retrieve ft-1: HTTP 429", "statusCode": 429})
    assert d.status["phase"] == "Pending" and d.status["reason"] == "TogetherRateLimited"
    assert d.retry_after and d.status["reason"] in s.RETRY_REASONS
    d = run(ftj, together_error={"reason": "TogetherRejected", "message": "retrieve ft-1: HTTP 404", "statusCode": 404})
    assert d.status["phase"] == "Failed" and d.status["reason"] == "TogetherJobNotFound"


def test_user_error_and_error_fail_with_different_reasons_and_togethers_message() -> None:
    ftj = created(body())
    ev = [{"type": "job_error", "message": "Invalid dataset: rows too long", "level": "error"}]
    d = run(ftj, together_job=ft("user_error", events=ev), together_events=ev, together_event_cursor=1)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "TogetherUserError"
    assert "rows too long" in d.status["message"]
    assert reasons(d) == ["JobError", "TogetherUserError"]
    d2 = run(ftj, together_job=ft("error", events=ev), together_events=ev, together_event_cursor=1)
    assert d2.status["reason"] == "TogetherError" and "rows too long" in d2.status["message"]
    assert not TS.needs_poll(after(ftj, d2)) and not TS.needs_finalizer(after(ftj, d2))


def test_cancelled_outside_tuneop_fails() -> None:
    d = run(created(body()), together_job=ft("cancelled"))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "TogetherCancelled"


def test_cancelled_outside_tuneop_keeps_togethers_last_event_message() -> None:
    ev = [{"type": "job_start", "message": "Job started"},
          {"type": "job_stopped", "level": "warning", "message": "Job cancelled by bob@example.com"}]
    d = run(created(body()), together_job=ft("cancelled", events=ev), together_events=ev, together_event_cursor=2)
    assert d.status["reason"] == "TogetherCancelled"
    assert d.status["message"] == "Together job ft-1 was cancelled outside tuneop: Job cancelled by bob@example.com"
    assert "Job cancelled by bob@example.com" in cond(d.status, "Failed")["message"]


def running_with_progress() -> dict[str, Any]:
    ftj = created(body())
    events = [{"type": "checkpoint_save", "message": "saved", "step": 15, "total_steps": 30}]
    d = run(ftj, together_job=ft("running", events=events, epochs_completed=1, token_count=15000,
                                 total_price=500_000_000), together_events=events, together_event_cursor=1)
    return after(ftj, d)


def test_malformed_reply_fields_keep_the_status_and_name_the_field() -> None:
    ftj = running_with_progress()
    before = copy.deepcopy(ftj["status"])
    bad_events = [{"type": "checkpoint_save", "message": "saved", "step": "ten", "total_steps": 30}]
    bad = ft("running", events=bad_events, epochs_completed="two", token_count="lots", total_price="free")
    d = run(ftj, together_job=bad, together_events=bad_events[:0], together_event_cursor=1)
    st_ = d.status
    assert st_["phase"] == "Running" and st_["reason"] == "TogetherRunning"
    assert st_["progress"]["step"] == 15 and st_["progress"]["epoch"] == 1.0 and st_["progress"]["totalSteps"] == 30
    assert st_["together"]["tokenCount"] == 15000 and st_["together"]["costUSD"] == pytest.approx(0.5)
    c = cond(st_, "TogetherReplyUnderstood")
    assert c["status"] == "False" and c["reason"] == "TogetherReplyMalformed"
    assert "Together reply field 'step' is not a number: 'ten'" in c["message"]
    assert "Together reply field 'epochs_completed' is not a number: 'two'" in c["message"]
    assert [(e["type"], e["reason"]) for e in d.events] == [("Warning", "TogetherReplyMalformed")]
    assert TS.needs_poll(after(ftj, d))
    # the same reply again: no second Event; a good reply: the condition goes
    d2 = run(after(ftj, d), together_job=bad)
    assert d2.events == [] and cond(d2.status, "TogetherReplyUnderstood")["status"] == "False"
    good = [{"type": "checkpoint_save", "message": "saved", "step": 20, "total_steps": 30}]
    d3 = run(after(after(ftj, d), d2), together_job=ft("running", events=good))
    assert s.find_condition(d3.status["conditions"], "TogetherReplyUnderstood") is None
    assert d3.status["progress"]["step"] == 20
    assert before["together"]["status"] == d3.status["together"]["status"] == "running"


@pytest.mark.parametrize("reply", ["<html>502 Bad Gateway</html>", [{"id": "ft-1"}], {"id": "ft-1"}, 42])
def test_a_reply_that_is_no_job_never_raises_and_keeps_the_status(reply: Any) -> None:
    ftj = running_with_progress()
    d = run(ftj, together_job=reply)
    assert d.status["phase"] == "Running" and d.status["reason"] == "TogetherRunning"
    assert d.status["together"]["status"] == "running" and d.status["progress"]["step"] == 15
    c = cond(d.status, "TogetherReplyUnderstood")
    assert c["status"] == "False" and "Together reply" in c["message"]
    assert TS.needs_poll(after(ftj, d))


def test_unknown_together_status_is_a_condition_and_polling_goes_on() -> None:
    ftj = created(body())
    d = run(ftj, together_job=ft("hibernating"))
    st_ = d.status
    assert st_["phase"] == "Pending" and st_["reason"] == "TogetherUnknownStatus"
    assert "'hibernating'" in st_["message"] and "still polling" in st_["message"]
    c = cond(st_, "TogetherReplyUnderstood")
    assert c["status"] == "False" and c["reason"] == "TogetherUnknownStatus" and "'hibernating'" in c["message"]
    assert [(e["type"], e["reason"]) for e in d.events] == [("Warning", "TogetherUnknownStatus")]
    assert st_["together"]["status"] == "hibernating" and TS.needs_poll(after(ftj, d))
    # once Together says something known again, it is mirrored and the condition goes
    d2 = run(after(ftj, d), together_job=ft("running"))
    assert d2.status["reason"] == "TogetherRunning"
    assert s.find_condition(d2.status["conditions"], "TogetherReplyUnderstood") is None


def at(seconds: int) -> str:
    return (dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def test_retry_after_of_a_poll_delays_the_next_poll_within_bounds() -> None:
    ftj = running_with_progress()
    err = {"reason": "TogetherRateLimited", "message": "retrieve ft-1: HTTP 429", "statusCode": 429}
    d = run(ftj, together_error={**err, "retryAfter": 120})
    assert d.retry_after == 120 and d.status["together"]["retryAt"] == at(120)
    assert d.status["reason"] == "TogetherRateLimited" and "120 s" in d.status["message"]
    waiting = after(ftj, d)
    assert not TS.poll_due(waiting, at(60)) and TS.poll_due(waiting, at(120))
    assert TS.needs_poll(waiting)  # the monitor keeps ticking; observe skips the call until then
    for given, used in ((0.2, 5), (86_400, 600)):
        assert run(ftj, together_error={**err, "retryAfter": given}).retry_after == used
    d = run(ftj, together_error=err)  # no Retry-After: the usual delay, nothing recorded
    assert d.retry_after == TS.POLL_RETRY_SECONDS and "retryAt" not in d.status["together"]
    # the next successful poll forgets it
    d2 = run(waiting, together_job=ft("running"))
    assert "retryAt" not in d2.status["together"]


def test_retry_after_of_a_create_delays_the_next_create() -> None:
    ftj = body()
    d = run(ftj)
    ftj = after(ftj, d)
    d = run(ftj, config_map=d.create[0], upload_job=finished(d.create[1]),
            upload_pods=[pod("news-upload", "upload", UPLOADED)])
    assert d.calls[0]["op"] == "create"
    ftj = after(ftj, d)
    failed = TS.call_failed(ftj, "create", "TogetherRateLimited", "create fine-tune: HTTP 429", user_error=False,
                            now=NOW, retry_after=90)
    assert failed.retry_after == 90 and failed.status["together"]["retryAt"] == at(90)
    assert failed.status["reason"] == "TogetherRateLimited" and failed.status["together"]["suffix"]
    ftj = after(ftj, failed)
    obs = dict(config_map=b.build_config_map(ftj), upload_job=finished(tb.build_upload_job(ftj)),
               upload_pods=[pod("news-upload", "upload", UPLOADED)])
    early = backends.reconcile(ftj, s.Observed(**obs), image="trainer:1", now=at(30))
    assert early.calls == [] and early.retry_after == 60
    assert early.status["reason"] == "TogetherRateLimited" and early.status["reason"] in s.RETRY_REASONS
    due = backends.reconcile(ftj, s.Observed(**obs), image="trainer:1", now=at(90))
    assert [a["op"] for a in due.calls] == ["create"] and "retryAt" not in due.status["together"]


# ---------------------------------------------------------------------------------- download


def test_completed_downloads_then_succeeds_with_adapter_and_model_name() -> None:
    ftj = created(body())
    done = ft("completed", total_price=1_234_567_890, model_output_name="acct/q-news-final",
              events=[{"type": "checkpoint_save", "step": 30, "total_steps": 30, "message": "saved"}])
    d = run(ftj, together_job=done, config_map=b.build_config_map(ftj))
    [job] = d.create
    assert job["metadata"]["name"] == "news-download"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][-2:] == ["--job-id", "ft-1"]
    assert d.status["phase"] == "Running" and d.status["reason"] == "Downloading"
    assert d.status["together"]["costUSD"] == pytest.approx(1.23456789)
    assert not TS.needs_poll(after(ftj, d))
    ftj = after(ftj, d)

    msg = {"event": "done", "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA, "sizeBytes": 10},
           "together": {"jobId": "ft-1", "modelOutputName": "acct/q-news-final"}}
    d = run(ftj, download_job=finished(job), download_pods=[pod("news-download", "download", msg)])
    assert d.status["phase"] == "Succeeded"
    assert d.status["adapter"] == {"location": "pvc://adapters/news/adapter", "sha256": SHA, "sizeBytes": 10}
    assert d.status["together"]["modelOutputName"] == "acct/q-news-final"
    assert d.status["progress"]["step"] == 30
    assert cond(d.status, "Succeeded")["status"] == "True"
    assert reasons(d) == ["Succeeded"]


def test_download_failure_is_reported() -> None:
    ftj = created(body())
    d = run(ftj, together_job=ft("completed"), config_map=b.build_config_map(ftj))
    ftj = after(ftj, d)
    err = {"event": "error", "reason": "ArchiveInvalid", "message": "archive member escapes: ../x"}
    d = run(ftj, download_job=finished(d.create[0], ok=False),
            download_pods=[pod("news-download", "download", err, exit_code=2)])
    assert d.status["reason"] == "ArchiveInvalid" and "escapes" in d.status["message"]


# ---------------------------------------------------------------------------------- suspend


def test_suspend_cancels_shows_suspended_and_resume_creates_a_new_job() -> None:
    ftj = created(body())
    ftj["status"]["together"]["status"] = "running"
    ftj = after(ftj, s.Decision(status=ftj["status"]), suspend=True)
    d = run(ftj, together_job=ft("running"))
    assert d.calls == [{"op": "cancel", "jobId": "ft-1", "stale": False}]
    assert d.status["phase"] == "Suspended" and d.status["together"]["cancelRequested"] is True
    assert "being cancelled" in d.status["message"]
    ftj = after(ftj, d)
    d = run(ftj, together_job=ft("cancel_requested"))
    assert d.calls == [] and d.status["phase"] == "Suspended"
    ftj = after(ftj, d)
    d = run(ftj, together_job=ft("cancelled"))
    assert d.status["phase"] == "Suspended" and d.status["reason"] == "Suspended"
    assert "cancelled" in d.status["message"] and d.calls == []
    ftj = after(ftj, d)
    assert not TS.needs_poll(ftj) and not TS.needs_finalizer(ftj)

    # Resume: a cancelled Together job cannot be resumed; a new one, with a new suffix.
    old_suffix = ftj["status"]["together"]["suffix"]
    ftj = after(ftj, s.Decision(status=ftj["status"]), suspend=False)
    d = run(ftj)
    [action] = d.calls
    assert action["op"] == "create" and action["params"]["suffix"] != old_suffix
    assert action["params"]["training_file"] == "file-train"  # no second upload
    assert "jobId" not in d.status["together"]
    assert d.status["phase"] == "Pending" and d.status["reason"] == "CreatingTogetherJob"


def test_suspend_before_create_creates_nothing() -> None:
    ftj = body()
    d = run(ftj)
    ftj = after(ftj, d, suspend=True)
    d = run(ftj, upload_job=finished(tb.build_upload_job(ftj)), upload_pods=[pod("news-upload", "upload", UPLOADED)])
    assert d.status["phase"] == "Suspended" and d.calls == []


# ---------------------------------------------------------------------------------- spec change


def test_spec_change_cancels_the_old_job_and_starts_over() -> None:
    ftj = created(body())
    ftj["status"]["together"]["status"] = "running"
    upload = finished(tb.build_upload_job(ftj))
    new = after(ftj, s.Decision(status=ftj["status"]), hyperparameters={"epochs": 3, "batchSize": 16})
    d = run(new, upload_job=upload)
    assert {"op": "cancel", "jobId": "ft-1", "stale": True} in d.calls
    assert d.status["together"] == {"staleJobIds": ["ft-1"]}
    assert [r["name"] for r in d.delete] == ["news-upload"]
    assert d.status["reason"] == "SpecChanged"
    assert TS.needs_finalizer(after(new, d))
    d2 = TS.stale_cancelled(after(new, d), "ft-1", now=NOW)
    assert "together" not in d2.status and reasons(d2) == ["TogetherJobCancelled"]


# ---------------------------------------------------------------------------------- call results


def test_call_results() -> None:
    ftj = after(body(), run(body()))
    d = TS.call_failed(ftj, "create", "TogetherLimits", "hyperparameters.batchSize: 999 is above", user_error=True, now=NOW)
    assert d.status["phase"] == "Failed" and cond(d.status, "Validated")["status"] == "False"
    d = TS.call_failed(ftj, "create", "TogetherUnavailable", "create fine-tune: HTTP 503", user_error=False, now=NOW)
    assert d.status["phase"] == "Validating" and d.status["reason"] == "TogetherUnavailable" and d.retry_after
    d = TS.job_created(ftj, {"id": "ft-9", "status": "queued"}, True, now=NOW)
    assert d.status["together"]["jobId"] == "ft-9" and reasons(d) == ["TogetherJobAdopted"]


def test_deletion_targets() -> None:
    ftj = created(body())
    assert TS.jobs_to_cancel(ftj) == (["ft-1"], None)
    ftj["status"]["together"].pop("jobId")
    assert TS.jobs_to_cancel(ftj) == ([], ftj["status"]["together"]["suffix"])
    k8s = {"spec": {"backend": "kubernetes"}, "status": {"phase": "Running"}}
    assert not TS.needs_finalizer(k8s) and not TS.needs_poll(body())


def test_status_never_holds_secret_material() -> None:
    ftj = created(body())
    text = json.dumps(ftj["status"])
    assert "api-key" not in text and "secretKeyRef" not in text
    assert b.spec_hash(s.spec_of(ftj)) == ftj["status"]["specHash"]
