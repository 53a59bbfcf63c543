"""podcauses.py: why a workload has no working pods, from objects shaped as Kubernetes 1.36
writes them (Deployment conditions, pod status of a Deployment's pods)."""
from __future__ import annotations

import copy
from typing import Any, Optional

from tuneop import podcauses as pc

PSA = ('pods "qwen-vllm-7c9d8b6f5d-x2k4p" is forbidden: violates PodSecurity "restricted:latest": '
       'runAsNonRoot != true (pod or container "vllm" must set securityContext.runAsNonRoot=true)')
SCHED = ("0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
         "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for "
         "scheduling, 2 No preemption victims found for incoming pod.")


def deployment(available: int = 0, replicas: int = 1, conditions: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    conds = conditions if conditions is not None else [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
         "message": "Deployment does not have minimum availability.",
         "lastUpdateTime": "2026-05-01T10:00:00Z", "lastTransitionTime": "2026-05-01T10:00:00Z"},
        {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
         "message": 'ReplicaSet "qwen-vllm-7c9d8b6f5d" is progressing.',
         "lastUpdateTime": "2026-05-01T10:00:00Z", "lastTransitionTime": "2026-05-01T10:00:00Z"},
    ]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "qwen-vllm", "namespace": "team-a", "generation": 1},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                       "availableReplicas": available, "readyReplicas": available,
                       "unavailableReplicas": replicas - available, "conditions": conds}}


def replica_failure(message: str = PSA) -> dict[str, Any]:
    return {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message,
            "lastUpdateTime": "2026-05-01T10:00:01Z", "lastTransitionTime": "2026-05-01T10:00:01Z"}


def pod(name: str = "qwen-vllm-7c9d8b6f5d-x2k4p", *, phase: str = "Pending",
        containers: Optional[list[dict[str, Any]]] = None, init: Optional[list[dict[str, Any]]] = None,
        conditions: Optional[list[dict[str, Any]]] = None, **status: Any) -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase, "qosClass": "Burstable", "startTime": "2026-05-01T10:00:02Z",
                          "conditions": conditions if conditions is not None else [
                              {"type": "PodReadyToStartContainers", "status": "True"},
                              {"type": "Initialized", "status": "True"},
                              {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                               "message": "containers with unready status: [vllm]"},
                              {"type": "PodScheduled", "status": "True"}],
                          **status}
    if containers is not None:
        st["containerStatuses"] = containers
    if init is not None:
        st["initContainerStatuses"] = init
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "team-a",
                         "labels": {"tuneop.dev/adapterdeployment": "qwen", "app.kubernetes.io/component": "vllm"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}],
                     "initContainers": [{"name": "fetch-web", "image": "ghcr.io/tuneop/trainer:1"}]},
            "status": st}


def cstatus(name: str = "vllm", *, state: dict[str, Any], last: Optional[dict[str, Any]] = None,
            restarts: int = 0, ready: bool = False, image: str = "vllm/vllm-openai:v0.11.0") -> dict[str, Any]:
    return {"name": name, "image": image, "imageID": "", "ready": ready, "started": False,
            "restartCount": restarts, "state": state, "lastState": last or {}}


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


def crashed(exit_code: int = 1, reason: str = "Error", message: str = "") -> dict[str, Any]:
    t = {"exitCode": exit_code, "reason": reason, "startedAt": "2026-05-01T10:01:00Z",
         "finishedAt": "2026-05-01T10:01:40Z", "containerID": "containerd://abc"}
    if message:
        t["message"] = message
    return {"terminated": t}


CRASHLOOP = waiting("CrashLoopBackOff", "back-off 40s restarting failed container=vllm "
                                        "pod=qwen-vllm-7c9d8b6f5d-x2k4p_team-a(0b6e...)")


# ---------------------------------------------------------------------------------- causes


