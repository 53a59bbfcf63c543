"""The FineTuneJob reducer: what exists -> what to do and the new status. Pure: no I/O, no kopf.

``tuneop.backends.reconcile(body, observed, image=..., now=...)`` takes the FineTuneJob as a dict
and an :class:`Observed` (children, their pods, missing dependencies, the operator's own checks of
ConfigMap datasets) and returns a :class:`Decision`: manifests to create, merge patches, objects
to delete, the complete new ``status``, one Event per transition, and when to look again. It runs
:func:`begin` (what every backend shares: the spec, a finished job) and then the backend's
reducer. This module holds what backends share (the status builder, conditions, Events, pod and
Job reading) and the reducer of backend kubernetes, :func:`reconcile_kubernetes`;
``backend: together`` has its own in :mod:`tuneop.backends.together.status`. For backend kubernetes:

State machine of one spec (``status.specHash`` = hash of the spec without ``suspend``)::

    Pending(DependencyMissing | SpecChanged)
      -> Pending(ValidationPending) -> Validating   (Job <name>-validate; only for PVC/URL datasets;
                                                     Validating once its pod runs)
      -> Pending(TrainingPending | Resuming) -> Running   (Job <name>-train; Running once a
                                                     training pod runs) <-> Suspended
      -> Evaluating (the trainer scores base and adapter on the test split; set from its log by
                     the progress poller, see :func:`progress_update`)
      -> Succeeded | Failed

While a Job's pods have not started, the phase stays Pending and the reason names what they
wait for; when the pods report why they cannot start (unschedulable, image not pullable, ...)
that cause is the reason (:func:`pending_cause`).

Rules:

- A finished job (Succeeded/Failed) is never re-run for the same spec, even when its children
  are deleted later. Toggling ``spec.suspend`` alone never replaces anything.
- A changed spec (new spec hash) replaces the children of the old spec, whatever the phase:
  the old Jobs are deleted (their pods with them), the status is reset, and once they are gone
  the new config, validation and training Jobs are created. A running training is stopped; the
  new one resumes from the newest checkpoint in the output directory only if the trainer finds
  one compatible with the new spec (the operator does not decide that).
- ``resources.nodes > 1``: a failed rank fails the whole training Job (``backoffLimit: 0``), and the
  gang restarts from the newest checkpoint up to ``maxRetries`` times: Pending(GangRestart) records
  ``status.restarts``, then deletes the Job, then creates it again -> Pending(Resuming) -> Running
  (:mod:`tuneop.finetunejob.gang`).
- User errors (SpecInvalid, DatasetInvalid, UnsupportedHardware, TrainingFailed) and platform
  errors (PodEvicted, BackoffLimitExceeded, DeadlineExceeded, OOMKilled) are terminal with
  different reasons; a missing dependency (DependencyMissing, naming the object) is not terminal:
  the decision asks to look again later.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from .. import cost, podcauses
from ..api.finetunejob import AdapterType, FineTuneJobSpec, parse_spec
from ..dataset import DatasetReport
from ..workload_defaults import apply_to_pod
from . import builders as b
from . import gang
from . import startfrom as sf

# Phases
PENDING = "Pending"
VALIDATING = "Validating"
RUNNING = "Running"
EVALUATING = "Evaluating"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
TERMINAL = (SUCCEEDED, FAILED)

# Condition types
VALIDATED = "Validated"
RUNNING_COND = "Running"
SUCCEEDED_COND = "Succeeded"
FAILED_COND = "Failed"
COST_LIMIT_COND = "CostLimitExceeded"  # True while spec.maxCostUSD keeps the job from starting

# Reasons: user errors
SPEC_INVALID = "SpecInvalid"
DATASET_INVALID = "DatasetInvalid"
UNSUPPORTED_HARDWARE = "UnsupportedHardware"
TRAINING_FAILED = "TrainingFailed"
USER_ERRORS: tuple[str, ...] = (SPEC_INVALID, DATASET_INVALID, UNSUPPORTED_HARDWARE, TRAINING_FAILED)
# Reasons: platform errors
DEPENDENCY_MISSING = "DependencyMissing"
POD_EVICTED = "PodEvicted"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"
OOM_KILLED = "OOMKilled"
API_ERROR = "ApiError"
PLATFORM_ERRORS: tuple[str, ...] = (
    DEPENDENCY_MISSING, POD_EVICTED, BACKOFF_LIMIT_EXCEEDED, DEADLINE_EXCEEDED, OOM_KILLED, API_ERROR
)
# Reasons: progress
BACKEND_NOT_IMPLEMENTED = "BackendNotImplemented"
SPEC_CHANGED = "SpecChanged"
VALIDATING_REASON = "Validating"
DATASET_VALID = "DatasetValid"
TRAINING_STARTED = "TrainingStarted"
RESUMED = "Resumed"
VALIDATION_PENDING = "ValidationPending"
TRAINING_PENDING = "TrainingPending"
RESUMING = "Resuming"
EVALUATING_REASON = "Evaluating"
ADAPTER_REUSED = "AdapterReused"
SUSPENDED_REASON = "Suspended"
SUCCEEDED_REASON = "Succeeded"
COST_LIMIT_EXCEEDED = "CostLimitExceeded"

# backend: together (see backends/together/status.py)
UNSUPPORTED_BY_BACKEND = "UnsupportedByBackend"
TOGETHER_LIMITS = "TogetherLimits"
TOGETHER_REJECTED = "TogetherRejected"
TOGETHER_AUTH = "TogetherAuth"
TOGETHER_USER_ERROR = "TogetherUserError"
TOGETHER_ERROR = "TogetherError"
TOGETHER_CANCELLED = "TogetherCancelled"
TOGETHER_JOB_NOT_FOUND = "TogetherJobNotFound"
TOGETHER_UNAVAILABLE = "TogetherUnavailable"
TOGETHER_RATE_LIMITED = "TogetherRateLimited"
ARCHIVE_INVALID = "ArchiveInvalid"
UPLOADING = "Uploading"
CREATING_TOGETHER_JOB = "CreatingTogetherJob"
ESTIMATING_COST = "EstimatingCost"
TOGETHER_JOB_CREATED = "TogetherJobCreated"
DOWNLOADING = "Downloading"
USER_ERRORS = USER_ERRORS + (
    UNSUPPORTED_BY_BACKEND, TOGETHER_LIMITS, TOGETHER_REJECTED, TOGETHER_AUTH, TOGETHER_USER_ERROR,
)
PLATFORM_ERRORS = PLATFORM_ERRORS + (
    TOGETHER_ERROR, TOGETHER_CANCELLED, TOGETHER_JOB_NOT_FOUND, TOGETHER_UNAVAILABLE,
    TOGETHER_RATE_LIMITED, ARCHIVE_INVALID,
)
# output.s3: the trainer could not upload the adapter (its manifest, the commit marker, is not there)
OUTPUT_UPLOAD_FAILED = "OutputUploadFailed"
PLATFORM_ERRORS = PLATFORM_ERRORS + (OUTPUT_UPLOAD_FAILED,)

GANG_RESTART = gang.GANG_RESTART  # a rank of a multi-node training failed: every rank restarts
# Failures a restart of a multi-node gang may cure (not a user error, not activeDeadlineSeconds).
GANG_RETRYABLE = (BACKOFF_LIMIT_EXCEEDED, POD_EVICTED, OOM_KILLED)

# Waiting states: the operator looks again every retry interval.
RETRY_REASONS = (
    DEPENDENCY_MISSING, sf.WAITING_FOR_START, SPEC_CHANGED, API_ERROR, GANG_RESTART,
    TOGETHER_UNAVAILABLE, TOGETHER_RATE_LIMITED, TOGETHER_AUTH, CREATING_TOGETHER_JOB, ESTIMATING_COST,
)

# Why pods do not start (pending_cause): the phase stays Pending, the reason says why.
POD_CAUSES = podcauses.REASONS

WARNING_REASONS = (
    set(USER_ERRORS) | set(PLATFORM_ERRORS) | {BACKEND_NOT_IMPLEMENTED, GANG_RESTART, COST_LIMIT_EXCEEDED}
    | set(POD_CAUSES)
)

# Trainer termination-message reasons -> ours.
_TRAINER_REASONS = {
    "DatasetInvalid": DATASET_INVALID,
    "ConfigInvalid": SPEC_INVALID,
    "UnsupportedHardware": UNSUPPORTED_HARDWARE,
    "TrainingError": TRAINING_FAILED,
    "OutputUploadFailed": OUTPUT_UPLOAD_FAILED,
}

DEPENDENCY_RETRY_SECONDS = 30.0
DELETION_RETRY_SECONDS = 5.0
MAX_MESSAGE = 1000
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------- conditions


def find_condition(conditions: Iterable[dict[str, Any]], type_: str) -> Optional[dict[str, Any]]:
    for c in conditions or ():
        if c.get("type") == type_:
            return c
    return None


def make_condition(
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    *,
    now: str,
    generation: Optional[int] = None,
    previous: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """A condition; lastTransitionTime is kept from `previous` when the status did not change."""
    s = status if isinstance(status, str) else ("True" if status else "False")
    ltt = now
    if previous is not None and previous.get("status") == s and previous.get("lastTransitionTime"):
        ltt = previous["lastTransitionTime"]
    cond: dict[str, Any] = {
        "type": type_,
        "status": s,
        "reason": reason,
        "message": message,
        "lastTransitionTime": ltt,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    *,
    now: str,
    generation: Optional[int] = None,
) -> list[dict[str, Any]]:
    """New list with the condition `type_` replaced (or appended); order is kept."""
    prev = find_condition(conditions, type_)
    new = make_condition(
        type_, status, reason, message, now=now, generation=generation, previous=prev
    )
    out = [new if c.get("type") == type_ else c for c in conditions]
    if prev is None:
        out.append(new)
    return out


def remove_condition(conditions: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [c for c in conditions if c.get("type") != type_]


def is_true(conditions: Iterable[dict[str, Any]], type_: str) -> bool:
    c = find_condition(conditions, type_)
    return c is not None and c.get("status") == "True"


# ---------------------------------------------------------------------------------- small parsers


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    text = str(text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_termination_message(text: Optional[str]) -> dict[str, Any]:
    """The trainer's JSON termination message; anything else (e.g. the log tail that
    FallbackToLogsOnError puts there) becomes ``{"event": None, "text": ...}``."""
    if not text:
        return {}
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return data
        # A truncated message, or a JSON line among other log lines: try the last JSON line.
    for line in reversed(stripped.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("event") in ("error", "done", "validated", "uploaded"):
                return data
    return {"event": None, "text": stripped}


_PROGRESS_KEYS = {
    "step": ("step", int),
    "total_steps": ("totalSteps", int),
    "epoch": ("epoch", float),
    "loss": ("loss", float),
    "eval_loss": ("evalLoss", float),
    "learning_rate": ("learningRate", float),
    "tokens_per_second": ("tokensPerSecond", float),
    "eta_seconds": ("etaSeconds", int),
}


def progress_from_event(event: dict[str, Any], *, now: Optional[str] = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (alias, cast) in _PROGRESS_KEYS.items():
        value = event.get(key, event.get(alias))
        if value is None:
            continue
        try:
            out[alias] = cast(value)
        except (TypeError, ValueError):
            continue
    if now is not None:
        out["updatedAt"] = now
    return out


def json_events(log_text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line index, event) of each JSON object line of a log tail, newest first; other lines skipped."""
    lines = (log_text or "").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield i, event


