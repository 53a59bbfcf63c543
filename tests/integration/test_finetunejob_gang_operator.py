"""Multi-node training through the real kopf loop on kmock: one failed rank restarts every rank.

The test plays the Job controller and kubelet (pods labelled with their Job's uid, as the Job
controller labels them; the Job's Failed condition once a rank failed with backoffLimit 0) and
asserts the operator's outcomes: exactly one new Job per restart, the count in the status, the
restart in the Job's annotation, nothing more on replays, Failed once maxRetries is spent.
"""
from __future__ import annotations

import json
from typing import Any

from kmockenv import FTJ_PATH, NS, KMockThread, Operator, wait_for
from test_finetunejob_operator import GOOD_JSONL, configmap, ftj, job_posts, pvc, reasons, status_of, wait_phase

JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
ATTEMPT = "tuneop.dev/gang-attempt"
NCCL = "Traceback ...\nRuntimeError: NCCL error: remote process exited"


def rank_pod(api: KMockThread, job: dict[str, Any], index: int, suffix: str) -> str:
    """Play the Job controller + kubelet: the pod of one index runs (labelled with its Job's uid)."""
    name = f"news-train-{index}-{suffix}"
    api.create(PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"batch.kubernetes.io/job-name": "news-train", "job-name": "news-train",
                       "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                       "tuneop.dev/finetunejob": "news"},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]},
    })
    return name


def start_gang(api: KMockThread, suffix: str) -> list[str]:
    job = api.get(f"{JOBS}/news-train")
    pods = [rank_pod(api, job, i, suffix) for i in range(2)]
    api.patch(f"{JOBS}/news-train/status", {"status": {"active": 2, "ready": 2}})
    return pods


def fail_rank(api: KMockThread, pods: list[str], index: int) -> None:
    """One rank exits 1; with backoffLimit 0 the Job controller fails the Job and stops the other rank."""
    api.patch(f"{PODS}/{pods[index]}/status", {"status": {"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": NCCL,
                                                    "finishedAt": "2026-01-01T01:00:00Z"}}}]}})
    for i, p in enumerate(pods):
        if i != index:
            api.call("DELETE", f"{PODS}/{p}")
    api.patch(f"{JOBS}/news-train/status", {"status": {"active": 0, "ready": 0, "failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]}})


def test_a_failed_rank_restarts_every_rank_once_per_failure_until_max_retries(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}},
                             resources={"nodes": 2, "gpus": 1}, maxRetries=1))
    with Operator(retry_interval=0.2):
        first = wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        assert first["spec"]["completionMode"] == "Indexed" and first["spec"]["backoffLimit"] == 0
        assert ATTEMPT not in first["metadata"]["annotations"]
        pods = start_gang(api, "a")
        wait_phase(api, "Running")

        # 1. Index 1 fails: the Job is failed as a whole -> deleted -> exactly one new Job, restart 1.
        fail_rank(api, pods, 1)
        second = wait_for(lambda: (j := api.get(f"{JOBS}/news-train")) and j["metadata"]["uid"] != first["metadata"]["uid"]
                          and j, what="a new training Job")
        assert second["metadata"]["annotations"][ATTEMPT] == "1"
        assert second["metadata"]["annotations"]["tuneop.dev/spec-hash"] == first["metadata"]["annotations"]["tuneop.dev/spec-hash"]
        st = wait_for(lambda: status_of(api).get("reason") == "Resuming" and status_of(api), what="Resuming")
        assert st["phase"] == "Pending" and st["restarts"] == 1
        (ev,) = [e for e in api.events() if e["reason"] == "GangRestart"]
        assert ev["type"] == "Warning" and "RuntimeError: NCCL error" in ev["message"]
        assert "restarting all 2 nodes from the newest checkpoint (restart 1 of 1)" in ev["message"]

        # 2. Replays (Job events, the retry timer): nothing more is created or deleted.
        for i in range(3):
            api.patch(f"{JOBS}/news-train", {"metadata": {"labels": {"replay": str(i)}}})
        n = len(api.requests("GET", f"{FTJ_PATH}/news"))
        wait_for(lambda: len(api.requests("GET", f"{FTJ_PATH}/news")) >= n + 3, what="three more reconciles")
        assert len(job_posts(api, "news-train")) == 2
        assert len(api.requests("DELETE", f"{JOBS}/news-train")) == 1

        # 3. The new gang runs: Running (Resumed) with the count kept.
        pods = start_gang(api, "b")
        st = wait_for(lambda: status_of(api).get("reason") == "Resumed" and status_of(api), what="Resumed")
        assert st["phase"] == "Running" and st["restarts"] == 1

        # 4. A rank fails again: maxRetries (1) restarts spent -> Failed, no third Job.
        fail_rank(api, pods, 0)
        st = wait_phase(api, "Failed")
        assert st["reason"] == "BackoffLimitExceeded" and st["restarts"] == 1
        assert "after 1 restart(s) of every rank; spec.maxRetries 1" in st["message"]
        n = len(api.requests("GET", f"{FTJ_PATH}/news"))
        api.patch(f"{JOBS}/news-train", {"metadata": {"labels": {"replay": "last"}}})
        wait_for(lambda: len(api.requests("GET", f"{FTJ_PATH}/news")) > n, what="one more reconcile")
    assert len(job_posts(api, "news-train")) == 2
    assert len(api.requests("DELETE", f"{JOBS}/news-train")) == 1
    assert reasons(api).count("GangRestart") == 1
    assert json.loads(json.dumps(status_of(api)))["phase"] == "Failed"
