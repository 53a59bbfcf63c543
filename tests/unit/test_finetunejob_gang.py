"""Multi-node training: a failed rank restarts every rank (finetunejob/gang.py and the reducer). No cluster."""
from __future__ import annotations

import json
from typing import Any

import pytest
from test_status import INLINE, LATER, NOW, OK_REPORT, applied, b, body, cond, event_reasons, job, names, pod, run

from tuneop.finetunejob import gang
from tuneop.finetunejob import reconcile as s

GANG = {"nodes": 2, "gpus": 1}
NCCL = "Traceback ...\nRuntimeError: NCCL error: remote process exited"


@pytest.mark.parametrize("nodes,retryable,attempt,restarts,max_retries,want", [
    (1, True, 0, 0, 2, gang.FAIL),      # one node: the Job's own backoffLimit retried the pod already
    (2, False, 0, 0, 2, gang.FAIL),     # a user error or the deadline: a restart does not cure it
    (2, True, 0, 0, 2, gang.RECORD),    # first: write status.restarts = 1
    (2, True, 0, 1, 2, gang.DELETE),    # recorded: delete the failed Job
    (2, True, 1, 1, 2, gang.RECORD),    # the restarted gang failed too
    (2, True, 1, 2, 2, gang.DELETE),
    (2, True, 2, 2, 2, gang.FAIL),      # maxRetries restarts spent
    (2, True, 0, 0, 0, gang.FAIL),      # maxRetries 0: none
])
def test_decide(nodes: int, retryable: bool, attempt: int, restarts: int, max_retries: int, want: str) -> None:
    assert gang.decide(nodes=nodes, max_retries=max_retries, retryable=retryable, attempt=attempt,
                       restarts=restarts) == want


def test_attempt_and_restarts_read_defensively() -> None:
    assert gang.attempt_of(None) == 0
    assert gang.attempt_of({"metadata": {"annotations": {gang.ATTEMPT_ANNOTATION: "3"}}}) == 3
    assert gang.attempt_of({"metadata": {"annotations": {gang.ATTEMPT_ANNOTATION: "x"}}}) == 0
    assert gang.restarts_of({"restarts": 2}) == 2
    assert gang.restarts_of({"restarts": "2"}) == 0 and gang.restarts_of(None) == 0


