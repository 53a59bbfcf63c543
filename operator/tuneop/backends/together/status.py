"""The FineTuneJob reducer for backend: together. Pure: no I/O, no kopf.

:func:`tuneop.finetunejob.reconcile.reconcile` hands FineTuneJobs with ``backend: together`` to
:func:`reconcile_together`; the handler feeds it what exists (the ``<name>-upload`` and
``<name>-download`` Jobs and their pods, the Together job as just retrieved, its new events) and
applies the :class:`~tuneop.finetunejob.reconcile.Decision`: manifests, the new status, Events, and the Together
calls to make *after* the status is written (``decision.calls``). The outcome of those calls
goes through :func:`job_created`, :func:`call_failed` and :func:`stale_cancelled`.

Flow of one spec::

    Pending(DependencyMissing) -> Validating(Uploading: Job <name>-upload checks + uploads the data)
      -> Pending(CreatingTogetherJob: suffix recorded in status, then create_or_adopt)
      -> Pending/Running (mirrors Together: TogetherQueued, TogetherRunning, ...)
      -> Running(Downloading: Job <name>-download writes <output>/adapter)
      -> Succeeded | Failed ; Suspended (spec.suspend: the Together job is cancelled)

``status.together``: ``suffix`` (recorded before the create call, so a restarted operator adopts
the job instead of creating another), ``jobId`` (written right after), ``status`` (Together's),
``trainingFile``/``validationFile``/``datasetFormat`` (from the upload pod), ``eventCursor``
(Together events already mirrored as Kubernetes Events), ``modelOutputName``, ``tokenCount``,
``costUSD``, ``cancelRequested`` (cancelled because of ``spec.suspend``), ``staleJobIds`` (jobs of
an older spec still to cancel), ``retryAt`` (Together's ``Retry-After``, clamped by
:func:`~tuneop.backends.together.retry_delay`: no poll or create before then, see :func:`poll_due`).

Condition ``TogetherReplyUnderstood`` (only while it is False): Together's last reply had fields of
the wrong type (reason ``TogetherReplyMalformed``, the message names them; what the status had is
kept) or a status tuneop does not know (reason ``TogetherUnknownStatus``; polling goes on).

Reasons: user errors ``UnsupportedByBackend``, ``TogetherLimits``, ``TogetherRejected``,
``TogetherAuth``, ``DatasetInvalid``, ``SpecInvalid``, ``TogetherUserError`` (Together's
``user_error``); platform errors ``TogetherError`` (Together's ``error``), ``TogetherCancelled``
(cancelled outside tuneop), ``TogetherJobNotFound``, ``ArchiveInvalid``, ``BackoffLimitExceeded``,
``DeadlineExceeded``; waiting (not terminal, retried) ``TogetherUnavailable``,
``TogetherRateLimited``, ``TogetherAuth`` (while polling), ``DependencyMissing``,
``CreatingTogetherJob``, ``EstimatingCost``.

Cost (``status.cost``, ``tuneop/cost.py``): once the files are uploaded and before the create,
observe asks Together for its estimate (:func:`estimate_files` says when); the reducer records it
and, with ``spec.maxCostUSD``, refuses to create a job estimated over it or not estimated at all
(Pending, ``CostLimitExceeded``). While the job runs, a ``total_price`` past the limit cancels it
(``cost.cancelledOverLimit``; Failed, ``CostLimitExceeded`` once Together says cancelled).
``cost.actualUSD`` is ``total_price`` when the job ends.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Optional

from ... import cost as C
from ...api.finetunejob import FineTuneJobSpec
from ...finetunejob import builders as b
from ...finetunejob import reconcile as st
from . import builders as tb
from . import client as T

UPLOAD_ERRORS = {
    "DatasetInvalid": st.DATASET_INVALID,
    "TogetherFileInvalid": st.DATASET_INVALID,
    "ConfigInvalid": st.SPEC_INVALID,
    "TogetherAuth": st.TOGETHER_AUTH,
    "TogetherRejected": st.TOGETHER_REJECTED,
    "ArchiveInvalid": st.ARCHIVE_INVALID,
    "TogetherUnavailable": st.TOGETHER_UNAVAILABLE,
    "TogetherRateLimited": st.TOGETHER_RATE_LIMITED,
    "TogetherError": st.TOGETHER_ERROR,
    "TrainingError": st.TOGETHER_ERROR,
}
# Reasons derived from Together's own status: not worth an Event of their own (Together's job
# events, mirrored one by one, already say what happened).
MIRRORED_REASONS = {
    "TogetherPending", "TogetherQueued", "TogetherRunning", "TogetherCompressing",
    "TogetherUploading", "TogetherCancelRequested", "TogetherUnknownStatus",
    st.CREATING_TOGETHER_JOB, st.ESTIMATING_COST,
}
IGNORED_SETTINGS = "SettingsIgnored"
POLL_RETRY_SECONDS = 30.0
NOT_FOUND = 404
REPLY_COND = "TogetherReplyUnderstood"
REPLY_MALFORMED = "TogetherReplyMalformed"
UNKNOWN_STATUS = "TogetherUnknownStatus"


def together_dependencies(spec: FineTuneJobSpec) -> list[tuple[str, str, Optional[str]]]:
    """Objects the upload/download pods and the operator need: dataset PVCs and ConfigMaps (train
    and validation: the test split is not used), the output PVC and the API key Secret."""
    out: list[tuple[str, str, Optional[str]]] = []
    for src in (spec.dataset.train, spec.dataset.validation):
        if src is not None and src.pvc is not None:
            out.append(("PersistentVolumeClaim", src.pvc.claim_name, None))
    out.append(("PersistentVolumeClaim", spec.output.pvc.claim_name, None))
    for src in (spec.dataset.train, spec.dataset.validation):
        if src is not None and src.config_map is not None:
            out.append(("ConfigMap", src.config_map.name, src.config_map.key))
    if spec.together is not None:
        ref = spec.together.api_key_secret_ref
        out.append(("Secret", ref.name, ref.key))
    return list(dict.fromkeys(out))


def inline_sources(spec: FineTuneJobSpec) -> dict[str, tuple[str, str]]:
    """ConfigMap datasets the operator checks itself (train and validation)."""
    return {k: v for k, v in st.inline_sources(spec).items() if k != "test"}


def together_of(status: dict[str, Any]) -> dict[str, Any]:
    return dict((status or {}).get("together") or {})


def estimate_files(body: dict[str, Any], obs: st.Observed) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """(training file, validation file, dataset format) to ask Together's estimate for: the files
    are uploaded (in status, or in the upload pod's termination message of this very reconcile),
    no Together job exists yet and no estimate is recorded for the current spec. None: no call."""
    status = body.get("status") or {}
    h = st.current_hash(body)
    if h is None or st.is_settled(body):
        return None
    same_spec = status.get("specHash") == h
    tg = together_of(status) if same_spec else {}
    if tg.get("jobId") or (same_spec and status.get("cost")):
        return None
    if tg.get("trainingFile"):
        return str(tg["trainingFile"]), tg.get("validationFile"), tg.get("datasetFormat")
    ujob = obs.upload_job
    if ujob is None or st.child_hash(ujob) != h or st.job_state(ujob) != "succeeded":
        return None
    message = st.success_message(st.pods_of(ujob, obs.upload_pods), tb.UPLOAD_CONTAINER)
    if message.get("event") != "uploaded" or not message.get("trainingFile"):
        return None
    validation = message.get("validationFile")
    return str(message["trainingFile"]), (str(validation) if validation else None), message.get("format")


def _cost_before_create(
    bld: st.StatusBuilder, spec: FineTuneJobSpec, obs: st.Observed,
) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """(status.cost to record, or None; a wait {reason, message, retryAfter} instead, or None)."""
    recorded = bld.status.get("cost")
    if recorded:
        return recorded, None
    if obs.together_estimate is not None:
        return C.estimate_together(obs.together_estimate), None
    err = obs.together_estimate_error
    if err is None:  # not asked this time (e.g. Together's Retry-After): ask on the next reconcile
        if spec.max_cost_usd is None:
            return C.estimate_together(None, "not asked (Together had asked tuneop to wait)"), None
        return None, {"reason": st.ESTIMATING_COST, "message": "asking Together for its price estimate",
                      "retryAfter": None}
    text = str(err.get("message") or err.get("reason") or "failed")
    # Worth waiting for (a limit needs a figure): Together unreachable, rate limits, the key's Secret.
    waiting = err.get("reason") in st.RETRY_REASONS or err.get("reason") == st.TOGETHER_ERROR
    if spec.max_cost_usd is not None and waiting:
        return None, {"reason": err.get("reason") if err.get("reason") in st.RETRY_REASONS else st.TOGETHER_UNAVAILABLE,
                      "message": text, "retryAfter": err.get("retryAfter")}
    return C.estimate_together(None, text), None


def needs_poll(body: dict[str, Any]) -> bool:
    """A Together job of the current spec that is not finished (worth a retrieve)."""
    status = body.get("status") or {}
    tg = together_of(status)
    if not tg.get("jobId") or tg.get("status") in T.TERMINAL_STATES:
        return False
    if status.get("phase") in st.TERMINAL:
        return False
    h = st.current_hash(body)
    return h is not None and status.get("specHash") == h


def _time(text: Any) -> Optional[dt.datetime]:
    try:
        t = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _later(now: str, seconds: float) -> str:
    t = (_time(now) or dt.datetime.now(dt.timezone.utc)) + dt.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_seconds(status: dict[str, Any], now: str) -> float:
    """Seconds left before ``status.together.retryAt`` (Together's Retry-After); 0: go ahead."""
    at, t = _time(together_of(status).get("retryAt")), _time(now)
    if at is None or t is None:
        return 0.0
    return max(0.0, (at - t).total_seconds())


def poll_due(body: dict[str, Any], now: str) -> bool:
    """Not before the ``retryAt`` Together asked for (the monitor timer keeps ticking; polls before
    then are skipped)."""
    return wait_seconds(body.get("status") or {}, now) <= 0


def retry_after_fields(tg: dict[str, Any], retry_after: Optional[float], now: str) -> float:
    """The delay to the next attempt (:func:`~tuneop.backends.together.retry_delay`); when Together
    sent a Retry-After, ``tg["retryAt"]`` records it."""
    delay = T.retry_delay(retry_after, POLL_RETRY_SECONDS)
    if retry_after is not None:
        tg["retryAt"] = _later(now, delay)
    else:
        tg.pop("retryAt", None)
    return delay


def needs_finalizer(body: dict[str, Any]) -> bool:
    """Deleting this FineTuneJob must cancel something at Together first: an active job, a job
    of an older spec, or one being created (suffix recorded, id not yet)."""
    spec = body.get("spec") or {}
    if spec.get("backend") != "together":
        return False
    status = body.get("status") or {}
    tg = together_of(status)
    if tg.get("staleJobIds"):
        return True
    if tg.get("jobId"):
        return tg.get("status") not in T.TERMINAL_STATES
    return bool(tg.get("suffix")) and status.get("phase") not in st.TERMINAL


def jobs_to_cancel(body: dict[str, Any]) -> tuple[list[str], Optional[str]]:
    """On deletion: (job ids to cancel, suffix to look up when the id was never recorded)."""
    status = body.get("status") or {}
    tg = together_of(status)
    ids = list(tg.get("staleJobIds") or [])
    if tg.get("jobId"):
        if tg.get("status") not in T.TERMINAL_STATES:
            ids.append(tg["jobId"])
        return ids, None
    if tg.get("suffix") and status.get("phase") not in st.TERMINAL:
        return ids, tg["suffix"]
    return ids, None


# ---------------------------------------------------------------------------------- helpers


def _failure(job: dict[str, Any], pods: list[dict[str, Any]], container: str) -> tuple[str, str]:
    """(reason, message) of a failed upload/download Job: the pod's termination message first."""
    failed = [t for t in st.terminations(pods, container) if t.exit_code != 0]
    parsed = st.parse_termination_message(failed[-1].message) if failed else {}
    if parsed.get("event") == "error":
        raw = str(parsed.get("reason") or "")
        reason = UPLOAD_ERRORS.get(raw, raw if raw.startswith("Together") else st.TOGETHER_ERROR)
        return reason, st.shorten(str(parsed.get("message") or raw))
    return st.failure_of(job, pods, container)


def _mirror_events(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for ev in events:
        if not isinstance(ev, dict):
            continue
        kind, reason, message = T.event_to_k8s(ev)
        out.append({"type": kind, "reason": reason, "message": message})
    return out


def _progress(old: Optional[dict[str, Any]], new: Optional[dict[str, Any]], now: str) -> Optional[dict[str, Any]]:
    if not new:
        return old
    merged = {k: v for k, v in (old or {}).items() if k not in ("etaSeconds", "updatedAt")}
    merged.update(new)
    if merged == {k: v for k, v in (old or {}).items() if k != "updatedAt"}:
        return old
    merged["updatedAt"] = now
    return merged


def _finish(bld: st.StatusBuilder, extra_before: list[dict[str, str]] | None = None) -> st.Decision:
    d = bld.finish()
    transitions = [e for e in d.events if e["reason"] not in MIRRORED_REASONS]
    d.events = list(extra_before or []) + transitions
    return d


def _suffix(body: dict[str, Any], spec: FineTuneJobSpec, avoid: Optional[str] = None) -> str:
    meta = body.get("metadata") or {}
    prefix = spec.together.suffix if spec.together is not None else None
    gen: Any = meta.get("generation", 1)
    suffix = T.unique_suffix(meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""), gen, prefix)
    n = 1
    while avoid and suffix == avoid:
        n += 1
        suffix = T.unique_suffix(meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""),
                                 f"{gen}-{n}", prefix)
    return suffix


def _job_label(tg: dict[str, Any]) -> str:
    return f"Together job {tg.get('jobId')}"


def _reply_condition(bld: st.StatusBuilder, view: dict[str, Any], label: str) -> list[dict[str, str]]:
    """Condition REPLY_COND from a polled reply: False naming the malformed fields or the unknown
    status (and one Warning Event per new message), gone when the reply is understood."""
    notes = list(view.get("problems") or [])
    unknown = view.get("reason") == UNKNOWN_STATUS
    if unknown:
        notes.insert(0, str(view.get("message")))
    if not notes:
        bld.drop(REPLY_COND)
        return []
    reason = UNKNOWN_STATUS if unknown else REPLY_MALFORMED
    message = st.shorten(f"{label}: " + "; ".join(notes))
    old = st.find_condition(bld.old.get("conditions") or [], REPLY_COND)
    bld.cond(REPLY_COND, False, reason, message)
    if old is not None and old.get("message") == message and old.get("reason") == reason:
        return []
    return [{"type": "Warning", "reason": reason, "message": message}]


# ---------------------------------------------------------------------------------- reducer


def reconcile_together(
    bld: st.StatusBuilder,
    body: dict[str, Any],
    spec: FineTuneJobSpec,
    h: str,
    obs: st.Observed,
    *,
    image: str,
    base_url: Optional[str] = None,
) -> st.Decision:
    """The together flow; ``bld`` is status.py's builder (old and new status, conditions)."""
    meta = body.get("metadata") or {}
    name, ns = meta.get("name", ""), meta.get("namespace", "")
    d = bld.decision
    status = bld.status
    extra: list[dict[str, str]] = []
    old_tg = together_of(bld.old)
    new_spec = bld.old.get("specHash") != h

    # --- a new spec: the Together job of the old one is cancelled, its children replaced
    if new_spec:
        stale = list(old_tg.get("staleJobIds") or [])
        if (
            bld.old.get("specHash") is not None
            and old_tg.get("jobId")
            and old_tg.get("status") not in T.TERMINAL_STATES
            and old_tg["jobId"] not in stale
        ):
            stale.append(old_tg["jobId"])
        status.pop("together", None)
        if stale:
            status["together"] = {"staleJobIds": stale}
        notes = T.ignored(spec)
        if notes:
            extra.append({"type": "Normal", "reason": IGNORED_SETTINGS, "message": st.shorten("; ".join(notes))})
    tg = together_of(status)
    for jid in tg.get("staleJobIds") or []:
        d.calls.append({"op": "cancel", "jobId": jid, "stale": True})

    def set_tg() -> None:
        status["together"] = {k: v for k, v in tg.items() if v is not None and v != []}
        if not status["together"]:
            status.pop("together")

    stale_jobs = [j for j in (obs.upload_job, obs.download_job) if j is not None and st.child_hash(j) != h]
    terminating = [
        j for j in (obs.upload_job, obs.download_job)
        if j is not None and st.child_hash(j) == h and st.is_terminating(j)
    ]
    if stale_jobs or terminating:
        st._reset_for_new_spec(bld, h)
        d.delete.extend(st._ref(j) for j in stale_jobs if not st.is_terminating(j))
        d.retry_after = st.DELETION_RETRY_SECONDS
        bld.cond(st.VALIDATED, "Unknown", st.SPEC_CHANGED, "spec changed: replacing the previous Jobs")
        bld.phase(st.PENDING, st.SPEC_CHANGED,
                  f"spec changed (generation {bld.generation}): replacing the Jobs of the previous spec")
        return _finish(bld, extra)
    st._reset_for_new_spec(bld, h)

    # --- what Together cannot do
    problems = T.unsupported(spec)
    if problems:
        return _finish_fail(bld, extra, st.UNSUPPORTED_BY_BACKEND, "; ".join(problems), invalid=True)
    if not tg.get("jobId"):  # spec.startFrom: pinned before the Together job is created
        waiting, body = st.resolve_start_from(bld, body, spec, obs)
        if waiting is not None:
            waiting.events[:0] = extra
            return waiting

    job_id = tg.get("jobId")

    # --- dependencies: only matter before the Together job exists
    if not job_id and obs.missing:
        msg = f"waiting for {', '.join(obs.missing)} (namespace {ns})"
        bld.cond(st.VALIDATED, False, st.DEPENDENCY_MISSING, msg)
        bld.phase(st.PENDING, st.DEPENDENCY_MISSING, msg)
        d.retry_after = st.DEPENDENCY_RETRY_SECONDS
        return _finish(bld, extra)

    def ensure_config() -> None:
        if obs.config_map is None:
            d.create.append(b.build_config_map(body, spec))
        elif st.child_hash(obs.config_map) != h:
            cm = b.build_config_map(body, spec)
            d.patch.append({**st._ref(cm), "patch": {"metadata": {
                "labels": cm["metadata"]["labels"], "annotations": cm["metadata"]["annotations"],
            }, "data": cm["data"]}})

    # --- upload (tuneop's data checks, then Together's), once per spec
    if not tg.get("trainingFile"):
        bad = st.dataset_failures(dict(obs.inline_datasets or {}))
        if bad:
            return _finish_fail(bld, extra, st.DATASET_INVALID, "; ".join(bad), invalid=True)
        uname = tb.upload_job_name(name)
        ujob = obs.upload_job
        if ujob is None:
            ensure_config()
            if spec.suspend:
                bld.cond(st.RUNNING_COND, False, st.SUSPENDED_REASON, "suspended before the upload")
                bld.phase(st.SUSPENDED, st.SUSPENDED_REASON,
                          "suspended: nothing is uploaded or created at Together until spec.suspend is unset")
                return _finish(bld, extra)
            d.create.append(tb.build_upload_job(body, spec, image=image, base_url=base_url))
        ustate = st.job_state(ujob) if ujob is not None else "active"
        upods = st.pods_of(ujob, obs.upload_pods) if ujob is not None else []
        if ustate == "active":
            if ujob is not None:
                ensure_config()
            msg = f"checking and uploading the datasets with Job {uname}"
            bld.cond(st.VALIDATED, "Unknown", st.UPLOADING, msg)
            bld.phase(st.VALIDATING, st.UPLOADING, msg)
            return _finish(bld, extra)
        if ustate == "failed":
            assert ujob is not None  # no upload Job yet reads as "active"
            reason, msg = _failure(ujob, upods, tb.UPLOAD_CONTAINER)
            invalid = reason in (st.DATASET_INVALID, st.SPEC_INVALID, st.TOGETHER_REJECTED)
            return _finish_fail(bld, extra, reason, f"upload: {msg}", invalid=invalid)
        message = st.success_message(upods, tb.UPLOAD_CONTAINER)
        if message.get("event") != "uploaded" or not message.get("trainingFile"):
            return _finish_fail(bld, extra, st.TOGETHER_ERROR,
                                f"Job {uname} succeeded without reporting the uploaded file ids")
        tg.update(
            trainingFile=str(message["trainingFile"]),
            validationFile=(str(message["validationFile"]) if message.get("validationFile") else None),
            datasetFormat=message.get("format"),
        )
        set_tg()
        ds = st.validator_dataset_status(message)
        if ds:
            status["dataset"] = ds
        reports = dict(obs.inline_datasets or {})
        summary = st.describe_dataset_status(ds) if ds else st.dataset_summary(reports)
        bld.cond(st.VALIDATED, True, st.DATASET_VALID,
                 f"{summary or 'datasets valid'}; uploaded to Together as {tg['trainingFile']}")
    elif not st.is_true(status.get("conditions") or [], st.VALIDATED):
        bld.cond(st.VALIDATED, True, st.DATASET_VALID, f"uploaded to Together as {tg['trainingFile']}")

    # --- a job cancelled because of spec.suspend, now resumed: a new Together job
    if job_id and not spec.suspend and tg.get("cancelRequested") and (
        tg.get("status") in ("cancelled", "cancel_requested")
        or (obs.together_job or {}).get("status") in ("cancelled", "cancel_requested")
    ):
        old_suffix = tg.get("suffix")
        for key in ("jobId", "status", "eventCursor", "modelOutputName", "tokenCount", "costUSD",
                    "cancelRequested", "suffix"):
            tg.pop(key, None)
        tg["suffix"] = _suffix(body, spec, avoid=old_suffix)
        job_id = None
        status.pop("progress", None)
        set_tg()

    # --- create (or adopt) the Together job
    if not job_id:
        if spec.suspend:
            bld.cond(st.RUNNING_COND, False, st.SUSPENDED_REASON, "suspended before the Together job was created")
            bld.phase(st.SUSPENDED, st.SUSPENDED_REASON,
                      "suspended: no Together job is created until spec.suspend is unset")
            return _finish(bld, extra)
        # --- the estimate first; spec.maxCostUSD may refuse to create anything
        estimate, estimating = _cost_before_create(bld, spec, obs)
        if estimating is not None:
            wait = wait_seconds(status, bld.now)
            if estimating.get("retryAfter") is None and wait > 0:  # not asked: Together's Retry-After holds
                d.retry_after = wait
            else:
                d.retry_after = retry_after_fields(tg, estimating.get("retryAfter"), bld.now)
                set_tg()
            bld.phase(st.PENDING, estimating["reason"], f"estimating the price: {estimating['message']}")
            return _finish(bld, extra)
        assert estimate is not None
        if st.cost_refused(bld, spec, estimate):
            return _finish(bld, extra)
        if not tg.get("suffix"):
            tg["suffix"] = _suffix(body, spec)
            set_tg()
        wait = wait_seconds(status, bld.now)
        if wait > 0:  # Together asked for time (Retry-After): no create before retryAt
            d.retry_after = wait
            bld.phase(bld.old.get("phase") or st.PENDING, bld.old.get("reason") or st.TOGETHER_RATE_LIMITED,
                      bld.old.get("message") or f"waiting until {tg['retryAt']} (Together's Retry-After)")
            return _finish(bld, extra)
        tg.pop("retryAt", None)
        set_tg()
        params = T.create_params(
            spec,
            training_file=tg["trainingFile"],
            validation_file=tg.get("validationFile"),
            suffix=tg["suffix"],
            dataset_format=tg.get("datasetFormat"),
            from_checkpoint=(status.get("startedFrom") or {}).get("togetherCheckpoint"),
        )
        d.calls.append({"op": "create", "params": params})
        # The retry timer looks again should the call (or the operator) die before the id is known.
        d.retry_after = st.DEPENDENCY_RETRY_SECONDS
        bld.phase(st.PENDING, st.CREATING_TOGETHER_JOB,
                  f"creating the Together fine-tuning job (suffix {tg['suffix']})")
        return _finish(bld, extra)

    # --- monitor
    mirrored: list[dict[str, str]] = []
    err = obs.together_error
    if err:
        if err.get("statusCode") == NOT_FOUND:
            return _finish_fail(bld, extra, st.TOGETHER_JOB_NOT_FOUND,
                                f"{_job_label(tg)}: {err.get('message') or 'not found'}")
        reason = err.get("reason") or st.TOGETHER_UNAVAILABLE
        if reason not in st.RETRY_REASONS:
            reason = st.TOGETHER_UNAVAILABLE
        d.retry_after = retry_after_fields(tg, err.get("retryAfter"), bld.now)
        set_tg()
        text = str(err.get("message") or reason)
        if tg.get("retryAt"):
            text += f" (Together asked to wait {d.retry_after:g} s: next poll at {tg['retryAt']})"
        bld.phase(bld.old.get("phase") or st.PENDING, reason, text)
        return _finish(bld, extra)
    ft = obs.together_job
    view: Optional[dict[str, Any]] = None
    if ft is not None:
        view = T.status_view(ft)
        if view["togetherStatus"] is not None:
            tg["status"] = view["togetherStatus"]
        for key in ("modelOutputName", "tokenCount", "costUSD"):
            if view.get(key) is not None:
                tg[key] = view[key]
        if obs.together_event_cursor is not None:
            tg["eventCursor"] = obs.together_event_cursor
        tg.pop("retryAt", None)
        mirrored = _mirror_events(obs.together_events)
        progress = _progress(status.get("progress"), view.get("progress"), bld.now)
        if progress:
            status["progress"] = progress
        set_tg()
        extra = extra + _reply_condition(bld, view, _job_label(tg))
    else:
        wait = wait_seconds(status, bld.now)
        if wait > 0:
            d.retry_after = wait
    tstatus = tg.get("status") or "pending"
    extra = extra + mirrored

    # --- cost: the actual price at the end; cancel a job whose price passed spec.maxCostUSD
    job_cost = dict(status.get("cost") or {})
    if tstatus in T.TERMINAL_STATES and tg.get("costUSD") is not None:
        job_cost["actualUSD"] = tg["costUSD"]
    over = C.over_limit_while_running(spec.max_cost_usd, tg.get("costUSD"))
    if job_cost.get("cancelledOverLimit") or (over and tstatus not in T.TERMINAL_STATES):
        job_cost["cancelledOverLimit"] = True
        status["cost"] = job_cost
        msg = f"{over or 'its cost passed spec.maxCostUSD'}: {_job_label(tg)}"
        if tstatus == "cancelled":
            bld.cond(st.COST_LIMIT_COND, True, st.COST_LIMIT_EXCEEDED, f"{msg} cancelled")
            return _finish_fail(bld, extra, st.COST_LIMIT_EXCEEDED, f"{msg} cancelled")
        if tstatus not in T.TERMINAL_STATES:
            if tstatus != "cancel_requested":
                d.calls.append({"op": "cancel", "jobId": job_id, "stale": False})
            bld.cond(st.COST_LIMIT_COND, True, st.COST_LIMIT_EXCEEDED, f"{msg} being cancelled")
            bld.cond(st.RUNNING_COND, False, st.COST_LIMIT_EXCEEDED, f"{msg} being cancelled")
            bld.phase(st.RUNNING if bld.old.get("phase") == st.RUNNING else st.PENDING,
                      st.COST_LIMIT_EXCEEDED, f"{msg} being cancelled")
            d.retry_after = POLL_RETRY_SECONDS
            return _finish(bld, extra)
    if job_cost:
        status["cost"] = job_cost

    # --- suspend: cancel at Together (a cancelled job cannot be resumed: a new one is created)
    if spec.suspend and tstatus not in ("completed", "error", "user_error"):
        if tstatus not in ("cancelled", "cancel_requested"):
            d.calls.append({"op": "cancel", "jobId": job_id, "stale": False})
        if tstatus != "cancelled" or tg.get("cancelRequested"):
            tg["cancelRequested"] = True
            set_tg()
            done = tstatus == "cancelled"
            msg = (f"{_job_label(tg)} {'cancelled' if done else 'being cancelled'}; "
                   "unset spec.suspend to start a new Together job")
            bld.cond(st.RUNNING_COND, False, st.SUSPENDED_REASON, msg)
            bld.phase(st.SUSPENDED, st.SUSPENDED_REASON, msg)
            if not done:
                d.retry_after = POLL_RETRY_SECONDS
            return _finish(bld, extra)

    if tstatus == "error":
        msg = (view or {}).get("message") or f"{_job_label(tg)} failed"
        return _finish_fail(bld, extra, st.TOGETHER_ERROR, f"{_job_label(tg)}: {msg}")
    if tstatus == "user_error":
        msg = (view or {}).get("message") or f"{_job_label(tg)} was rejected"
        return _finish_fail(bld, extra, st.TOGETHER_USER_ERROR, f"{_job_label(tg)}: {msg}")
    if tstatus == "cancelled":
        said = (view or {}).get("togetherMessage")
        return _finish_fail(bld, extra, st.TOGETHER_CANCELLED,
                            f"{_job_label(tg)} was cancelled outside tuneop" + (f": {said}" if said else ""))
    if tstatus == "completed":
        return _download(bld, body, spec, obs, tg, extra, image=image, base_url=base_url,
                         ensure_config=ensure_config)

    # --- still training at Together
    if view is not None and view["reason"] == UNKNOWN_STATUS:
        # Nothing known about this status: the phase stays (polling goes on), the reason says why.
        phase = bld.old["phase"] if bld.old.get("phase") in (st.PENDING, st.RUNNING) else st.PENDING
        bld.phase(phase, UNKNOWN_STATUS, f"{_job_label(tg)}: {view['message']}")
        return _finish(bld, extra)
    if view is not None and view["phase"] is not None:
        phase, reason = view["phase"], view["reason"]
        msg = f"{_job_label(tg)}: {view['message']}"
    elif bld.old.get("phase") in (st.PENDING, st.RUNNING) and bld.old.get("reason") not in (
        st.CREATING_TOGETHER_JOB, None
    ):
        phase, reason, msg = bld.old["phase"], bld.old["reason"], bld.old.get("message") or ""
    else:
        phase, reason, msg = st.PENDING, st.TOGETHER_JOB_CREATED, f"{_job_label(tg)} created"
    if phase == st.RUNNING:
        status.setdefault("startTime", bld.now)
        bld.cond(st.RUNNING_COND, True, reason, msg)
    bld.phase(phase, reason, msg)
    return _finish(bld, extra)


def _download(
    bld: st.StatusBuilder, body: dict[str, Any], spec: FineTuneJobSpec, obs: st.Observed, tg: dict[str, Any],
    extra: list[dict[str, str]], *, image: str, base_url: Optional[str], ensure_config: Callable[[], None],
) -> st.Decision:
    d = bld.decision
    status = bld.status
    name = (body.get("metadata") or {}).get("name", "")
    dname = tb.download_job_name(name)
    djob = obs.download_job
    if djob is None:
        ensure_config()
        d.create.append(tb.build_download_job(
            body, spec, job_id=tg["jobId"], image=image, base_url=base_url, suspend=spec.suspend,
        ))
        dstate = "active"
    else:
        dstate = st.job_state(djob)
        if dstate == "active" and bool((djob.get("spec") or {}).get("suspend")) != bool(spec.suspend):
            d.patch.append({**st._ref(djob), "patch": {"spec": {"suspend": bool(spec.suspend)}}})
    if dstate == "active":
        status.setdefault("startTime", bld.now)
        if spec.suspend:
            msg = f"{_job_label(tg)} completed; Job {dname} suspended: unset spec.suspend to download the adapter"
            bld.cond(st.RUNNING_COND, False, st.SUSPENDED_REASON, msg)
            bld.phase(st.SUSPENDED, st.SUSPENDED_REASON, msg)
        else:
            msg = f"{_job_label(tg)} completed; downloading the adapter with Job {dname}"
            bld.cond(st.RUNNING_COND, True, st.DOWNLOADING, msg)
            bld.phase(st.RUNNING, st.DOWNLOADING, msg)
        return _finish(bld, extra)
    assert djob is not None  # no download Job yet reads as "active", handled above
    dpods = st.pods_of(djob, obs.download_pods)
    if dstate == "failed":
        reason, msg = _failure(djob, dpods, tb.DOWNLOAD_CONTAINER)
        if reason == st.TRAINING_FAILED:
            reason = st.ARCHIVE_INVALID
        return _finish_fail(bld, extra, reason, f"download: {msg}")
    message = st.success_message(dpods, tb.DOWNLOAD_CONTAINER)
    raw_adapter = message.get("adapter")
    adapter_msg: dict[str, Any] = raw_adapter if isinstance(raw_adapter, dict) else {}
    adapter: dict[str, Any] = {"location": b.adapter_location(spec), "sha256": str(adapter_msg.get("sha256") or "")}
    if adapter_msg.get("manifestSha256"):
        adapter["manifestSha256"] = adapter_msg["manifestSha256"]
    if adapter_msg.get("sizeBytes") is not None:
        adapter["sizeBytes"] = adapter_msg["sizeBytes"]
    status["adapter"] = adapter
    raw_together = message.get("together")
    together_msg: dict[str, Any] = raw_together if isinstance(raw_together, dict) else {}
    if together_msg.get("modelOutputName"):
        tg["modelOutputName"] = together_msg["modelOutputName"]
        status["together"] = {k: v for k, v in tg.items() if v is not None and v != []}
    progress = dict(status.get("progress") or {})
    if progress.get("totalSteps") is not None:
        progress["step"] = progress["totalSteps"]
        progress.pop("etaSeconds", None)
        status["progress"] = progress
    msg = f"adapter at {adapter['location']}"
    msg += f" (sha256 {adapter['sha256'][:12]})" if adapter["sha256"] else " (no checksum reported)"
    if tg.get("modelOutputName"):
        msg += f"; hosted at Together as {tg['modelOutputName']}"
    bld.cond(st.RUNNING_COND, False, st.SUCCEEDED_REASON, f"Job {dname} completed")
    bld.drop(st.FAILED_COND)
    bld.cond(st.SUCCEEDED_COND, True, st.SUCCEEDED_REASON, msg)
    status.setdefault("completionTime", bld.now)
    bld.phase(st.SUCCEEDED, st.SUCCEEDED_REASON, msg)
    return _finish(bld, extra)


def _finish_fail(bld: st.StatusBuilder, extra: list[dict[str, str]], reason: str, message: str, *,
                 invalid: bool = False) -> st.Decision:
    d = bld.fail(reason, message, invalid=invalid)
    transitions = [e for e in d.events if e["reason"] not in MIRRORED_REASONS]
    d.events = list(extra) + transitions
    return d


# ---------------------------------------------------------------------------------- call results


def job_created(body: dict[str, Any], job: dict[str, Any], adopted: bool, *, now: str) -> st.Decision:
    """``create_or_adopt`` returned ``job``: record its id at once (and say so in an Event)."""
    bld = st.StatusBuilder(body, now)
    tg = together_of(bld.status)
    tg.pop("retryAt", None)
    tg["jobId"] = job.get("id")
    status = job.get("status")
    tg["status"] = str(getattr(status, "value", status) or "pending")
    if job.get("model_output_name") or job.get("output_name"):
        tg["modelOutputName"] = job.get("model_output_name") or job.get("output_name")
    bld.status["together"] = {k: v for k, v in tg.items() if v is not None}
    verb = "adopted" if adopted else "created"
    msg = f"Together job {tg['jobId']} {verb} (suffix {tg.get('suffix')})"
    bld.phase(st.PENDING, st.TOGETHER_JOB_CREATED, msg)
    d = bld.finish()
    d.events = [{"type": "Normal", "reason": "TogetherJobAdopted" if adopted else st.TOGETHER_JOB_CREATED,
                 "message": msg}]
    return d


def call_failed(
    body: dict[str, Any], op: str, reason: str, message: str, *, user_error: bool, now: str,
    retry_after: Optional[float] = None,
) -> st.Decision:
    """A Together call of ``decision.calls`` failed. A rejected create (limits, 4xx) is a
    terminal user error; anything else (429, 5xx, network, an unreadable reply, a failed cancel)
    keeps the phase, says why, and is retried: after ``retry_after`` (Together's Retry-After,
    clamped by :func:`~tuneop.backends.together.retry_delay`, recorded as ``retryAt``) when given."""
    bld = st.StatusBuilder(body, now)
    if op == "create" and user_error:
        invalid = reason in (st.TOGETHER_LIMITS, st.TOGETHER_REJECTED)
        return _finish_fail(bld, [], reason, f"create Together job: {message}", invalid=invalid)
    if reason not in st.RETRY_REASONS:
        reason = st.TOGETHER_UNAVAILABLE
    tg = together_of(bld.status)
    delay = retry_after_fields(tg, retry_after, now)
    if tg:
        bld.status["together"] = tg
    if tg.get("retryAt"):
        message += f" (Together asked to wait {delay:g} s: next attempt at {tg['retryAt']})"
    bld.phase(bld.old.get("phase") or st.PENDING, reason, message)
    d = bld.finish()
    d.retry_after = delay
    return d


def stale_cancelled(body: dict[str, Any], job_id: str, *, now: str) -> st.Decision:
    """A job of an older spec was cancelled: forget it."""
    bld = st.StatusBuilder(body, now)
    tg = together_of(bld.status)
    tg["staleJobIds"] = [j for j in tg.get("staleJobIds") or [] if j != job_id]
    bld.status["together"] = {k: v for k, v in tg.items() if v is not None and v != []}
    if not bld.status["together"]:
        bld.status.pop("together")
    d = bld.finish()
    d.events = [{"type": "Normal", "reason": "TogetherJobCancelled",
                 "message": f"Together job {job_id} of an older spec cancelled"}]
    return d
