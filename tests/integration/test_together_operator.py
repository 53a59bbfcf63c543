"""FineTuneJob backend: together through the real kopf loop against kmock, and the fake Together
server (tests/fake_together) driven only through the real ``together`` SDK.

The operator reads ``TOGETHER_BASE_URL`` from its environment (pointed at the fake server) and the
API key from the Secret. The tests play the cluster's part for the short pods: the upload pod's
work is done with the same client (``TogetherClient.upload_file``) and its result handed back as
the pod's termination message; the download pod's result is its termination message (the real
download and extraction are covered in test_together_sdk.py). Outcomes are asserted, never timings.
"""
from __future__ import annotations

import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fake_together.server import FakeTogether  # noqa: E402
from kmockenv import FTJ_PATH, NS, KMockThread, Operator, wait_for  # noqa: E402
from test_finetunejob_operator import (  # noqa: E402
    JOBS,
    finish_job,
    job_posts,
    metric,
    pvc,
    reasons,
    status_of,
    wait_phase,
)
from tuneop.backends.together import client as T  # noqa: E402

KEY = "tk-SECRET-operator-7f3a9c0e1d"
KEY_B64 = base64.b64encode(KEY.encode()).decode()
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
SHA = "d" * 64
FAST = {"retry-after-ms": "10"}
CREATE = r"^/v1/fine-tunes$"
RETRIEVE = r"^/v1/fine-tunes/ft-[^/]+$"
ROWS = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    for i in range(8)
]


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTogether]:
    with FakeTogether(api_key=KEY) as f:
        monkeypatch.setenv("TOGETHER_BASE_URL", f.url)
        yield f


def together_operator(**kw: Any) -> Operator:
    kw.setdefault("together_poll_interval", 0.2)
    kw.setdefault("retry_interval", 0.3)
    return Operator(args=("--verbose",), **kw)


def ftj(name: str = "news", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "backend": "together",
            "baseModel": "Qwen/Qwen2.5-7B-Instruct",
            "dataset": {"train": {"pvc": {"claimName": "datasets", "path": "news/train.jsonl"}}},
            "hyperparameters": {"epochs": 2, "batchSize": 16, "learningRate": 1e-4, "maxSeqLength": 2048},
            "output": {"pvc": {"claimName": "adapters", "path": name}},
            "together": {"apiKeySecretRef": {"name": "together", "key": "api-key"}, "suffix": "news-v1"},
            **spec,
        },
    }


def cluster(api: KMockThread) -> None:
    pvc(api, "datasets")
    pvc(api, "adapters")
    api.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "together"},
                         "type": "Opaque", "data": {"api-key": KEY_B64}})


def upload_pod(api: KMockThread, fake: FakeTogether, tmp_path: Path, name: str = "news") -> str:
    """Play the upload pod: upload the data with the SDK, then its termination message."""
    path = tmp_path / f"{name}-train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with T.TogetherClient(KEY, fake.url, sleep=lambda s: None) as client:
        file_id = client.upload_file(str(path))["id"]
    result = {"event": "uploaded", "trainingFile": file_id, "validationFile": None, "format": "messages",
              "dataset": {"format": "messages", "trainRows": len(ROWS), "validationRows": 0, "estimatedTokens": 64}}
    finish_job(api, f"{name}-upload", container="upload", message=json.dumps(result))
    return file_id


def job_id(api: KMockThread, name: str = "news") -> Optional[str]:
    return (status_of(api, name).get("together") or {}).get("jobId")


def together_reasons(fake: FakeTogether, jid: str) -> list[str]:
    return [T.event_to_k8s(e)[1] for e in fake.jobs[jid]["events"]]


def posts(fake: FakeTogether, regex: str) -> int:
    return len(fake.calls("POST", regex))