def test_multi_node_job_fails_as_a_whole_on_any_rank() -> None:
    j = b.build_training_job(body(resources=GANG))
    assert j["spec"]["backoffLimit"] == 0
    rules = j["spec"]["podFailurePolicy"]["rules"]
    # exit 2 (user error) still fails at once; nothing is ignored, so an evicted rank fails the Job too
    assert rules == [{"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}]
    single = b.build_training_job(body(maxRetries=4))
    assert single["spec"]["backoffLimit"] == 4
    assert [r["action"] for r in single["spec"]["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore", "Ignore"]


def running_gang(**spec: Any) -> dict[str, Any]:
    ftj = body(dataset=INLINE, resources=GANG, **spec)
    ftj = applied(ftj, run(ftj, inline_datasets={"train": OK_REPORT}))
    return applied(ftj, run(ftj, training_job=job(ftj, "train")))


def failed_rank(exit_code: int = 1, message: str = NCCL, name: str = "news-train-1-abc") -> dict[str, Any]:
    p = pod("news-train", "trainer", exit_code=exit_code, message=message, name=name)
    p["metadata"]["annotations"] = {b.JOB_INDEX_ANNOTATION: "1"}
    return p


def test_a_failed_rank_restarts_the_gang_in_three_idempotent_steps() -> None:
    ftj = running_gang()
    assert ftj["status"]["phase"] == "Running"
    failed = job(ftj, "train", "failed")
    ranks = [failed_rank()]

    # 1. record: status.restarts = 1, nothing deleted yet; one Warning Event
    d1 = run(ftj, now=LATER, training_job=failed, training_pods=ranks)
    assert d1.delete == [] and d1.create == []
    assert d1.status["restarts"] == 1
    assert (d1.status["phase"], d1.status["reason"]) == ("Pending", "GangRestart")
    assert "RuntimeError: NCCL error" in d1.status["message"] and "restart 1 of 2" in d1.status["message"]
    assert d1.events == [{"type": "Warning", "reason": "GangRestart", "message": d1.status["message"]}]
    assert d1.status["reason"] in s.RETRY_REASONS  # the retry timer takes the next step
    # a replay of the same step with the same (unwritten) status decides the same
    again = run(ftj, now=LATER, training_job=failed, training_pods=ranks)
    assert again.status == d1.status and again.delete == []

    # 2. recorded: delete the failed Job, no second Event, still one restart
    ftj = applied(ftj, d1)
    d2 = run(ftj, now=LATER, training_job=failed, training_pods=ranks)
    assert d2.delete == [{"apiVersion": "batch/v1", "kind": "Job", "name": "news-train"}]
    assert d2.status["restarts"] == 1 and d2.events == [] and d2.create == []
    ftj = applied(ftj, d2)
    assert run(ftj, now=LATER, training_job=failed, training_pods=ranks).delete == d2.delete  # replay: same

    # 2b. deleted, but a pod of the old gang still runs: wait
    running = pod("news-train", "trainer", name="news-train-0-abc")
    running["status"] = {"phase": "Running"}
    wait = run(ftj, now=LATER, training_pods=[running, *ranks])
    assert wait.create == [] and wait.status["reason"] == "GangRestart" and "news-train-0-abc" in wait.status["message"]

    # 3. gone: the Job again (ConfigMap and Service are still there), attempt 1 in its annotation; Resuming
    d3 = run(ftj, now=LATER, training_pods=ranks, config_map=b.build_config_map(ftj),
             service=b.build_headless_service(ftj))
    assert names(d3.create) == ["news-train"]
    new = d3.create[0]
    assert new["metadata"]["annotations"][gang.ATTEMPT_ANNOTATION] == "1"
    assert new["spec"]["backoffLimit"] == 0 and new["spec"]["completionMode"] == "Indexed"
    assert (d3.status["phase"], d3.status["reason"]) == ("Pending", "Resuming")
    assert d3.status["restarts"] == 1
    assert cond(d3.status, "Running")["reason"] == "Resuming"
    ftj = applied(ftj, d3)

    # its pods run: Running, Resumed
    active = job(ftj, "train")
    active["metadata"]["annotations"][gang.ATTEMPT_ANNOTATION] = "1"
    d4 = run(ftj, now=LATER, training_job=active)
    assert (d4.status["phase"], d4.status["reason"]) == ("Running", "Resumed") and d4.status["restarts"] == 1
    assert d4.create == [] and d4.delete == []


def test_retries_exhausted_fail_with_the_ranks_failure() -> None:
    ftj = running_gang(maxRetries=1)
    ftj["status"]["restarts"] = 1
    failed = job(ftj, "train", "failed")
    failed["metadata"]["annotations"][gang.ATTEMPT_ANNOTATION] = "1"
    d = run(ftj, now=LATER, training_job=failed, training_pods=[failed_rank()])
    assert d.delete == [] and d.create == []
    assert (d.status["phase"], d.status["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "after 1 restart(s) of every rank; spec.maxRetries 1" in d.status["message"]
    assert d.status["restarts"] == 1
    assert "BackoffLimitExceeded" in event_reasons(d)


@pytest.mark.parametrize("exit_code,message,job_reason,reason", [
    (2, json.dumps({"event": "error", "reason": "DatasetInvalid", "message": "line 9: empty"}), "PodFailurePolicy",
     "DatasetInvalid"),
    (1, NCCL, "DeadlineExceeded", "DeadlineExceeded"),
])
def test_user_errors_and_the_deadline_are_not_restarted(exit_code: int, message: str, job_reason: str,
                                                        reason: str) -> None:
    ftj = running_gang()
    failed = job(ftj, "train", "failed", reason=job_reason)
    d = run(ftj, now=LATER, training_job=failed, training_pods=[failed_rank(exit_code, message)])
    assert d.status["phase"] == "Failed" and d.status["reason"] == reason
    assert "restarts" not in d.status and d.delete == []


def test_a_new_spec_starts_counting_again() -> None:
    ftj = running_gang()
    ftj["status"]["restarts"] = 2
    old = job(ftj, "train")
    ftj["spec"]["baseModel"] = "Qwen/Qwen3-4B"
    d = run(ftj, now=LATER, training_job=old)
    assert d.status["reason"] == "SpecChanged" and "restarts" not in d.status


def test_single_node_failure_is_not_a_gang_restart() -> None:
    ftj = body(dataset=INLINE)
    ftj = applied(ftj, run(ftj, inline_datasets={"train": OK_REPORT}))
    ftj = applied(ftj, run(ftj, training_job=job(ftj, "train")))
    d = run(ftj, now=NOW, training_job=job(ftj, "train", "failed"), training_pods=[pod("news-train", "trainer",
                                                                                         exit_code=1, message=NCCL)])
    assert d.status["phase"] == "Failed" and "restarts" not in d.status
