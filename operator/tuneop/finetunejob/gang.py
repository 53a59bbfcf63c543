"""Multi-node training: a failed rank restarts the whole gang. Pure: no I/O.

torchrun's static rendezvous (``finetunejob/builders.py``: an Indexed Job, one pod per node) cannot
take a single replaced rank back: the other ranks wait in their collectives for a peer that never
rejoins. So the training Job of ``resources.nodes > 1`` has ``backoffLimit: 0``: the first rank
that fails fails the Job as a whole (the Job controller stops the other ranks), and the operator

1. records the restart: ``status.restarts`` = the failed Job's attempt + 1 (phase Pending, reason
   ``GangRestart``, one Warning Event), before it touches the Job;
2. deletes the failed Job (the next reconcile: the status already says which attempt is next);
3. once the Job is gone and no pod of the old gang still runs (they hold the rendezvous port and the
   pod DNS names), creates the Job again for the same spec with the attempt in its annotation
   ``tuneop.dev/gang-attempt``; the trainer resumes from the newest checkpoint on the output volume.

Each step is decided from the failed Job's annotation and ``status.restarts`` alone, so a replay of
any of them (a second operator, a crash between two steps, the same event twice) does the same step
again or the next one: never a second Job, never one restart counted twice. At most
``spec.maxRetries`` restarts; then the FineTuneJob fails with the last rank's failure. User errors
(exit code 2: bad data, config, hardware) and ``activeDeadlineSeconds`` are not retried.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

ATTEMPT_ANNOTATION = "tuneop.dev/gang-attempt"
GANG_RESTART = "GangRestart"
FAIL, RECORD, DELETE = "fail", "record", "delete"


def attempt_of(job: Optional[Mapping[str, Any]]) -> int:
    """Which restart of the gang ``job`` is (0: the first Job of its spec)."""
    raw = (((job or {}).get("metadata") or {}).get("annotations") or {}).get(ATTEMPT_ANNOTATION)
    try:
        return max(0, int(raw)) if raw is not None else 0
    except (TypeError, ValueError):
        return 0


def restarts_of(status: Optional[Mapping[str, Any]]) -> int:
    raw = (status or {}).get("restarts")
    return raw if isinstance(raw, int) and raw > 0 else 0


def decide(*, nodes: int, max_retries: int, retryable: bool, attempt: int, restarts: int) -> str:
    """What to do about a failed training Job: ``fail`` (one node, a failure a restart does not
    cure, or ``maxRetries`` restarts spent), ``record`` (write ``status.restarts = attempt + 1``
    first) or ``delete`` (recorded: delete the Job; it is created again once gone)."""
    if nodes <= 1 or not retryable or attempt >= max_retries:
        return FAIL
    return RECORD if restarts <= attempt else DELETE


def mark(job: dict[str, Any], attempt: int) -> dict[str, Any]:
    """``job`` (a built training Job) annotated as restart ``attempt`` of its gang (0: unchanged)."""
    if attempt > 0:
        job["metadata"].setdefault("annotations", {})[ATTEMPT_ANNOTATION] = str(attempt)
    return job


def pods_named(job_name: str, pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pods of any Job called ``job_name`` (the old gang's, once its Job is gone)."""
    out = []
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if job_name in (labels.get("batch.kubernetes.io/job-name"), labels.get("job-name")):
            out.append(dict(pod))
    return out