def parse_progress(log_text: str, *, now: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The newest ``{"event": "progress", ...}`` line of a log tail -> status.progress."""
    for _, event in json_events(log_text):
        if event.get("event") == "progress":
            out = progress_from_event(event, now=now)
            if "step" in out:
                return out
    return None


def newest_events(log_text: str, kinds: Iterable[str]) -> dict[str, tuple[int, dict[str, Any]]]:
    """The newest JSON event of each kind in a log tail: kind -> (line index, event)."""
    wanted = set(kinds)
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, event in json_events(log_text):
        kind = event.get("event")
        if kind in wanted and kind not in out:
            out[kind] = (i, event)
            if len(out) == len(wanted):
                break
    return out


def _int_or_none(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def evaluation_progress(event: dict[str, Any]) -> dict[str, Any]:
    """The trainer's ``{"event": "evaluating", "stage", "done", "total", "eta_seconds"}`` ->
    status.progress.evaluation."""
    out: dict[str, Any] = {}
    if event.get("stage") in ("base", "adapter"):
        out["stage"] = event["stage"]
    for key, alias in (("done", "done"), ("total", "total"), ("eta_seconds", "etaSeconds")):
        value = _int_or_none(event.get(key))
        if value is not None:
            out[alias] = value
    return out


def describe_evaluation(ev: dict[str, Any]) -> str:
    what = "the adapter" if ev.get("stage") == "adapter" else "the base model"
    msg = f"scoring {what} on the test split"
    if ev.get("total"):
        msg += f" ({ev.get('done', 0)}/{ev['total']} rows)"
    return msg


def progress_update(
    status: Optional[dict[str, Any]], log_text: str, *, now: str, generation: Optional[int] = None
) -> tuple[Optional[dict[str, Any]], list[dict[str, str]]]:
    """What the training pod's log tail changes in the status of a Running (or Evaluating) job:
    (status merge patch or None, Events). The newest ``progress`` line gives status.progress, the
    newest ``checkpoint`` line ``lastCheckpointStep``; an ``evaluating`` line after the last
    progress line moves the phase to Evaluating (one Event) with ``progress.evaluation``; a
    ``tracking`` line (spec.tracking: the runs the trainer opened) gives status.tracking."""
    old = dict(status or {})
    if old.get("phase") not in (RUNNING, EVALUATING):
        return None, []
    found = newest_events(log_text, ("progress", "evaluating", "checkpoint", "tracking"))
    old_progress = dict(old.get("progress") or {})
    progress = dict(old_progress)
    if "progress" in found:
        fresh = progress_from_event(found["progress"][1])
        if "step" in fresh:
            progress.update(fresh)
    if "checkpoint" in found:
        step = _int_or_none(found["checkpoint"][1].get("step"))
        if step is not None:
            progress["lastCheckpointStep"] = step
    evaluating = "evaluating" in found and found["evaluating"][0] > found.get("progress", (-1, {}))[0]
    new = copy.deepcopy(old)
    events: list[dict[str, str]] = []
    tracked = tracking_status({"tracking": found["tracking"][1]}) if "tracking" in found else {}
    if tracked:
        new["tracking"] = tracked
    if evaluating:
        ev = evaluation_progress(found["evaluating"][1])
        progress["evaluation"] = ev
        message = describe_evaluation(ev)
        new["phase"], new["reason"], new["message"] = EVALUATING, EVALUATING_REASON, message
        new["conditions"] = set_condition(
            list(old.get("conditions") or []), RUNNING_COND, True, EVALUATING_REASON, message,
            now=now, generation=generation,
        )
        if old.get("phase") != EVALUATING:
            events.append({"type": "Normal", "reason": EVALUATING_REASON,
                           "message": "training done: " + message})
    stripped = {k: v for k, v in progress.items() if k != "updatedAt"}
    if stripped == {k: v for k, v in old_progress.items() if k != "updatedAt"} and not events \
            and new.get("message") == old.get("message") and new.get("tracking") == old.get("tracking"):
        return None, []
    progress["updatedAt"] = now
    new["progress"] = progress
    patch = merge_patch(old, new)
    return ({"status": patch} if patch else None), events


# ---------------------------------------------------------------------------------- jobs & pods


def job_state(job: dict[str, Any]) -> str:
    """``succeeded`` | ``failed`` | ``active`` from a batch/v1 Job's status."""
    st = job.get("status") or {}
    conds = st.get("conditions") or []
    if is_true(conds, "Complete") or is_true(conds, "SuccessCriteriaMet"):
        return "succeeded"
    if is_true(conds, "Failed") or is_true(conds, "FailureTarget"):
        return "failed"
    completions = (job.get("spec") or {}).get("completions") or 1
    if (st.get("succeeded") or 0) >= completions:
        return "succeeded"
    return "active"


def job_failure_condition(job: dict[str, Any]) -> dict[str, Any]:
    conds = (job.get("status") or {}).get("conditions") or []
    for t in ("Failed", "FailureTarget"):
        c = find_condition(conds, t)
        if c is not None and c.get("status") == "True":
            return c
    return {}


# What the Job controller writes to a Job that no reconcile reads: the start time, its bookkeeping of
# pods being finalized, and zero counts it spells out where an absent field means the same.
JOB_FIELDS_UNREAD = {
    "metadata": ("resourceVersion", "managedFields"),
    "status": ("startTime", "uncountedTerminatedPods", "terminating"),
}


def job_fingerprint(job: Optional[dict[str, Any]]) -> Optional[str]:
    """A digest of everything of a Job a reconcile may read: equal for two versions of a Job that
    differ only in what the Job controller writes and no reconcile reads (:data:`JOB_FIELDS_UNREAD`,
    e.g. the startTime it sets right after the Job is created). The Job event handler skips an
    event whose Job has the fingerprint the owner's last reconcile saw."""
    if not job:
        return None
    view: dict[str, Any] = {k: v for k, v in job.items() if k not in ("metadata", "status")}
    for part, unread in JOB_FIELDS_UNREAD.items():
        view[part] = {
            k: v for k, v in (job.get(part) or {}).items()
            if k not in unread and not (part == "status" and v == 0)
        }
    return hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()


def child_hash(obj: Optional[dict[str, Any]]) -> Optional[str]:
    if not obj:
        return None
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(b.SPEC_HASH_ANNOTATION)


def is_terminating(obj: Optional[dict[str, Any]]) -> bool:
    return bool(obj and (obj.get("metadata") or {}).get("deletionTimestamp"))


def pods_of(job: Optional[dict[str, Any]], pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods that belong to `job` (by job-name label; uid and spec hash when both known)."""
    if not job:
        return []
    jmeta = job.get("metadata") or {}
    name, uid, h = jmeta.get("name"), jmeta.get("uid"), child_hash(job)
    out = []
    for pod in pods or ():
        meta = pod.get("metadata") or {}
        lbl = meta.get("labels") or {}
        if name not in (lbl.get("batch.kubernetes.io/job-name"), lbl.get("job-name")):
            owners = [o.get("name") for o in meta.get("ownerReferences") or ()]
            if name not in owners:
                continue
        pod_uid = lbl.get("batch.kubernetes.io/controller-uid") or lbl.get("controller-uid")
        if uid and pod_uid and pod_uid != uid:
            continue
        pod_hash = (meta.get("annotations") or {}).get(b.SPEC_HASH_ANNOTATION)
        if h and pod_hash and pod_hash != h:
            continue
        out.append(pod)
    return out


@dataclass(frozen=True)
class Termination:
    pod: str
    exit_code: Optional[int]
    reason: str
    message: str
    finished_at: str
    index: Optional[str]
    evicted: bool


def pod_evicted(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    if st.get("reason") in ("Evicted", "Preempting"):
        return True
    return is_true(st.get("conditions") or [], "DisruptionTarget")


def terminations(pods: Iterable[dict[str, Any]], container: str) -> list[Termination]:
    """Terminated states of `container` in `pods`, oldest first."""
    out = []
    for pod in pods or ():
        meta = pod.get("metadata") or {}
        st = pod.get("status") or {}
        statuses = st.get("containerStatuses") or []
        chosen = [c for c in statuses if c.get("name") == container] or statuses[:1]
        evicted = pod_evicted(pod)
        found = False
        for cs in chosen:
            for key in ("state", "lastState"):
                term = (cs.get(key) or {}).get("terminated")
                if term:
                    out.append(
                        Termination(
                            pod=meta.get("name", ""),
                            exit_code=term.get("exitCode"),
                            reason=term.get("reason") or "",
                            message=term.get("message") or "",
                            finished_at=term.get("finishedAt") or "",
                            index=(meta.get("annotations") or {}).get(b.JOB_INDEX_ANNOTATION),
                            evicted=evicted,
                        )
                    )
                    found = True
                    break
        if not found and evicted:
            out.append(
                Termination(
                    pod=meta.get("name", ""), exit_code=None, reason=st.get("reason") or "Evicted",
                    message=st.get("message") or "", finished_at="", index=None, evicted=True,
                )
            )
    out.sort(key=lambda t: t.finished_at)
    return out


def success_message(pods: Iterable[dict[str, Any]], container: str) -> dict[str, Any]:
    """The termination message of the pod that succeeded (rank 0 / index 0 preferred)."""
    ok = [t for t in terminations(pods, container) if t.exit_code == 0]
    ok.sort(key=lambda t: (t.index not in (None, "0"), t.finished_at))
    parsed = [parse_termination_message(t.message) for t in ok]
    for p in parsed:
        if p.get("event") in ("done", "validated"):
            return p
    return parsed[0] if parsed else {}


def pod_running(pod: dict[str, Any]) -> bool:
    """A container of the pod has started (phase Running, or a container state running)."""
    st = pod.get("status") or {}
    if st.get("phase") == "Running":
        return True
    return any((cs.get("state") or {}).get("running") for cs in st.get("containerStatuses") or ())


def active_pods(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods neither finished nor being deleted."""
    return [
        p for p in pods or ()
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not is_terminating(p)
    ]


def pods_started(job: dict[str, Any], pods: Iterable[dict[str, Any]], *, was_started: bool) -> bool:
    """Whether an active Job's pods have started: one of them runs (or the Job counts a ready
    pod). With no active pod at all (none created yet, or between a failed pod and its
    replacement) it is what the status said before: `was_started`."""
    if int(((job.get("status") or {}).get("ready")) or 0) > 0:
        return True
    active = active_pods(pods)
    if any(pod_running(p) for p in active):
        return True
    return False if active else was_started


def pending_cause(pods: Iterable[dict[str, Any]], events: Iterable[dict[str, Any]] = ()) -> Optional[dict[str, str]]:
    """Why a Job's active pods do not start ({"reason", "message"}: Unschedulable with the
    scheduler's message, ImagePullFailed, ContainerConfigError, VolumeMountFailed from the pods'
    Warning `events`, ... see :mod:`tuneop.podcauses`); None while they are simply starting."""
    cause = podcauses.pod_cause(list(pods), events=list(events), limit=MAX_MESSAGE - 200)
    if cause is None:
        return None
    return {"reason": str(cause["reason"]), "message": str(cause["message"])}


def waiting_for_pods(status: Optional[dict[str, Any]]) -> bool:
    """Pending on a Job whose pods have not started: the operator looks again every retry
    interval (the pods' own changes do not reach it as events)."""
    st = status or {}
    if st.get("phase") != PENDING:
        return False
    return any(
        c.get("reason") in (VALIDATION_PENDING, TRAINING_PENDING, RESUMING)
        for c in st.get("conditions") or ()
        if c.get("type") in (VALIDATED, RUNNING_COND)
    )


def failure_of(
    job: dict[str, Any], pods: Iterable[dict[str, Any]], container: str
) -> tuple[str, str]:
    """(reason, message) of a failed Job, from the trainer's termination message if any."""
    cond = job_failure_condition(job)
    job_reason = cond.get("reason") or ""
    failed = [t for t in terminations(pods, container) if t.exit_code != 0]
    last = failed[-1] if failed else None
    parsed = parse_termination_message(last.message) if last else {}
    name = (job.get("metadata") or {}).get("name", "")
    if parsed.get("event") == "error":
        reason = _TRAINER_REASONS.get(str(parsed.get("reason")), TRAINING_FAILED)
        msg = str(parsed.get("message") or "")
        errors = parsed.get("errors")
        if not msg and isinstance(errors, list):
            msg = "; ".join(
                f"line {e.get('line')}: {e.get('message')}" if isinstance(e, dict) else str(e)
                for e in errors[:3]
            )
        msg = msg or str(parsed.get("reason") or "")
        return reason, shorten(msg)
    if job_reason == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return DEADLINE_EXCEEDED, f"Job {name} ran longer than activeDeadlineSeconds={deadline}"
    if last is not None and last.evicted:
        return POD_EVICTED, shorten(f"pod {last.pod} was evicted: {last.message or last.reason}")
    if last is not None and last.reason == "OOMKilled":
        return OOM_KILLED, f"pod {last.pod} ran out of memory (OOMKilled); raise resources.memory"
    text = parsed.get("text") or (cond.get("message") or "")
    if last is not None and last.exit_code == 2:
        return TRAINING_FAILED, shorten(text or f"pod {last.pod} exited with code 2 (user error)")
    if job_reason == "PodFailurePolicy":
        return TRAINING_FAILED, shorten(text or cond.get("message") or "user error")
    if last is not None and last.exit_code not in (None, 0):
        prefix = f"Job {name} failed after {((job.get('status') or {}).get('failed') or 0)} attempt(s)"
        return BACKOFF_LIMIT_EXCEEDED, shorten(f"{prefix}: {text}" if text else prefix)
    return BACKOFF_LIMIT_EXCEEDED, shorten(
        cond.get("message") or f"Job {name} failed ({job_reason or 'no reason given'})"
    )


# ---------------------------------------------------------------------------------- datasets


def _report_summary(report: dict[str, Any]) -> str:
    try:
        return DatasetReport.from_dict(report).summary()
    except Exception:  # noqa: BLE001  (dataset.py missing or an unexpected report shape)
        if report.get("ok"):
            return f"{report.get('rows', 0)} rows, ~{report.get('estimatedTokens', 0)} tokens"
        errs = report.get("errors") or []
        parts = [f"line {e.get('line')}: {e.get('message')}" for e in errs[:3]]
        return f"{report.get('source', '')} {'; '.join(parts) or 'invalid dataset'}".strip()


DATASET_STATUS_KEYS = ("format", "trainRows", "validationRows", "testRows", "estimatedTokens")


def dataset_reports(message: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-split dataset reports (``DatasetReport.to_dict()``) in a validation pod's termination
    message, when it carries them: ``{"datasets": {"train": report, ...}}``."""
    reports = message.get("datasets")
    if isinstance(reports, dict):
        return {k: v for k, v in reports.items() if k in SPLITS and isinstance(v, dict)}
    report = message.get("dataset")
    if isinstance(report, dict) and any(isinstance(report.get(k), dict) for k in SPLITS):
        return {k: v for k, v in report.items() if k in SPLITS and isinstance(v, dict)}
    return {}


def validator_dataset_status(message: dict[str, Any]) -> dict[str, Any]:
    """The trainer's ``--validate-only`` summary: ``{"event": "validated", "dataset": {"format",
    "trainRows", "validationRows", "testRows", "estimatedTokens"}}`` -> status.dataset."""
    ds = message.get("dataset")
    if not isinstance(ds, dict):
        return {}
    return {k: ds[k] for k in DATASET_STATUS_KEYS if ds.get(k) is not None}


def describe_dataset_status(ds: dict[str, Any]) -> str:
    parts = [
        f"{ds[key]} {label} rows"
        for key, label in (("trainRows", "train"), ("validationRows", "validation"), ("testRows", "test"))
        if ds.get(key)
    ]
    if ds.get("estimatedTokens"):
        parts.append(f"~{ds['estimatedTokens']} tokens")
    if ds.get("format"):
        parts.append(f"format {ds['format']}")
    return ", ".join(parts)


def dataset_status(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    train = reports.get("train") or {}
    if train.get("format"):
        out["format"] = train["format"]
    for split, key in (("train", "trainRows"), ("validation", "validationRows"), ("test", "testRows")):
        r = reports.get(split)
        if r is not None and r.get("rows") is not None:
            out[key] = int(r["rows"])
    tokens = train.get("estimatedTokens", train.get("estimated_tokens"))
    if tokens is not None:
        out["estimatedTokens"] = int(tokens)
    return out


def dataset_failures(reports: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{split}: {_report_summary(r)}"
        for split in SPLITS
        if (r := reports.get(split)) is not None and not r.get("ok", False)
    ]


def dataset_summary(reports: dict[str, dict[str, Any]]) -> str:
    return "; ".join(
        f"{split}: {_report_summary(r)}" for split in SPLITS if (r := reports.get(split)) is not None
    )


# ---------------------------------------------------------------------------------- observed/decision


@dataclass
class Observed:
    """What exists in the cluster for one FineTuneJob (None = absent)."""

    config_map: Optional[dict[str, Any]] = None
    validation_job: Optional[dict[str, Any]] = None
    validation_pods: list[dict[str, Any]] = field(default_factory=list)
    training_job: Optional[dict[str, Any]] = None
    training_pods: list[dict[str, Any]] = field(default_factory=list)
    service: Optional[dict[str, Any]] = None
    # Dependencies named in the spec that are not there, e.g. "PersistentVolumeClaim datasets".
    missing: list[str] = field(default_factory=list)
    # The operator's own checks of ConfigMap datasets: split -> DatasetReport.to_dict().
    inline_datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Warning Events of pods that have not started (read only while the job waits on them).
    pod_events: list[dict[str, Any]] = field(default_factory=list)
    # backend: together
    upload_job: Optional[dict[str, Any]] = None
    upload_pods: list[dict[str, Any]] = field(default_factory=list)
    download_job: Optional[dict[str, Any]] = None
    download_pods: list[dict[str, Any]] = field(default_factory=list)
    # The Together job as just retrieved (wire dict; None: not polled this time).
    together_job: Optional[dict[str, Any]] = None
    # Its events not mirrored yet, and the new cursor (see backends.together.new_events).
    together_events: list[dict[str, Any]] = field(default_factory=list)
    together_event_cursor: Optional[int] = None
    # The poll failed: {"reason", "message", "statusCode"} (TogetherBackendError fields).
    together_error: Optional[dict[str, Any]] = None
    # spec.startFrom.fineTuneJob as read (only while nothing is pinned for the spec; None: absent).
    start_from_job: Optional[dict[str, Any]] = None
    # Together's price estimate before the create (wire dict), or why the call failed (as together_error).
    together_estimate: Optional[dict[str, Any]] = None
    together_estimate_error: Optional[dict[str, Any]] = None
    # What another backend (a plug-in) observed, in its own terms.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decision:
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[dict[str, Any]] = field(default_factory=list)  # {apiVersion, kind, name, patch}
    delete: list[dict[str, Any]] = field(default_factory=list)  # {apiVersion, kind, name}
    status: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, str]] = field(default_factory=list)  # {type, reason, message}
    retry_after: Optional[float] = None
    # Calls outside Kubernetes that the backend's act() makes after the status is written; together:
    # {"op": "create", "params": {...}} | {"op": "cancel", "jobId": "ft-..", "stale": bool}
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def phase(self) -> Optional[str]:
        return self.status.get("phase")


def _ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "name": (obj.get("metadata") or {}).get("name"),
    }


def spec_of(body: dict[str, Any]) -> FineTuneJobSpec:
    return parse_spec(body.get("spec") or {})


def current_hash(body: dict[str, Any]) -> Optional[str]:
    try:
        return b.spec_hash(spec_of(body))
    except Exception:  # noqa: BLE001
        return None


def is_settled(body: dict[str, Any]) -> bool:
    """Finished (Succeeded/Failed) for the spec it has now: nothing left to do."""
    st = body.get("status") or {}
    if st.get("phase") not in TERMINAL:
        return False
    h = current_hash(body)
    return h is None or st.get("specHash") == h


def is_validated(body: dict[str, Any]) -> bool:
    """Datasets already validated for the current spec (no need to check ConfigMaps again)."""
    st = body.get("status") or {}
    h = current_hash(body)
    return h is not None and st.get("specHash") == h and is_true(st.get("conditions") or [], VALIDATED)


class StatusBuilder:
    """Accumulates the new status and actions of one reconcile."""

    def __init__(self, body: dict[str, Any], now: str):
        self.body = body
        self.now = now
        self.generation = (body.get("metadata") or {}).get("generation")
        self.old: dict[str, Any] = copy.deepcopy(body.get("status") or {})
        self.status: dict[str, Any] = copy.deepcopy(self.old)
        self.status.setdefault("conditions", [])
        self.decision = Decision()
        self.pod_events: list[dict[str, Any]] = []

    def cond(self, type_: str, status: bool | str, reason: str, message: str = "") -> None:
        self.status["conditions"] = set_condition(
            self.status["conditions"], type_, status, reason, message,
            now=self.now, generation=self.generation,
        )

    def drop(self, *types: str) -> None:
        for t in types:
            self.status["conditions"] = remove_condition(self.status["conditions"], t)

    def phase(self, phase: str, reason: str, message: str) -> None:
        self.status["phase"] = phase
        self.status["reason"] = reason
        self.status["message"] = shorten(message)

    def pending_pods(self, cond_type: str, step_reason: str, message: str, pods: list[dict[str, Any]]) -> Decision:
        """Phase Pending while a Job's pods have not started: the reason is the cause the pods give
        (:func:`pending_cause`) or else `step_reason`; condition `cond_type` keeps `step_reason`."""
        cause = pending_cause(active_pods(pods), self.pod_events)
        if cause is not None:
            message = f"{message}: {cause['message']}"
        status = "Unknown" if cond_type == VALIDATED else False
        self.cond(cond_type, status, step_reason, message)
        self.phase(PENDING, cause["reason"] if cause else step_reason, message)
        return self.finish()

    def fail(self, reason: str, message: str, *, invalid: bool = False) -> Decision:
        """Terminal failure; `invalid`: the spec or data is at fault (Validated=False)."""
        if invalid:
            self.cond(VALIDATED, False, reason, message)
        if find_condition(self.status["conditions"], RUNNING_COND) is not None:
            self.cond(RUNNING_COND, False, reason, message)
        self.drop(SUCCEEDED_COND)
        self.cond(FAILED_COND, True, reason, message)
        self.status.setdefault("completionTime", self.now)
        self.phase(FAILED, reason, message)
        return self.finish()

    def finish(self) -> Decision:
        st = self.status
        if self.generation is not None:
            st["observedGeneration"] = self.generation
        if not st.get("conditions"):
            st.pop("conditions", None)
        d = self.decision
        d.status = st
        d.events = transition_events(self.old, st)
        return d


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, str]]:
    """One Event per transition: the phase/reason changed, plus DatasetValid when the
    datasets were accepted on the way to another phase."""
    events: list[dict[str, str]] = []
    was_valid = is_true(old.get("conditions") or [], VALIDATED) and old.get("specHash") == new.get("specHash")
    now_valid = is_true(new.get("conditions") or [], VALIDATED)
    if now_valid and not was_valid and new.get("reason") != DATASET_VALID:
        c = find_condition(new["conditions"], VALIDATED) or {}
        events.append({"type": "Normal", "reason": DATASET_VALID, "message": c.get("message", "")})
    key_old = (old.get("phase"), old.get("reason"))
    key_new = (new.get("phase"), new.get("reason"))
    changed = key_old != key_new
    if not changed and new.get("reason") in (DEPENDENCY_MISSING, COST_LIMIT_EXCEEDED):
        changed = old.get("message") != new.get("message")
    if changed and new.get("phase"):
        reason = new.get("reason") or new["phase"]
        type_ = "Warning" if (reason in WARNING_REASONS or new["phase"] == FAILED) else "Normal"
        events.append({"type": type_, "reason": reason, "message": new.get("message") or ""})
    return events


def _reset_for_new_spec(bld: StatusBuilder, h: str) -> None:
    st = bld.status
    if st.get("specHash") == h:
        return
    for key in ("adapter", "evaluation", "progress", "dataset", "startTime", "completionTime", "jobName",
                "restarts", "startedFrom", "cost", "tracking"):
        st.pop(key, None)
    bld.drop(VALIDATED, RUNNING_COND, SUCCEEDED_COND, FAILED_COND, COST_LIMIT_COND)
    st["specHash"] = h


def resolve_start_from(
    bld: StatusBuilder, body: dict[str, Any], spec: FineTuneJobSpec, obs: Observed,
) -> tuple[Optional[Decision], dict[str, Any]]:
    """spec.startFrom, after a new spec has reset the status and before anything is created: a
    Decision when the job waits for the FineTuneJob it continues (phase Pending, reason
    WaitingForStartFrom, looked at again) or cannot start from it (SpecInvalid naming the field);
    else None and `body` with status.startedFrom pinned (the builders read the pin from it)."""
    name = str((body.get("metadata") or {}).get("name") or "")
    pinned = bld.status.get("startedFrom") if isinstance(bld.status.get("startedFrom"), dict) else None
    if not pinned and obs.config_map is not None and child_hash(obs.config_map) == b.spec_hash(spec):
        pinned = sf.pin_from_config(spec, obs.config_map)
    res = sf.resolve(spec, own_name=name, pinned=pinned or None, source=obs.start_from_job, now=bld.now)
    if res.invalid is not None:
        bld.status.pop("startedFrom", None)
        return bld.fail(SPEC_INVALID, res.invalid, invalid=True), body
    if res.waiting is not None:
        bld.status.pop("startedFrom", None)
        bld.cond(VALIDATED, "Unknown", sf.WAITING_FOR_START, res.waiting)
        bld.phase(PENDING, sf.WAITING_FOR_START, res.waiting)
        bld.decision.retry_after = DEPENDENCY_RETRY_SECONDS
        return bld.finish(), body
    if res.pinned is None:
        return None, body
    bld.status["startedFrom"] = res.pinned
    return None, {**body, "status": {**(body.get("status") or {}), "startedFrom": res.pinned}}


@dataclass
class Start:
    """A FineTuneJob past the checks every backend shares (:func:`begin`): its status builder,
    parsed spec, spec hash and what was observed. A backend's reducer takes it from here."""

    bld: "StatusBuilder"
    body: dict[str, Any]
    spec: FineTuneJobSpec
    h: str
    obs: Observed


def begin(body: dict[str, Any], observed: Observed | dict[str, Any], *, now: str) -> Start | Decision:
    """What every backend shares: an invalid spec fails (SpecInvalid, naming the field), a job
    already finished for this spec keeps its result; otherwise a :class:`Start`."""
    obs = observed if isinstance(observed, Observed) else Observed(**observed)
    bld = StatusBuilder(body, now)
    bld.pod_events = list(obs.pod_events or [])

    # --- the spec itself
    try:
        spec = spec_of(body)
    except Exception as e:  # pydantic.ValidationError
        msg = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in getattr(e, "errors", lambda: [])()
        ) or str(e)
        bld.status.pop("specHash", None)
        return bld.fail(SPEC_INVALID, f"invalid spec: {msg}", invalid=True)
    h = b.spec_hash(spec)

    # --- finished for this spec: keep the result, whatever happens to the children
    if bld.old.get("phase") in TERMINAL and bld.old.get("specHash") == h:
        return bld.finish()
    return Start(bld=bld, body=body, spec=spec, h=h, obs=obs)


