"""Pure pieces of adapterdeployment/handlers.py: which FineTuneJobs an AdapterDeployment
references (the kopf index), and which FineTuneJob changes matter to it."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tuneop.adapterdeployment import handlers as h

SPEC = {"adapters": [
    {"name": "a", "fineTuneJobRef": {"name": "news"}},
    {"name": "b", "source": {"pvc": {"claimName": "x", "path": "y"}}},
    {"name": "c", "fineTuneJobRef": {"name": "legal"}},
    {"name": "d", "fineTuneJobRef": {"name": "news"}},
    {"name": "e", "fineTuneJobRef": {}},
    "not-a-dict",
]}


def test_referenced_jobs_and_references() -> None:
    assert h.referenced_jobs(SPEC) == ["legal", "news"]
    assert h.referenced_jobs({}) == [] and h.referenced_jobs(None) == []
    assert h.references({"spec": SPEC}, "news") and not h.references({"spec": SPEC}, "other")


def test_index_maps_each_referenced_job_to_the_adapterdeployment() -> None:
    assert h.ad_by_finetunejob(namespace="team-a", name="qwen", spec=SPEC) == {
        ("team-a", "legal"): "qwen", ("team-a", "news"): "qwen"}
    assert h.ad_by_finetunejob(namespace="team-a", name="qwen", spec={"adapters": []}) == {}


def test_ftj_fingerprint_is_phase_sha_and_output() -> None:
    body = {"spec": {"output": {"pvc": {"claimName": "c", "path": "p"}}},
            "status": {"phase": "Running", "progress": {"step": 3}}}
    fp = h.ftj_fingerprint("MODIFIED", body)
    assert fp == h.ftj_fingerprint(None, {**body, "status": {"phase": "Running", "progress": {"step": 9}}})
    assert fp != h.ftj_fingerprint("MODIFIED", {**body, "status": {"phase": "Succeeded"}})
    assert fp != h.ftj_fingerprint("MODIFIED", {**body, "status": {"phase": "Running", "adapter": {"sha256": "x"}}})
    assert h.ftj_fingerprint("DELETED", body) is None


def test_ftj_event_reconciles_only_the_referencing_adapterdeployments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    async def fake(namespace: str, name: str, logger: Any) -> bool:
        calls.append((namespace, name))
        return True

    monkeypatch.setattr(h, "_reconcile_quietly", fake)
    h._ftj_seen.clear()
    index = {("ns", "news"): ["qwen", "llama", "qwen"]}
    log = logging.getLogger("test")
    running = {"status": {"phase": "Running"}}

    async def event(name: str, body: dict, type_: str = "MODIFIED") -> None:
        await h.on_ftj_event(type=type_, body=body, name=name, namespace="ns", logger=log, ad_by_finetunejob=index)

    asyncio.run(event("other", running))
    assert calls == []  # referenced by none: nothing read, nothing reconciled
    asyncio.run(event("news", running))
    assert calls == [("ns", "llama"), ("ns", "qwen")]
    asyncio.run(event("news", {"status": {"phase": "Running", "progress": {"step": 5}}}))
    assert len(calls) == 2  # progress only: nothing the AdapterDeployments care about
    asyncio.run(event("news", {"status": {"phase": "Succeeded", "adapter": {"sha256": "s"}}}))
    assert calls[2:] == [("ns", "llama"), ("ns", "qwen")]
    asyncio.run(event("news", {}, "DELETED"))
    assert calls[4:] == [("ns", "llama"), ("ns", "qwen")]
    assert ("ns", "news") not in h._ftj_seen  # nothing kept of a deleted job


# ---------------------------------------------------------------------------------- pod causes

AD = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "AdapterDeployment",
      "metadata": {"name": "qwen", "namespace": "ns", "uid": "u"}, "spec": {}}


def crashing_pod(restarts: int, name: str = "qwen-vllm-a") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Running", "containerStatuses": [{
        "name": "vllm", "ready": False, "restartCount": restarts,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}


class FakeKube:
    def __init__(self, log: str = "", error: bool = False) -> None:
        self.log, self.error = log, error
        self.reads: list[tuple[str, str, dict[str, Any]]] = []

    async def pod_log(self, namespace: str, name: str, **kw: Any) -> str:
        self.reads.append((namespace, name, kw))
        if self.error:
            from tuneop import kube
            raise kube.ApiError(400, "BadRequest", 'previous terminated container "vllm" in pod not found')
        return self.log


@pytest.fixture()
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    got: list[tuple[str, str, str]] = []
    monkeypatch.setattr(h, "_event", lambda body, t, r, m: got.append((t, r, m)))
    h._causes.clear()
    h._crash_logs.clear()
    h._failures.clear()
    return got


def test_crash_loop_reads_the_previous_log_once_per_restart(events: list) -> None:
    token = "tok-" + "x" * 40
    kc = FakeKube(f"INFO loading\nValueError: cannot load model (admin token {token})\n\n")
    log = logging.getLogger("test")

    def observe(pods: list[dict[str, Any]]) -> Any:
        return asyncio.run(h.observe_pods(kc, AD, None, pods, token, log))

    c = observe([crashing_pod(3)])
    assert c["reason"] == "CrashLoop"
    assert c["message"].endswith("; last log line: ValueError: cannot load model (admin token ***)")
    assert token not in c["message"]
    assert kc.reads == [("ns", "qwen-vllm-a", {"container": "vllm", "previous": True, "tail_lines": 20,
                                               "limit_bytes": 16 * 1024})]
    assert observe([crashing_pod(3)]) == c and len(kc.reads) == 1  # same restart: no second read
    observe([crashing_pod(4)])
    assert len(kc.reads) == 2  # it crashed again: read again
    # Not a crash loop: no read at all.
    pulling = {"metadata": {"name": "qwen-vllm-b"}, "status": {"phase": "Pending", "containerStatuses": [{
        "name": "vllm", "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff", "message": "x"}}}]}}
    assert observe([pulling])["reason"] == "ImagePullFailed" and len(kc.reads) == 2
    assert observe([]) is None and len(kc.reads) == 2
    # The log cannot be read: the cause without a line, and no retry until the next restart.
    bad = FakeKube(error=True)
    kc = bad
    c = observe([crashing_pod(7)])
    assert c["reason"] == "CrashLoop" and "last log line" not in c["message"]
    observe([crashing_pod(7)])
    assert len(bad.reads) == 1


def test_one_warning_event_per_distinct_cause(events: list) -> None:
    pull = {"reason": "ImagePullFailed", "message": "pod p container vllm: ErrImagePull: x", "key": "ImagePullFailed|vllm|i"}
    h._post_cause(AD, {}, pull)
    h._post_cause(AD, {}, {**pull, "message": "pod p container vllm: ImagePullBackOff: Back-off"})
    assert events == [("Warning", "ImagePullFailed", "pod p container vllm: ErrImagePull: x")]
    crash = {"reason": "CrashLoop", "message": "crash", "key": "CrashLoop|vllm|1"}
    h._post_cause(AD, {}, crash)
    assert [e[1] for e in events] == ["ImagePullFailed", "CrashLoop"]
    h._post_cause(AD, {}, None)  # healed
    h._post_cause(AD, {}, crash)  # and broken again: a new Event
    assert [e[1] for e in events] == ["ImagePullFailed", "CrashLoop", "CrashLoop"]
    # An operator restarted (nothing in memory) with the cause in the status already: no repost.
    h._causes.clear()
    shown = {"conditions": [{"type": "PodsHealthy", "status": "False", "reason": "CrashLoop"}]}
    h._post_cause(AD, shown, crash)
    assert len(events) == 3


def test_api_warnings_become_one_event_per_distinct_text(events: list) -> None:
    psa = 'would violate PodSecurity "restricted:latest": runAsNonRoot != true'
    h._api_warnings(AD, "creating Deployment qwen-vllm", [psa])
    h._api_warnings(AD, "patching Deployment qwen-vllm", [psa, "other"])
    h._api_warnings(AD, "patching Deployment qwen-vllm", [])
    assert events == [
        ("Warning", "DeploymentWarning", f"the API server warned when creating Deployment qwen-vllm: {psa}"),
        ("Warning", "DeploymentWarning", "the API server warned when patching Deployment qwen-vllm: other"),
    ]


def test_one_untrusted_pod_warning_per_pod_again_after_it_was_gone(events: list) -> None:
    log = logging.getLogger("test")
    h._warn_untrusted(AD, {"x": "it has no controller ownerReference"}, log)
    h._warn_untrusted(AD, {"x": "it has no controller ownerReference", "y": "its controller is Job j, not a ReplicaSet"},
                      log)
    h._warn_untrusted(AD, {"x": "it has no controller ownerReference"}, log)  # every reconcile: nothing new
    assert [(t, r, m.split()[1]) for t, r, m in events] == [
        ("Warning", "UntrustedPod", "x"), ("Warning", "UntrustedPod", "y")]
    assert events[0][2] == ("pod x has the labels of qwen-vllm's pods but is not its own (it has no controller "
                            "ownerReference): it gets no admin call and does not count in the status")
    h._warn_untrusted(AD, {}, log)  # both gone
    h._warn_untrusted(AD, {"y": "its controller is Job j, not a ReplicaSet"}, log)  # a new look-alike named y
    assert [m.split()[1] for _, _, m in events] == ["x", "y", "y"]