def stored_texts(api: KMockThread) -> list[str]:
    """Every object kmock holds (all versions) and every request body it received, but the Secret."""
    out = []
    for _, history in list(api.emulator.objects.items()):
        text = json.dumps(list(history), default=str)
        if '"kind": "Secret"' not in text:
            out.append(text)
    for r in list(api.emulator._requests):
        if r.url.path.startswith(SECRETS):
            continue
        out.append(json.dumps(r.data, default=str))
    return out


def assert_key_nowhere(api: KMockThread, *texts: str) -> None:
    for text in [*texts, *stored_texts(api)]:
        assert KEY not in text
        assert KEY_B64 not in text


# ---------------------------------------------------------------------------------- tests


def test_happy_path_upload_create_mirror_download_succeeded(
    api: KMockThread, fake: FakeTogether, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cluster(api)
    api.create(FTJ_PATH, ftj())
    with together_operator() as op:
        # 1. The upload Job: data read-only, the key only as a secretKeyRef, base URL passed on.
        up = wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        c = up["spec"]["template"]["spec"]["containers"][0]
        assert c["command"] == ["python", "-m", "tuneop.backends.together.pod", "upload", "--config", "/etc/tuneop/job.json"]
        env = {e["name"]: e for e in c["env"]}
        assert env["TOGETHER_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "together", "key": "api-key"}}
        assert env["TOGETHER_BASE_URL"]["value"] == fake.url
        assert all(m.get("readOnly") for m in c["volumeMounts"])
        assert wait_phase(api, "Validating")["reason"] == "Uploading"
        assert posts(fake, CREATE) == 0

        # 2. Uploaded -> exactly one Together job, mirrored until completed.
        file_id = upload_pod(api, fake, tmp_path)
        jid = wait_for(lambda: job_id(api), what="Together job id in status")
        down = wait_for(lambda: api.get(f"{JOBS}/news-download"), timeout=60, what="download Job")
        dc = down["spec"]["template"]["spec"]["containers"][0]
        assert dc["command"][-2:] == ["--job-id", jid]
        assert {m["mountPath"] for m in dc["volumeMounts"]} == {"/etc/tuneop", "/mnt/pvc/adapters"}
        st = wait_for(lambda: status_of(api) if status_of(api).get("reason") == "Downloading" else None,
                      what="Downloading")
        assert st["phase"] == "Running"
        assert fake.create_bodies[0]["training_file"] == file_id
        assert fake.create_bodies[0]["suffix"] == st["together"]["suffix"]
        assert st["together"]["suffix"].startswith("news-v1-")

        # 3. The download pod's result -> Succeeded.
        done = {"event": "done",
                "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA, "manifestSha256": "e" * 64,
                            "sizeBytes": 4096},
                "together": {"jobId": jid, "modelOutputName": fake.jobs[jid]["model_output_name"]}}
        finish_job(api, "news-download", container="download", message=json.dumps(done))
        st = wait_phase(api, "Succeeded")
        wait_for(lambda: "Succeeded" in reasons(api), what="Succeeded event")
        assert metric("tuneop_finetunejob_cost_usd", namespace=NS, name="news") == pytest.approx(1.23456789)
        assert (metric("tuneop_together_requests_total", method="GET", code="200") or 0) >= 3
        assert (metric("tuneop_together_requests_total", method="POST", code="200") or 0) >= 1
        assert metric("tuneop_training_step", namespace=NS, name="news") == 30

    assert st["adapter"] == {"location": "pvc://adapters/news/adapter", "sha256": SHA,
                             "manifestSha256": "e" * 64, "sizeBytes": 4096}
    tg = st["together"]
    assert tg["jobId"] == jid and tg["status"] == "completed"
    assert tg["modelOutputName"] == fake.jobs[jid]["model_output_name"]
    assert tg["costUSD"] == pytest.approx(1.23456789) and tg["tokenCount"] == 30000
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 30
    assert st["dataset"]["trainRows"] == len(ROWS)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Validated"]["status"] == "True" and conds["Succeeded"]["status"] == "True"
    assert posts(fake, CREATE) == 1
    # Every Together event became exactly one Kubernetes Event, in order.
    mirrored = set(together_reasons(fake, jid))
    assert [r for r in reasons(api) if r in mirrored] == together_reasons(fake, jid)
    assert tg["eventCursor"] == len(fake.jobs[jid]["events"])
    rs = reasons(api)
    for r in ("Uploading", "DatasetValid", "TogetherJobCreated", "Downloading", "Succeeded"):
        assert rs.count(r) == 1, (r, rs)
    assert len(job_posts(api, "news-upload")) == 1 and len(job_posts(api, "news-download")) == 1
    # The key: only in the Authorization header of API calls, nowhere in Kubernetes or the logs.
    assert all(r.headers.get("Authorization") == f"Bearer {KEY}" for r in fake.requests if r.path.startswith("/v1/"))
    assert op.runner is not None
    assert "Together job" in op.runner.output and "TogetherJobCreated" in caplog.text  # logs were captured
    assert len(stored_texts(api)) > 50
    assert_key_nowhere(api, op.runner.output, caplog.text)
    assert "tk-SECRET" not in op.runner.output + caplog.text


def test_rate_limits_and_server_errors_on_retrieve_are_survived(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    cluster(api)
    api.create(FTJ_PATH, ftj())
    # Each poll tries 3 times (max_retries=2): the first poll sees 429s, the next one 500s.
    fake.fault("GET", RETRIEVE, status=429, times=3, headers=FAST)
    fake.fault("GET", RETRIEVE, status=500, times=3, headers=FAST)
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path)
        wait_for(lambda: api.get(f"{JOBS}/news-download"), timeout=60, what="download Job after the faults")
        wait_for(lambda: {"TogetherRateLimited", "TogetherUnavailable"} <= set(reasons(api)), what="fault events")
    assert [e["type"] for e in api.events() if e["reason"] in ("TogetherRateLimited", "TogetherUnavailable")] == ["Warning"] * 2
    assert (metric("tuneop_together_requests_total", method="GET", code="429") or 0) >= 3
    assert (metric("tuneop_together_requests_total", method="GET", code="500") or 0) >= 3
    assert posts(fake, CREATE) == 1
    assert status_of(api)["reason"] == "Downloading"


def test_restart_between_create_and_status_patch_adopts_the_job(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    cluster(api)
    api.create(FTJ_PATH, ftj())
    status_path = f"{FTJ_PATH}/news/status"
    fake.fault("POST", CREATE, delay=1.0)  # time to cut the operator off the status
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path)
        wait_for(lambda: posts(fake, CREATE) == 1, what="the create call")
        suffix = (status_of(api).get("together") or {}).get("suffix")
        assert suffix, "the suffix is in status before the create call"
        api.emulator.refusals[("PATCH", status_path)] = (503, "ServiceUnavailable", "etcd leader changed")
        wait_for(lambda: len(fake.jobs) == 1, what="the Together job")
        jid = next(iter(fake.jobs))
    # The operator died without recording the id.
    del api.emulator.refusals[("PATCH", status_path)]
    assert job_id(api) is None and status_of(api)["together"]["suffix"] == suffix

    with together_operator():
        wait_for(lambda: job_id(api) == jid, what="the job adopted after the restart")
        wait_for(lambda: "TogetherJobAdopted" in reasons(api), what="TogetherJobAdopted event")
        wait_for(lambda: api.get(f"{JOBS}/news-download"), timeout=60, what="download Job")
    assert posts(fake, CREATE) == 1 and len(fake.jobs) == 1
    assert "TogetherJobCreated" not in reasons(api)


def test_create_answered_200_with_an_empty_body_adopts_the_job_instead_of_failing(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    """Together created the job but answered 200 with nothing readable: the FineTuneJob adopts the
    job (found by its suffix) and follows it; it neither fails nor creates a second one."""
    cluster(api)
    api.create(FTJ_PATH, ftj())
    fake.fault("POST", CREATE, reply=b"")
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path)
        jid = wait_for(lambda: job_id(api), what="the Together job id in status")
        wait_for(lambda: "TogetherJobAdopted" in reasons(api), what="TogetherJobAdopted event")
        wait_for(lambda: api.get(f"{JOBS}/news-download"), timeout=60, what="download Job")
    assert list(fake.jobs) == [jid] and posts(fake, CREATE) == 1
    assert status_of(api)["phase"] == "Running" and "TogetherRejected" not in reasons(api)


def test_malformed_replies_while_polling_are_named_and_the_status_moves_on(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    cluster(api)
    api.create(FTJ_PATH, ftj())
    odd = {"status": "running", "epochs_completed": "two",
           "events": [{"type": "checkpoint_save", "message": "saved", "step": "ten", "total_steps": 30}]}
    # the first polls get these replies, then Together's real ones
    fake.fault("GET", RETRIEVE, reply=json.dumps({"id": "ft-odd", **odd}).encode(), times=2)
    fake.fault("GET", RETRIEVE, reply=b"<html>502</html>", reply_type="text/html")
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path)
        wait_for(lambda: "TogetherReplyMalformed" in reasons(api), what="the malformed reply reported")
        wait_for(lambda: api.get(f"{JOBS}/news-download"), timeout=60, what="download Job after the odd replies")
    [event] = [e for e in api.events() if e["reason"] == "TogetherReplyMalformed"]
    assert event["type"] == "Warning" and "Together reply field 'step' is not a number: 'ten'" in event["message"]
    st = status_of(api)
    assert st["reason"] == "Downloading" and st["progress"]["step"] == 30
    assert not [c for c in st["conditions"] if c["type"] == "TogetherReplyUnderstood"]
    assert posts(fake, CREATE) == 1


def reconciles() -> float:
    return sum(metric("tuneop_reconcile_total", kind="FineTuneJob", result=r) or 0 for r in ("success", "retry"))


def test_retry_after_from_together_holds_the_next_poll(api: KMockThread, fake: FakeTogether, tmp_path: Path) -> None:
    cluster(api)
    api.create(FTJ_PATH, ftj())
    fake.progression = ["pending", "queued"] + ["running"] * 1000
    # the SDK's own retries follow retry-after-ms; Retry-After (600 s) is for the operator's next poll
    fake.fault("GET", RETRIEVE, status=429, times=3, headers={**FAST, "retry-after": "600"})
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path)
        st = wait_for(lambda: status_of(api) if (status_of(api).get("together") or {}).get("retryAt") else None,
                      what="retryAt in status")
        assert st["reason"] == "TogetherRateLimited" and "600 s" in st["message"]
        polls, seen = len(fake.calls("GET", RETRIEVE)), reconciles()
        wait_for(lambda: reconciles() >= seen + 5, what="more reconciles (monitor and retry timers)")
        assert len(fake.calls("GET", RETRIEVE)) == polls  # none before retryAt
    assert status_of(api)["reason"] == "TogetherRateLimited" and posts(fake, CREATE) == 1


