"""Why a workload has no (working) pods. Pure: dicts in, a dict out, no I/O.

:func:`pod_cause` reads what Kubernetes already says about a workload's pods: the owner workload's
conditions (a Deployment's or ReplicaSet's ``ReplicaFailure`` with reason ``FailedCreate`` and the
admission message, ``Progressing=False`` ``ProgressDeadlineExceeded``), the pods' own status
(``PodScheduled=False`` ``Unschedulable`` with the scheduler's message; waiting reasons of init and
app containers; the last terminated state of a restarting container; ``Failed``/``Evicted`` pods)
and, optionally, the workload's Warning Events (a Job has no ``ReplicaFailure`` condition: its
refused pods are ``FailedCreate`` Events). It returns the most relevant cause, or None when the
pods are fine or simply starting (scheduled, pulling, creating, running but not ready yet)::

    {"reason": "ImagePullFailed",                   # a stable name, one of REASONS
     "message": "pod qwen-vllm-abc container vllm: ImagePullBackOff: Back-off pulling image ...",
     "pod": "qwen-vllm-abc", "container": "vllm",   # None when no pod is concerned
     "restarts": 0,                                 # the container's restartCount
     "key": "ImagePullFailed|vllm|vllm/vllm-openai:nope"}

``key`` identifies the cause without what changes while it lasts (pod names of retried creates,
restart and node counts, ErrImagePull vs ImagePullBackOff): one Event per distinct key.
Messages are at most ``limit`` characters (status messages stay short); :func:`with_log_line`
appends the last line of a crash-looping container's previous log, with secrets redacted.

Most relevant first: PodAdmissionRefused / PodCreateFailed (no pod can even exist),
ImagePullFailed, ContainerConfigError, OOMKilled, CrashLoop, Unschedulable, PodEvicted /
PodFailed (only while the workload is short of available pods), ProgressDeadlineExceeded.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

ADMISSION_REFUSED = "PodAdmissionRefused"
CREATE_FAILED = "PodCreateFailed"
IMAGE_PULL_FAILED = "ImagePullFailed"
CONTAINER_CONFIG_ERROR = "ContainerConfigError"
OOM_KILLED = "OOMKilled"
CRASH_LOOP = "CrashLoop"
UNSCHEDULABLE = "Unschedulable"
EVICTED = "PodEvicted"
POD_FAILED = "PodFailed"
PROGRESS_DEADLINE = "ProgressDeadlineExceeded"
VOLUME_MOUNT_FAILED = "VolumeMountFailed"

# Most relevant first.
REASONS = (ADMISSION_REFUSED, CREATE_FAILED, IMAGE_PULL_FAILED, CONTAINER_CONFIG_ERROR, VOLUME_MOUNT_FAILED,
           OOM_KILLED, CRASH_LOOP, UNSCHEDULABLE, EVICTED, POD_FAILED, PROGRESS_DEADLINE)
# The kubelet's Warning Events of a pod whose volumes cannot be set up (the pod only says ContainerCreating).
VOLUME_EVENTS = ("FailedMount", "FailedAttachVolume", "FailedMapVolume")
_RANK = {r: i for i, r in enumerate(REASONS)}

IMAGE_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "RegistryUnavailable", "ImageInspectError", "SignatureValidationFailed"}
CONFIG_WAITING = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                  "PreCreateHookError", "PreStartHookError"}

MESSAGE_LIMIT = 1000
LOG_LINE_LIMIT = 300
REDACTED = "***"


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line, at most `limit` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def _conditions(obj: Optional[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return list(((obj or {}).get("status") or {}).get("conditions") or [])


def _cond(obj: Optional[Mapping[str, Any]], type_: str) -> Optional[Mapping[str, Any]]:
    return next((c for c in _conditions(obj) if c.get("type") == type_), None)


def _name(obj: Optional[Mapping[str, Any]]) -> str:
    return str(((obj or {}).get("metadata") or {}).get("name") or "")


def _normalise(text: str) -> str:
    """What stays the same while a cause lasts: no pod names, no numbers."""
    text = re.sub(r'pods? "[^"]*"', "pods", text)
    return re.sub(r"\d+", "#", " ".join(text.split()))


def _admission(message: str, where: str) -> dict[str, Any]:
    reason = ADMISSION_REFUSED if "forbidden" in message or "denied" in message else CREATE_FAILED
    msg = message.removeprefix("Error creating: ")
    return {"reason": reason, "message": f"{where} cannot create pods: {msg}", "pod": None, "container": None,
            "restarts": 0, "key": f"{reason}|{_normalise(msg)}"}


def _short_of_pods(workload: Optional[Mapping[str, Any]]) -> bool:
    """A Deployment/ReplicaSet/StatefulSet with fewer available pods than wanted; any other
    workload (a Job) counts as short: its failed pods matter."""
    if not workload or workload.get("kind") not in ("Deployment", "ReplicaSet", "StatefulSet"):
        return True
    wanted = int(((workload.get("spec") or {}).get("replicas", 1)) or 0)
    available = int(((workload.get("status") or {}).get("availableReplicas")) or 0)
    av = _cond(workload, "Available")
    return available < wanted or (av is not None and av.get("status") == "False")


def _container_causes(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    pname = _name(pod)
    spec = pod.get("spec") or {}
    images = {c.get("name"): c.get("image") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])}
    st = pod.get("status") or {}
    out: list[dict[str, Any]] = []
    for cs in list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or []):
        cname = cs.get("name") or ""
        where = f"pod {pname} container {cname}"
        restarts = int(cs.get("restartCount") or 0)
        state = cs.get("state") or {}
        waiting = state.get("waiting") or {}
        wreason = waiting.get("reason") or ""
        wmsg = waiting.get("message") or ""
        last = (cs.get("lastState") or {}).get("terminated") or {}
        term = state.get("terminated") or {}
        base = {"pod": pname, "container": cname, "restarts": restarts}
        if wreason in IMAGE_WAITING:
            image = cs.get("image") or images.get(cname) or ""
            out.append({**base, "reason": IMAGE_PULL_FAILED, "key": f"{IMAGE_PULL_FAILED}|{cname}|{image}",
                        "message": f"{where}: {wreason}: {wmsg or image}"})
        elif wreason in CONFIG_WAITING:
            out.append({**base, "reason": CONTAINER_CONFIG_ERROR,
                        "key": f"{CONTAINER_CONFIG_ERROR}|{cname}|{_normalise(wmsg)}",
                        "message": f"{where}: {wreason}: {wmsg}"})
        elif term.get("reason") == "OOMKilled":
            out.append({**base, "reason": OOM_KILLED, "key": f"{OOM_KILLED}|{cname}",
                        "message": f"{where} was killed for using more memory than its limit (OOMKilled, "
                                   f"exit code {term.get('exitCode')}, restarts {restarts})"})
        elif last and (wreason == "CrashLoopBackOff"
                       or (restarts > 0 and not cs.get("ready")
                           and (last.get("exitCode") not in (0, None) or last.get("reason") == "OOMKilled"))):
            # CrashLoopBackOff, or restarted after a failure and not ready again yet (between two
            # back-offs a crash-looping container is Running: the cause must not flap).
            if last.get("reason") == "OOMKilled":
                out.append({**base, "reason": OOM_KILLED, "key": f"{OOM_KILLED}|{cname}",
                            "message": f"{where} was killed for using more memory than its limit (OOMKilled, "
                                       f"exit code {last.get('exitCode')}, restarts {restarts})"})
            else:
                detail = f"; {redact(last['message'].strip())}" if (last.get("message") or "").strip() else ""
                out.append({**base, "reason": CRASH_LOOP, "key": f"{CRASH_LOOP}|{cname}|{last.get('exitCode')}",
                            "message": f"{where} is crash-looping (restarts {restarts}): last exit code "
                                       f"{last.get('exitCode')} ({last.get('reason') or 'Error'}){detail}"})
    return out


def _pod_causes(pod: Mapping[str, Any], short: bool) -> list[dict[str, Any]]:
    pname = _name(pod)
    st = pod.get("status") or {}
    phase = st.get("phase")
    base = {"pod": pname, "container": None, "restarts": 0}
    if phase == "Succeeded":
        return []
    if phase == "Failed":
        if not short:
            return []
        reason = EVICTED if st.get("reason") == "Evicted" else POD_FAILED
        why = st.get("message") or st.get("reason") or "failed"
        return [{**base, "reason": reason, "key": f"{reason}|{_normalise(why)}",
                 "message": f"pod {pname} {'was evicted' if reason == EVICTED else 'failed'}: {why}"}]
    out = _container_causes(pod)
    sched = _cond(pod, "PodScheduled")
    if sched is not None and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        why = sched.get("message") or "no node fits"
        out.append({**base, "reason": UNSCHEDULABLE, "key": f"{UNSCHEDULABLE}|{_normalise(why)}",
                    "message": f"pod {pname} cannot be scheduled: {why}"})
    return out


def _volume_cause(pod: Mapping[str, Any], events: Iterable[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """The newest FailedMount-like Warning Event of a pod that has not started (still Pending)."""
    if (pod.get("status") or {}).get("phase") not in (None, "Pending"):
        return None
    pname, uid = _name(pod), ((pod.get("metadata") or {}).get("uid"))
    mine = [e for e in events if e.get("reason") in VOLUME_EVENTS and e.get("message")
            and (e.get("involvedObject") or {}).get("kind", "Pod") == "Pod"
            and (e.get("involvedObject") or {}).get("name") == pname
            and (not uid or not (e.get("involvedObject") or {}).get("uid") or e["involvedObject"]["uid"] == uid)]
    if not mine:
        return None
    ev = sorted(mine, key=_event_time)[-1]
    msg = str(ev["message"])
    return {"reason": VOLUME_MOUNT_FAILED, "pod": pname, "container": None, "restarts": 0,
            "key": f"{VOLUME_MOUNT_FAILED}|{_normalise(msg)}",
            "message": f"pod {pname} cannot mount its volumes: {ev.get('reason')}: {msg}"}


def _event_time(ev: Mapping[str, Any]) -> str:
    return str(ev.get("lastTimestamp") or ev.get("eventTime") or ev.get("firstTimestamp") or "")


def pod_cause(
    pods: Iterable[Mapping[str, Any]],
    *,
    workload: Optional[Mapping[str, Any]] = None,
    replicasets: Iterable[Mapping[str, Any]] = (),
    events: Iterable[Mapping[str, Any]] = (),
    limit: int = MESSAGE_LIMIT,
) -> Optional[dict[str, Any]]:
    """The most relevant reason why `workload`'s `pods` do not work (see the module docstring),
    or None. `pods`: the workload's pods (any phase); `replicasets`: a Deployment's ReplicaSets
    (the Deployment copies their ``ReplicaFailure`` already; optional); `events`: Warning Events of
    the workload (``FailedCreate``, used only while no pod exists) and of its pods (``FailedMount`` and
    the like: a pod whose volumes cannot be set up stays Pending with ContainerCreating and says no more)."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    causes: list[dict[str, Any]] = []
    kind = (workload or {}).get("kind") or "workload"
    for owner in [workload, *replicasets]:
        rf = _cond(owner, "ReplicaFailure")
        if rf is not None and rf.get("status") == "True" and rf.get("message"):
            causes.append(_admission(str(rf["message"]), f"{(owner or {}).get('kind') or kind} {_name(owner)}"))
    if not causes and not live:
        refused = sorted((e for e in events if e.get("reason") == "FailedCreate" and e.get("message")),
                         key=_event_time)
        if refused:
            causes.append(_admission(str(refused[-1]["message"]), f"{kind} {_name(workload)}"))
    short = _short_of_pods(workload)
    for pod in sorted(live, key=_name):
        causes += _pod_causes(pod, short)
        mount = _volume_cause(pod, events)
        if mount is not None:
            causes.append(mount)
    prog = _cond(workload, "Progressing")
    if prog is not None and prog.get("status") == "False" and prog.get("reason") == PROGRESS_DEADLINE:
        causes.append({"reason": PROGRESS_DEADLINE, "pod": None, "container": None, "restarts": 0,
                       "key": PROGRESS_DEADLINE,
                       "message": f"{kind} {_name(workload)}: {prog.get('message') or 'timed out progressing'}"})
    if not causes:
        return None
    best = min(causes, key=lambda c: _RANK[c["reason"]])  # min is stable: the first of its rank
    others = sorted({c["pod"] for c in causes if c["reason"] == best["reason"] and c["pod"]} - {best["pod"]})
    out = dict(best)
    if others:
        out["message"] = f"{out['message']} (also {len(others)} more pod{'s' if len(others) > 1 else ''}: " \
                         f"{', '.join(others[:3])}{', …' if len(others) > 3 else ''})"
    out["message"] = shorten(out["message"], limit)
    return out