def test_admission_refusal_from_the_deployments_replica_failure() -> None:
    d = deployment(conditions=[*deployment()["status"]["conditions"], replica_failure()])
    c = pc.pod_cause([], workload=d)
    assert c is not None and c["reason"] == "PodAdmissionRefused"
    assert c["message"] == f"Deployment qwen-vllm cannot create pods: {PSA}"
    assert c["pod"] is None and c["container"] is None
    # Retries name other pods: the same cause (one Event), not a new one.
    again = replica_failure(PSA.replace("x2k4p", "q8w7e"))
    assert pc.pod_cause([], workload=deployment(conditions=[again]))["key"] == c["key"]
    # A ReplicaFailure that is not an admission refusal keeps its own name.
    other = pc.pod_cause([], workload=deployment(conditions=[replica_failure("Internal error occurred: etcd")]))
    assert other["reason"] == "PodCreateFailed"
    # From a ReplicaSet, and from a Job's FailedCreate Events while it has no pod.
    rs = {"kind": "ReplicaSet", "metadata": {"name": "qwen-vllm-7c9d8b6f5d"}, "status": {"conditions": [replica_failure()]}}
    assert "ReplicaSet qwen-vllm-7c9d8b6f5d cannot create pods" in pc.pod_cause([], workload=deployment(),
                                                                                replicasets=[rs])["message"]
    job = {"kind": "Job", "metadata": {"name": "news-train"}, "status": {}}
    events = [{"reason": "FailedCreate", "type": "Warning", "lastTimestamp": "2026-05-01T10:00:01Z",
               "message": "Error creating: " + PSA},
              {"reason": "SuccessfulCreate", "type": "Normal", "message": "Created pod: x"}]
    jc = pc.pod_cause([], workload=job, events=events)
    assert jc["reason"] == "PodAdmissionRefused" and jc["message"] == f"Job news-train cannot create pods: {PSA}"
    assert pc.pod_cause([pod(containers=[])], workload=job, events=events) is None  # a pod exists: stale


def test_admission_refusal_outranks_pod_causes_and_fine_pods_are_none() -> None:
    pulling = pod(containers=[cstatus(state=waiting("ErrImagePull", "rpc error"))])
    d = deployment(conditions=[replica_failure()])
    assert pc.pod_cause([pulling], workload=d)["reason"] == "PodAdmissionRefused"
    assert pc.pod_cause([], workload=deployment()) is None
    assert pc.pod_cause([], workload=None) is None


def test_starting_pods_are_no_cause() -> None:
    starting = [
        pod(containers=[cstatus(state=waiting("ContainerCreating"))]),
        pod(init=[cstatus("fetch-web", state=waiting("PodInitializing"))]),
        pod(phase="Running", containers=[cstatus(state={"running": {"startedAt": "2026-05-01T10:00:09Z"}})]),
        pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]),
        pod(conditions=[]),  # just created: no status yet
        {"metadata": {"name": "bare"}},
    ]
    for p in starting:
        assert pc.pod_cause([p], workload=deployment()) is None, p


def test_image_pull_errors_name_pod_container_and_image() -> None:
    msg = ('failed to pull and unpack image "docker.io/vllm/vllm-openai:nope": failed to resolve reference '
           '"docker.io/vllm/vllm-openai:nope": docker.io/vllm/vllm-openai:nope: not found')
    p = pod(containers=[cstatus(state=waiting("ErrImagePull", msg), image="vllm/vllm-openai:nope")])
    c = pc.pod_cause([p], workload=deployment())
    assert c["reason"] == "ImagePullFailed" and c["pod"] == "qwen-vllm-7c9d8b6f5d-x2k4p" and c["container"] == "vllm"
    assert c["message"] == f"pod qwen-vllm-7c9d8b6f5d-x2k4p container vllm: ErrImagePull: {msg}"
    backoff = pod(containers=[cstatus(state=waiting("ImagePullBackOff", 'Back-off pulling image "vllm/vllm-openai:nope"'),
                                      image="vllm/vllm-openai:nope")])
    b = pc.pod_cause([backoff], workload=deployment())
    assert b["reason"] == "ImagePullFailed" and "ImagePullBackOff" in b["message"]
    assert b["key"] == c["key"]  # ErrImagePull <-> ImagePullBackOff is one cause
    invalid = pod(containers=[cstatus(state=waiting("InvalidImageName", 'couldn\'t parse image name "vllm:"'))])
    assert pc.pod_cause([invalid], workload=deployment())["reason"] == "ImagePullFailed"
    init = pod(init=[cstatus("fetch-web", state=waiting("ImagePullBackOff", "Back-off"), image="ghcr.io/x:1")])
    ic = pc.pod_cause([init], workload=deployment())
    assert ic["container"] == "fetch-web" and "container fetch-web" in ic["message"]


def test_container_config_errors() -> None:
    msg = 'secret "qwen-vllm-admin" not found'
    p = pod(containers=[cstatus(state=waiting("CreateContainerConfigError", msg))])
    c = pc.pod_cause([p], workload=deployment())
    assert c["reason"] == "ContainerConfigError"
    assert c["message"] == f"pod qwen-vllm-7c9d8b6f5d-x2k4p container vllm: CreateContainerConfigError: {msg}"
    p2 = pod(containers=[cstatus(state=waiting("CreateContainerError", "context deadline exceeded"))])
    assert pc.pod_cause([p2], workload=deployment())["reason"] == "ContainerConfigError"