def cost_refused(bld: StatusBuilder, spec: FineTuneJobSpec, estimate: dict[str, Any]) -> bool:
    """Record the estimate in status.cost; when ``spec.maxCostUSD`` refuses it (over the limit, or
    no USD estimate: deny by default): phase Pending, condition and reason CostLimitExceeded naming
    both figures, nothing created. Raising the limit (it is not in the spec hash) lets it start."""
    bld.status["cost"] = estimate
    why = cost.refusal(spec.max_cost_usd, estimate)
    if why is None:
        bld.drop(COST_LIMIT_COND)
        return False
    msg = f"{why}: nothing is started; raise spec.maxCostUSD or make the job smaller"
    bld.cond(COST_LIMIT_COND, True, COST_LIMIT_EXCEEDED, msg)
    bld.phase(PENDING, COST_LIMIT_EXCEEDED, msg)
    return True


def reconcile_kubernetes(
    start: Start, *, image: str, trainer_defaults: Optional[dict[str, Any]] = None,
    gpu_prices: Optional[dict[str, float]] = None,
) -> Decision:
    """backend: kubernetes: what exists (ConfigMap, validation Job, training Job, their pods) ->
    the children to create or delete and the status they imply.
    ``trainer_defaults``: the platform's defaults for training pods (workload_defaults), filled into
    the training Job's pods where the spec leaves them empty; the spec hash is unaffected."""
    bld, body, spec, h, obs = start.bld, start.body, start.spec, start.h, start.obs
    name = (body.get("metadata") or {}).get("name", "")

    # --- children of an older spec go first (names are fixed: wait until they are gone)
    stale_jobs = [
        j for j in (obs.validation_job, obs.training_job)
        if j is not None and child_hash(j) != h
    ]
    terminating = [
        j for j in (obs.validation_job, obs.training_job)
        if j is not None and child_hash(j) == h and is_terminating(j)
    ]
    if not stale_jobs and terminating and bld.old.get("reason") == GANG_RESTART and bld.old.get("specHash") == h:
        msg = f"restarting every rank: waiting for the failed Job {b.training_job_name(name)} to be deleted"
        bld.cond(RUNNING_COND, False, GANG_RESTART, msg)
        bld.phase(PENDING, GANG_RESTART, msg)
        bld.decision.retry_after = DELETION_RETRY_SECONDS
        return bld.finish()
    if stale_jobs or terminating:
        _reset_for_new_spec(bld, h)
        bld.decision.delete.extend(_ref(j) for j in stale_jobs if not is_terminating(j))
        bld.decision.retry_after = DELETION_RETRY_SECONDS
        bld.cond(VALIDATED, "Unknown", SPEC_CHANGED, "spec changed: replacing the previous Jobs")
        bld.phase(
            PENDING, SPEC_CHANGED,
            f"spec changed (generation {bld.generation}): replacing the Jobs of the previous spec",
        )
        return bld.finish()
    _reset_for_new_spec(bld, h)

    # --- what the operator can tell without running anything
    if spec.adapter.type == AdapterType.qlora and spec.resources.gpus == 0:
        return bld.fail(
            UNSUPPORTED_HARDWARE, "adapter.type qlora needs CUDA GPUs; set resources.gpus >= 1",
            invalid=True,
        )
    waiting, body = resolve_start_from(bld, body, spec, obs)
    if waiting is not None:
        return waiting

    training = obs.training_job
    validated = is_true(bld.status["conditions"], VALIDATED)

    # --- dependencies: only matter before the training Job exists
    if training is None and obs.missing:
        missing = ", ".join(obs.missing)
        msg = f"waiting for {missing} (namespace {(body.get('metadata') or {}).get('namespace', '')})"
        bld.cond(VALIDATED, False, DEPENDENCY_MISSING, msg)
        bld.phase(PENDING, DEPENDENCY_MISSING, msg)
        bld.decision.retry_after = DEPENDENCY_RETRY_SECONDS
        return bld.finish()

    def ensure_config() -> None:
        if obs.config_map is None:
            bld.decision.create.append(b.build_config_map(body, spec))
        elif child_hash(obs.config_map) != h:
            cm = b.build_config_map(body, spec)
            bld.decision.patch.append({**_ref(cm), "patch": {"metadata": {
                "labels": cm["metadata"]["labels"],
                "annotations": cm["metadata"]["annotations"],
            }, "data": cm["data"]}})

    # --- validation (never again once the training Job of this spec exists)
    reports: dict[str, dict[str, Any]] = dict(obs.inline_datasets or {})
    if not validated and training is not None:
        bld.cond(VALIDATED, True, DATASET_VALID, f"validated before Job {b.training_job_name(name)} was created")
        validated = True
    if not validated:
        bad = dataset_failures(reports)
        if bad:
            return bld.fail(DATASET_INVALID, "; ".join(bad), invalid=True)
        if b.needs_validation_job(spec):
            vjob = obs.validation_job
            if vjob is None:
                ensure_config()
                if spec.suspend:
                    bld.cond(RUNNING_COND, False, SUSPENDED_REASON, "suspended before validation")
                    bld.phase(SUSPENDED, SUSPENDED_REASON, "suspended: no pods run until spec.suspend is unset")
                    return bld.finish()
                bld.decision.create.append(b.build_validation_job(body, spec, image=image))
                vname = b.validation_job_name(name)
                return bld.pending_pods(VALIDATED, VALIDATION_PENDING, f"Job {vname} created; waiting for its pod to start", [])
            vstate = job_state(vjob)
            vpods = pods_of(vjob, obs.validation_pods)
            if vstate == "active":
                ensure_config()
                vname = b.validation_job_name(name)
                was = bld.old.get("phase") == VALIDATING and bld.old.get("specHash") == h
                if not pods_started(vjob, vpods, was_started=was):
                    return bld.pending_pods(VALIDATED, VALIDATION_PENDING, f"Job {vname}: waiting for its pod to start", vpods)
                bld.cond(VALIDATED, "Unknown", VALIDATING_REASON, f"checking the datasets with Job {vname}")
                bld.phase(VALIDATING, VALIDATING_REASON, f"checking the datasets with Job {vname}")
                return bld.finish()
            if vstate == "failed":
                reason, msg = failure_of(vjob, vpods, b.VALIDATOR_CONTAINER)
                if reason == TRAINING_FAILED:  # a user error found by the validator
                    reason = DATASET_INVALID
                return bld.fail(reason, f"validation: {msg}", invalid=reason in USER_ERRORS)
            message = success_message(vpods, b.VALIDATOR_CONTAINER)
            reports.update(dataset_reports(message))
            bad = dataset_failures(reports)
            if bad:
                return bld.fail(DATASET_INVALID, "; ".join(bad), invalid=True)
            validator_ds = validator_dataset_status(message)
        else:
            validator_ds = {}
        ds = {**dataset_status(reports), **validator_ds}
        summary = (describe_dataset_status(validator_ds) if validator_ds else dataset_summary(reports))
        bld.cond(VALIDATED, True, DATASET_VALID, summary or "datasets valid")
        if ds:
            bld.status["dataset"] = ds
        validated = True

    # --- training
    tname = b.training_job_name(name)
    # the estimate, before anything that costs GPU time exists; spec.maxCostUSD may stop here
    if training is None and cost_refused(
        bld, spec, cost.estimate_kubernetes(spec, bld.status.get("dataset") or {}, gpu_prices)
    ):
        return bld.finish()
    bld.status["jobName"] = tname
    if training is None:
        restarts = gang.restarts_of(bld.status) if spec.resources.nodes > 1 else 0
        if restarts:
            # the failed gang's pods hold the rendezvous port and the pod DNS names until they stop
            left = active_pods(obs.training_pods)
            if left:
                msg = (f"restarting every rank: waiting for {len(left)} pod(s) of the failed Job {tname} to stop "
                       f"({', '.join(sorted(str((p.get('metadata') or {}).get('name')) for p in left)[:3])})")
                bld.cond(RUNNING_COND, False, GANG_RESTART, msg)
                bld.phase(PENDING, GANG_RESTART, msg)
                bld.decision.retry_after = DELETION_RETRY_SECONDS
                return bld.finish()
        ensure_config()
        svc = b.build_headless_service(body, spec)
        if svc is not None and obs.service is None:
            bld.decision.create.append(svc)
        job = gang.mark(b.build_training_job(body, spec, image=image), restarts)
        if trainer_defaults:
            apply_to_pod(job["spec"]["template"]["spec"], trainer_defaults)
        bld.decision.create.append(job)
        if spec.suspend:
            bld.cond(RUNNING_COND, False, SUSPENDED_REASON, f"Job {tname} created suspended")
            bld.phase(SUSPENDED, SUSPENDED_REASON, f"Job {tname} created suspended; unset spec.suspend to start")
            return bld.finish()
        if restarts:
            return bld.pending_pods(
                RUNNING_COND, RESUMING, f"restart {restarts} of {spec.max_retries} of every rank: Job {tname} "
                "created again; it resumes from the newest checkpoint", [])
        return bld.pending_pods(RUNNING_COND, TRAINING_PENDING, f"Job {tname} created; waiting for its pod to start", [])

    tpods = pods_of(training, obs.training_pods)
    tstate = job_state(training)
    if tstate in ("succeeded", "failed"):
        actual = cost.actual_kubernetes(bld.status.get("cost"), training, spec, gpu_prices)
        if actual:
            bld.status["cost"] = actual
    if tstate == "succeeded":
        message = success_message(tpods, b.TRAINER_CONTAINER)
        adapter = adapter_status(b.adapter_location(spec), message)
        reused = bool(adapter.get("reused"))
        bld.status["adapter"] = adapter
        loaded = message.get("startedFrom")
        pin = bld.status.get("startedFrom")
        if isinstance(pin, dict) and not pin.get("sha256") and isinstance(loaded, dict) and loaded.get("sha256"):
            # startFrom.pvc without a sha256: the trainer says what it loaded
            bld.status["startedFrom"] = {**pin, "sha256": str(loaded["sha256"])[:64]}
        ev = message.get("evaluation")
        if isinstance(ev, dict):
            evaluation = {k: ev[k] for k in ("metric", "samples", "base", "adapter") if k in ev}
            if evaluation:
                bld.status["evaluation"] = evaluation
        tracked = tracking_status(message)
        if tracked:
            bld.status["tracking"] = tracked
        progress = dict(bld.status.get("progress") or {})
        if progress.get("totalSteps") is not None:
            progress["step"] = progress["totalSteps"]
        if progress.pop("evaluation", None) is not None:
            progress["etaSeconds"] = 0  # the evaluation is over with the Job
        if progress:
            bld.status["progress"] = progress
        msg = f"adapter at {adapter['location']}"
        if adapter.get("uri"):
            msg += f", uploaded to {adapter['uri']}"
        if adapter["sha256"]:
            msg += f" (sha256 {adapter['sha256'][:12]})"
        else:
            msg += " (the trainer reported no checksum)"
        reason = SUCCEEDED_REASON
        if reused:
            reason = ADAPTER_REUSED
            msg += ": already trained for this spec and data, kept without training again"
        bld.cond(RUNNING_COND, False, reason, f"Job {tname} completed")
        bld.drop(FAILED_COND)
        bld.cond(SUCCEEDED_COND, True, reason, msg)
        bld.status.setdefault("completionTime", bld.now)
        bld.phase(SUCCEEDED, reason, msg)
        return bld.finish()
    if tstate == "failed":
        reason, msg = failure_of(training, tpods, b.TRAINER_CONTAINER)
        nodes, attempt = spec.resources.nodes, gang.attempt_of(training)
        step = gang.decide(nodes=nodes, max_retries=spec.max_retries, retryable=reason in GANG_RETRYABLE,
                           attempt=attempt, restarts=gang.restarts_of(bld.status))
        if step == gang.FAIL:
            if nodes > 1 and attempt:
                msg = f"{msg} (after {attempt} restart(s) of every rank; spec.maxRetries {spec.max_retries})"
            return bld.fail(reason, msg)
        text = (f"a rank of Job {tname} failed ({reason}: {msg}); restarting all {nodes} nodes from the newest "
                f"checkpoint (restart {attempt + 1} of {spec.max_retries})")
        if step == gang.RECORD:
            bld.status["restarts"] = attempt + 1  # written before the Job is deleted (the next step)
        else:
            bld.decision.delete.append(_ref(training))
        bld.decision.retry_after = DELETION_RETRY_SECONDS
        bld.cond(RUNNING_COND, False, GANG_RESTART, text)
        bld.phase(PENDING, GANG_RESTART, text)
        return bld.finish()

    # --- active: mirror suspend
    job_suspended = bool((training.get("spec") or {}).get("suspend"))
    if job_suspended != bool(spec.suspend):
        bld.decision.patch.append({**_ref(training), "patch": {"spec": {"suspend": bool(spec.suspend)}}})
    if spec.suspend:
        msg = f"Job {tname} suspended: its pods are deleted; unset spec.suspend to resume from the newest checkpoint"
        bld.cond(RUNNING_COND, False, SUSPENDED_REASON, msg)
        bld.phase(SUSPENDED, SUSPENDED_REASON, msg)
        return bld.finish()
    same_spec = bld.old.get("specHash") == h
    old_phase = bld.old.get("phase") if same_spec else None
    running_reason = (find_condition(bld.old.get("conditions") or [], RUNNING_COND) or {}).get("reason")
    resuming = old_phase == SUSPENDED or (old_phase == PENDING and running_reason == RESUMING)
    if not pods_started(training, tpods, was_started=old_phase in (RUNNING, EVALUATING)):
        if resuming:
            return bld.pending_pods(RUNNING_COND, RESUMING, f"resuming Job {tname}: waiting for its pod to start", tpods)
        return bld.pending_pods(RUNNING_COND, TRAINING_PENDING, f"Job {tname}: waiting for its pod to start", tpods)
    bld.status.setdefault("startTime", bld.now)
    if old_phase == EVALUATING:
        bld.cond(RUNNING_COND, True, EVALUATING_REASON, f"Job {tname} is evaluating")
        bld.phase(EVALUATING, bld.old.get("reason") or EVALUATING_REASON, bld.old.get("message") or "evaluating on the test split")
    elif old_phase == RUNNING and bld.old.get("reason") in (TRAINING_STARTED, RESUMED):
        reason = bld.old["reason"]
        bld.cond(RUNNING_COND, True, reason, f"Job {tname} is running")
        bld.phase(RUNNING, reason, bld.old.get("message") or f"training with Job {tname}")
    elif resuming:
        bld.cond(RUNNING_COND, True, RESUMED, f"Job {tname} resumed")
        bld.phase(RUNNING, RESUMED, f"Job {tname} resumed from the newest checkpoint")
    else:
        bld.cond(RUNNING_COND, True, TRAINING_STARTED, f"Job {tname} is running")
        bld.phase(RUNNING, TRAINING_STARTED, f"training with Job {tname}")
    return bld.finish()