# ---------------------------------------------------------------------------------- logs

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_SECRETISH = re.compile(
    r"(?i)\b([a-z0-9_-]*(?:api[_-]?key|token|password|passwd|secret|authorization))(['\"]?\s*[=:]\s*)(['\"]?)[^\s'\",;}]+")


def redact(text: str, secrets: Iterable[Optional[str]] = ()) -> str:
    """`text` without the given secret values nor anything that looks like ``token=…``,
    ``api_key: …``, ``Bearer …``."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _SECRETISH.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}", text)


def last_log_line(log: Optional[str], *, secrets: Iterable[Optional[str]] = (),
                  limit: int = LOG_LINE_LIMIT) -> Optional[str]:
    """The last non-empty line of a log tail, without colour codes, redacted and shortened."""
    for line in reversed(_ANSI.sub("", log or "").splitlines()):
        if line.strip():
            return shorten(redact(line.strip(), secrets), limit)
    return None


def with_log_line(cause: Optional[Mapping[str, Any]], line: Optional[str], *,
                  limit: int = MESSAGE_LIMIT) -> Optional[dict[str, Any]]:
    """`cause` with ``; last log line: <line>`` appended to its message (the line is kept whole:
    the message before it is cut instead)."""
    if cause is None:
        return None
    out = dict(cause)
    if line:
        tail = f"; last log line: {line}"
        out["message"] = shorten(out["message"], max(limit - len(tail), 0)) + tail
    return out


def needs_log(cause: Optional[Mapping[str, Any]]) -> bool:
    """Whether the previous log of the cause's container is worth reading (a crash loop)."""
    return bool(cause and cause.get("reason") == CRASH_LOOP and cause.get("pod") and cause.get("container"))


def is_new(cause: Optional[Mapping[str, Any]], posted_key: Optional[str],
           previous_condition: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether `cause` deserves a Warning Event: its key differs from the last one posted
    (`posted_key`, kept in memory). After an operator restart (no key in memory) a cause whose
    reason the previous status already shows (`previous_condition`, False with that reason) was
    posted before."""
    if cause is None or cause.get("key") == posted_key:
        return False
    if posted_key is None and previous_condition is not None and previous_condition.get("status") == "False" \
            and previous_condition.get("reason") == cause.get("reason"):
        return False
    return True