def test_crash_loop_with_exit_code_and_termination_message() -> None:
    p = pod(phase="Running", containers=[cstatus(state=CRASHLOOP, restarts=4,
                                                 last=crashed(1, "Error", "ValueError: no such model"))])
    c = pc.pod_cause([p], workload=deployment())
    assert c["reason"] == "CrashLoop" and c["container"] == "vllm" and c["restarts"] == 4
    assert c["message"] == ("pod qwen-vllm-7c9d8b6f5d-x2k4p container vllm is crash-looping (restarts 4): "
                            "last exit code 1 (Error); ValueError: no such model")
    assert pc.needs_log(c)
    leaky = pod(phase="Running", containers=[cstatus(state=CRASHLOOP, restarts=1,
                                                     last=crashed(1, message="bad HF_TOKEN=hf_abcdefgh1234"))])
    assert pc.pod_cause([leaky], workload=deployment())["message"].endswith("; bad HF_TOKEN=***")
    # Between two back-offs the container runs again, not ready: still the same cause (no flapping).
    running = pod(phase="Running", containers=[cstatus(state={"running": {"startedAt": "x"}}, restarts=5,
                                                       last=crashed(1))])
    r = pc.pod_cause([running], workload=deployment())
    assert r["reason"] == "CrashLoop" and r["key"] == c["key"]
    # Ready again after a restart: fine.
    healed = copy.deepcopy(running)
    healed["status"]["containerStatuses"][0]["ready"] = True
    assert pc.pod_cause([healed], workload=deployment(available=1)) is None


def test_oom_killed() -> None:
    p = pod(phase="Running", containers=[cstatus(state=CRASHLOOP, restarts=2, last=crashed(137, "OOMKilled"))])
    c = pc.pod_cause([p], workload=deployment())
    assert c["reason"] == "OOMKilled" and "OOMKilled, exit code 137, restarts 2" in c["message"]
    assert not pc.needs_log(c)
    now = pod(phase="Running", containers=[cstatus(state=crashed(137, "OOMKilled"), restarts=0)])
    assert pc.pod_cause([now], workload=deployment())["reason"] == "OOMKilled"


def test_unschedulable_carries_the_schedulers_message() -> None:
    p = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHED,
                         "lastTransitionTime": "2026-05-01T10:00:02Z"}])
    c = pc.pod_cause([p], workload=deployment())
    assert c["reason"] == "Unschedulable"
    assert c["message"] == f"pod qwen-vllm-7c9d8b6f5d-x2k4p cannot be scheduled: {SCHED}"
    # More nodes (different counts), same cause.
    p2 = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                          "message": SCHED.replace("0/3", "0/4").replace("2 Insufficient", "3 Insufficient")}])
    assert pc.pod_cause([p2], workload=deployment())["key"] == c["key"]