TRACKING_FIELDS = (
    ("mlflow", "runId", "mlflowRunId"), ("mlflow", "experimentId", "mlflowExperimentId"),
    ("mlflow", "url", "mlflowRunUrl"), ("wandb", "runId", "wandbRunId"), ("wandb", "url", "wandbRunUrl"),
    ("wandb", "mode", "wandbMode"),
)


def tracking_status(message: dict[str, Any]) -> dict[str, Any]:
    """status.tracking from the ``tracking`` of the trainer's ``done`` message (strings only, bounded)."""
    raw = message.get("tracking")
    out: dict[str, Any] = {}
    if not isinstance(raw, dict):
        return out
    for system, key, name in TRACKING_FIELDS:
        part = raw.get(system)
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, str) and value:
            out[name] = value[:1024]
    return out


def adapter_status(location: str, message: dict[str, Any]) -> dict[str, Any]:
    """status.adapter from the trainer's ``done`` termination message."""
    raw = message.get("adapter")
    msg: dict[str, Any] = raw if isinstance(raw, dict) else {}
    adapter: dict[str, Any] = {"location": location, "sha256": str(msg.get("sha256") or "")}
    if msg.get("manifestSha256"):
        adapter["manifestSha256"] = msg["manifestSha256"]
    if isinstance(msg.get("uri"), str) and msg["uri"].startswith("s3://"):
        adapter["uri"] = msg["uri"][:1024]
    if msg.get("sizeBytes") is not None:
        adapter["sizeBytes"] = msg["sizeBytes"]
    if isinstance(msg.get("baseModel"), str) and msg["baseModel"]:
        adapter["baseModel"] = msg["baseModel"][:512]
    info = msg.get("baseModelInfo")
    if isinstance(info, dict):
        kept = {k: info[k] for k in ("architecture", "modelType") if isinstance(info.get(k), str)}
        kept.update({
            k: info[k] for k in ("hiddenSize", "numLayers", "vocabSize")
            if isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
        })
        if kept:
            adapter["baseModelInfo"] = kept
    if message.get("reused") is True or msg.get("reused") is True:
        adapter["reused"] = True
    return adapter