def test_user_error_and_error_fail_with_togethers_message_and_different_reasons(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    cluster(api)
    fake.outcome = "user_error"
    fake.outcome_message = "Invalid dataset: 3 rows exceed max_seq_length"
    api.create(FTJ_PATH, ftj("bad-data"))
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/bad-data-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path, "bad-data")
        st1 = wait_phase(api, "Failed", "bad-data", timeout=20)

        fake.outcome = "error"
        fake.outcome_message = "Internal error: worker lost"
        api.create(FTJ_PATH, ftj("unlucky"))
        wait_for(lambda: api.get(f"{JOBS}/unlucky-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path, "unlucky")
        st2 = wait_phase(api, "Failed", "unlucky", timeout=20)
        wait_for(lambda: {"TogetherUserError", "TogetherError"} <= set(reasons(api)), what="failure events")

    assert st1["reason"] == "TogetherUserError" and "3 rows exceed max_seq_length" in st1["message"]
    assert st2["reason"] == "TogetherError" and "worker lost" in st2["message"]
    for st in (st1, st2):
        failed = [c for c in st["conditions"] if c["type"] == "Failed"][0]
        assert failed["status"] == "True" and failed["reason"] == st["reason"]
    assert api.get(f"{JOBS}/bad-data-download") is None and api.get(f"{JOBS}/unlucky-download") is None
    assert posts(fake, CREATE) == 2


def start_running_job(api: KMockThread, fake: FakeTogether, tmp_path: Path) -> str:
    # Keep the job training at Together until the test is done with it.
    fake.progression = ["pending", "queued"] + ["running"] * 1000
    wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
    upload_pod(api, fake, tmp_path)
    jid = wait_for(lambda: job_id(api), what="Together job id")
    wait_phase(api, "Running", timeout=20)
    return jid


def test_delete_cancels_the_together_job(api: KMockThread, fake: FakeTogether, tmp_path: Path) -> None:
    cluster(api)
    api.create(FTJ_PATH, ftj())
    with together_operator():
        jid = start_running_job(api, fake, tmp_path)
        assert "tuneop.dev/finalizer" in api.get(f"{FTJ_PATH}/news")["metadata"].get("finalizers", [])
        api.call("DELETE", f"{FTJ_PATH}/news")
        wait_for(lambda: posts(fake, rf"^/v1/fine-tunes/{jid}/cancel$") >= 1, what="cancel at Together")
        wait_for(lambda: api.get(f"{FTJ_PATH}/news") is None, what="the FineTuneJob gone")
        wait_for(lambda: "TogetherJobCancelled" in reasons(api), what="TogetherJobCancelled event")
    assert fake.jobs[jid]["status"] in ("cancel_requested", "cancelled")
    assert posts(fake, CREATE) == 1


def test_suspend_cancels_shows_suspended_and_resume_starts_a_new_job(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    cluster(api)
    api.create(FTJ_PATH, ftj())
    with together_operator():
        jid = start_running_job(api, fake, tmp_path)
        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 2}, "spec": {"suspend": True}})
        wait_for(lambda: posts(fake, rf"^/v1/fine-tunes/{jid}/cancel$") >= 1, what="cancel at Together")
        wait_for(lambda: fake.jobs[jid]["status"] == "cancelled", what="cancelled at Together")
        # ("being cancelled; ..." before Together says so: wait for the status that mirrors it)
        wait_for(lambda: (status_of(api).get("together") or {}).get("status") == "cancelled",
                 what="Suspended after the cancel")
        st = status_of(api)
        assert st["phase"] == "Suspended" and st["reason"] == "Suspended"
        assert st["together"]["status"] == "cancelled" and st["together"]["cancelRequested"] is True
        assert posts(fake, CREATE) == 1

        # Resume: a new Together job (a cancelled one cannot be resumed), the data not uploaded again.
        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 3}, "spec": {"suspend": False}})
        new = wait_for(lambda: job_id(api) if job_id(api) not in (None, jid) else None, what="a new Together job")
        wait_phase(api, "Running", timeout=20)
    assert posts(fake, CREATE) == 2 and new != jid
    assert fake.create_bodies[1]["suffix"] != fake.create_bodies[0]["suffix"]
    assert fake.create_bodies[1]["training_file"] == fake.create_bodies[0]["training_file"]
    assert len(job_posts(api, "news-upload")) == 1
    assert "Suspended" in reasons(api) and "Failed" not in [status_of(api).get("phase")]