def test_ranking_several_pods_and_the_message_limit() -> None:
    unsched = pod("qwen-vllm-a", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": SCHED}])
    crash = [pod(f"qwen-vllm-{x}", phase="Running",
                 containers=[cstatus(state=CRASHLOOP, restarts=3, last=crashed(1, message="x" * 3000))])
             for x in "edcb"]
    c = pc.pod_cause([unsched, *crash], workload=deployment(replicas=5))
    assert c["reason"] == "CrashLoop" and c["pod"] == "qwen-vllm-b"  # the first by name
    assert len(c["message"]) <= pc.MESSAGE_LIMIT and c["message"].endswith("…")
    short = pc.pod_cause([unsched, *crash], workload=deployment(replicas=5), limit=100000)
    assert short["message"].endswith("(also 3 more pods: qwen-vllm-c, qwen-vllm-d, qwen-vllm-e)")
    # Terminating pods (old ReplicaSet, rolled away) are not looked at.
    gone = copy.deepcopy(crash[0])
    gone["metadata"]["deletionTimestamp"] = "2026-05-01T10:05:00Z"
    assert pc.pod_cause([gone], workload=deployment()) is None


def test_evicted_and_failed_pods_only_while_short_of_pods() -> None:
    evicted = pod("qwen-vllm-old", phase="Failed", conditions=[], reason="Evicted",
                  message="The node was low on resource: memory. Threshold quantity: 100Mi, available: 88Mi. "
                          "Container vllm was using 30Gi, request is 24Gi, has larger consumption of memory.")
    c = pc.pod_cause([evicted], workload=deployment(available=0))
    assert c["reason"] == "PodEvicted" and c["message"].startswith("pod qwen-vllm-old was evicted: The node was low")
    ok = deployment(available=1, conditions=[{"type": "Available", "status": "True"}])
    assert pc.pod_cause([evicted], workload=ok) is None  # replaced already: history, not a cause
    failed = pod("qwen-vllm-f", phase="Failed", conditions=[], reason="UnexpectedAdmissionError",
                 message="Allocate failed due to no healthy devices present; cannot allocate unhealthy devices nvidia.com/gpu")
    assert pc.pod_cause([failed], workload=deployment())["reason"] == "PodFailed"
    assert pc.pod_cause([pod(phase="Succeeded")], workload=deployment()) is None


def test_progress_deadline_is_the_last_resort() -> None:
    stuck = deployment(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": 'ReplicaSet "qwen-vllm-7c9d8b6f5d" has timed out progressing.'}])
    c = pc.pod_cause([pod(containers=[cstatus(state=waiting("ContainerCreating"))])], workload=stuck)
    assert c["reason"] == "ProgressDeadlineExceeded"
    assert c["message"] == 'Deployment qwen-vllm: ReplicaSet "qwen-vllm-7c9d8b6f5d" has timed out progressing.'
    pulling = pod(containers=[cstatus(state=waiting("ImagePullBackOff", "Back-off"))])
    assert pc.pod_cause([pulling], workload=stuck)["reason"] == "ImagePullFailed"


# ---------------------------------------------------------------------------------- logs, events


def test_last_log_line_redacts_and_shortens() -> None:
    log = ("INFO 05-01 10:01:02 api_server.py:1 vLLM API server version 0.11.0\n"
           "\x1b[31mERROR\x1b[0m ValueError: model not found (token=abcdefgh12345, 'api_key': 'sk-live-123456')\n\n  \n")
    line = pc.last_log_line(log, secrets=["sk-live-123456"])
    assert line == "ERROR ValueError: model not found (token=***, 'api_key': '***')"
    assert pc.last_log_line("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc") == "Authorization: *** ***"
    assert "s3cr3t-value" not in pc.last_log_line("using s3cr3t-value now", secrets=["s3cr3t-value"])
    assert pc.last_log_line("invalid token provided") == "invalid token provided"  # words stay
    assert pc.last_log_line("") is None and pc.last_log_line(None) is None and pc.last_log_line("\n \n") is None
    assert len(pc.last_log_line("y" * 5000)) == pc.LOG_LINE_LIMIT


def test_with_log_line_keeps_the_line_and_the_limit() -> None:
    cause = {"reason": "CrashLoop", "message": "m" * 2000, "key": "k", "pod": "p", "container": "c"}
    out = pc.with_log_line(cause, "ValueError: boom")
    assert out["message"].endswith("…; last log line: ValueError: boom") and len(out["message"]) <= pc.MESSAGE_LIMIT
    assert out["key"] == "k" and cause["message"] == "m" * 2000
    assert pc.with_log_line(cause, None) == cause and pc.with_log_line(None, "x") is None


def test_is_new_posts_once_per_distinct_cause() -> None:
    a = {"reason": "ImagePullFailed", "key": "ImagePullFailed|vllm|x"}
    assert pc.is_new(a, None)
    assert not pc.is_new(a, "ImagePullFailed|vllm|x")
    assert pc.is_new(a, "Unschedulable|...")
    assert not pc.is_new(None, "ImagePullFailed|vllm|x")
    # After a restart of the operator: the status already shows it, posted before.
    shown = {"type": "PodsHealthy", "status": "False", "reason": "ImagePullFailed"}
    assert not pc.is_new(a, None, shown)
    assert pc.is_new(a, None, {**shown, "reason": "CrashLoop"})
    assert pc.is_new(a, None, {**shown, "status": "True", "reason": "PodsHealthy"})


def test_a_pod_whose_volume_cannot_be_mounted_says_so_from_its_events() -> None:
    from tuneop import podcauses as pc

    pod = {"metadata": {"name": "news-train-x", "uid": "u1"},
           "status": {"phase": "Pending", "containerStatuses": [
               {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}]}}
    mount = {"reason": "FailedMount", "type": "Warning", "lastTimestamp": "2026-01-01T00:01:00Z",
             "involvedObject": {"kind": "Pod", "name": "news-train-x", "uid": "u1"},
             "message": 'MountVolume.SetUp failed for volume "pvc-0" : persistentvolumeclaim "adapters" not found'}
    assert pc.pod_cause([pod]) is None  # ContainerCreating alone: simply starting
    cause = pc.pod_cause([pod], events=[mount])
    assert cause["reason"] == "VolumeMountFailed" and 'persistentvolumeclaim "adapters" not found' in cause["message"]
    assert cause["message"].startswith("pod news-train-x cannot mount its volumes: FailedMount:")
    # Another pod's event, an older pod of the same name (other uid) or a running pod: no cause.
    other = {**mount, "involvedObject": {"kind": "Pod", "name": "other"}}
    stale = {**mount, "involvedObject": {"kind": "Pod", "name": "news-train-x", "uid": "old"}}
    assert pc.pod_cause([pod], events=[other, stale]) is None
    running = {**pod, "status": {"phase": "Running"}}
    assert pc.pod_cause([running], events=[mount]) is None