def api_error(body: dict[str, Any], message: str, *, now: str) -> Decision:
    """The API refused or failed a request of the last reconcile (quota, RBAC, 5xx): the phase
    stays, reason ApiError says why; the operator retries every retry interval."""
    bld = StatusBuilder(body, now)
    bld.phase(bld.old.get("phase") or PENDING, API_ERROR, message)
    d = bld.finish()
    d.retry_after = DEPENDENCY_RETRY_SECONDS
    return d


# ---------------------------------------------------------------------------------- patches


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386) turning `old` into `new`; {} when equal."""
    out: dict[str, Any] = {}
    for key in old:
        if key not in new:
            out[key] = None
    for key, value in new.items():
        if key not in old:
            out[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = merge_patch(old[key], value)
            if sub:
                out[key] = sub
        elif value != old[key]:
            out[key] = value
    return out


def dependencies(spec: FineTuneJobSpec) -> list[tuple[str, str, Optional[str]]]:
    """Objects the pods need, as (kind, name, key-or-None): PVCs, dataset ConfigMaps, Secrets."""
    out: list[tuple[str, str, Optional[str]]] = [
        ("PersistentVolumeClaim", claim, None) for claim in b.pvc_claims(spec)
    ]
    for src in (spec.dataset.train, spec.dataset.validation, spec.dataset.test):
        if src is not None and src.config_map is not None:
            out.append(("ConfigMap", src.config_map.name, src.config_map.key))
    # the Secrets the pods' environment reads: the HF token, spec.tracking's and spec.storage's credentials
    out += [("Secret", name, key) for name, key in b.secret_key_refs(spec)]
    return list(dict.fromkeys(out))


def inline_sources(spec: FineTuneJobSpec) -> dict[str, tuple[str, str]]:
    """split -> (ConfigMap name, key) for datasets the operator checks itself."""
    out = {}
    for split in SPLITS:
        src = getattr(spec.dataset, split)
        if src is not None and src.config_map is not None:
            out[split] = (src.config_map.name, src.config_map.key)
    return out