def test_unsupported_spec_fails_validation_without_touching_together(api: KMockThread, fake: FakeTogether) -> None:
    cluster(api)
    api.create(FTJ_PATH, ftj(hyperparameters={"maxSteps": 50}))
    with together_operator():
        st = wait_phase(api, "Failed")
    assert st["reason"] == "UnsupportedByBackend" and "hyperparameters.maxSteps" in st["message"]
    validated = [c for c in st["conditions"] if c["type"] == "Validated"][0]
    assert validated["status"] == "False"
    assert job_posts(api) == [] and fake.requests == []
    assert "tuneop.dev/finalizer" not in (api.get(f"{FTJ_PATH}/news")["metadata"].get("finalizers") or [])


ESTIMATE = r"^/v1/fine-tunes/estimate-price$"


def test_an_estimate_over_max_cost_creates_nothing_until_the_limit_is_raised(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    cluster(api)
    fake.estimate_usd = 4.2
    api.create(FTJ_PATH, ftj(maxCostUSD=3.0))
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        file_id = upload_pod(api, fake, tmp_path)
        st = wait_for(lambda: status_of(api) if status_of(api).get("reason") == "CostLimitExceeded" else None,
                      what="CostLimitExceeded")
        assert st["phase"] == "Pending" and "$4.20" in st["message"] and "$3.00" in st["message"]
        assert st["cost"]["estimateUSD"] == 4.2 and st["cost"]["source"] == "together"
        ev = [e for e in api.events() if e["reason"] == "CostLimitExceeded"]
        assert len(ev) == 1 and ev[0]["type"] == "Warning" and "$4.20" in ev[0]["message"]
        asked = fake.calls("POST", ESTIMATE)
        assert len(asked) == 1 and asked[0].json()["training_file"] == file_id
        assert asked[0].json()["n_epochs"] == 2 and asked[0].json()["training_type"]["type"] == "Lora"
        assert posts(fake, CREATE) == 0 and fake.jobs == {}
        assert "tuneop.dev/finalizer" not in (api.get(f"{FTJ_PATH}/news")["metadata"].get("finalizers") or [])
        # Raising the limit (not part of the spec hash: nothing is uploaded again) creates the job.
        api.patch(f"{FTJ_PATH}/news", {"metadata": {"generation": 2}, "spec": {"maxCostUSD": 5.0}})
        wait_for(lambda: job_id(api), what="Together job id in status")
    st = status_of(api)
    # The SDK's own fine_tuning.create() asks for an estimate too: ours, then the SDK's.
    assert posts(fake, CREATE) == 1 and len(fake.calls("POST", ESTIMATE)) == 2
    assert len(job_posts(api, "news-upload")) == 1
    assert not [c for c in st["conditions"] if c["type"] == "CostLimitExceeded"]
    assert_key_nowhere(api)


def test_a_price_past_max_cost_while_running_cancels_the_job(
    api: KMockThread, fake: FakeTogether, tmp_path: Path
) -> None:
    cluster(api)
    fake.estimate_usd = 1.0  # Together's estimate was under the limit...
    fake.running_price_nanodollars = 5_000_000_000  # ...the price after tokenizing is not
    api.create(FTJ_PATH, ftj(maxCostUSD=2.0))
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path)
        jid = wait_for(lambda: job_id(api), what="Together job id in status")
        st = wait_phase(api, "Failed", timeout=60)
    assert st["reason"] == "CostLimitExceeded" and "$5.00" in st["message"] and "$2.00" in st["message"]
    assert fake.jobs[jid]["status"] == "cancelled" and len(fake.calls("POST", r"/cancel$")) == 1
    assert st["cost"] == {"source": "together", "estimateUSD": 1.0, "estimatedTokens": 123456 * 2,
                          "basis": "Together's estimate-price", "actualUSD": 5.0, "cancelledOverLimit": True}
    assert reasons(api).count("CostLimitExceeded") >= 1
    assert api.get(f"{JOBS}/news-download") is None
