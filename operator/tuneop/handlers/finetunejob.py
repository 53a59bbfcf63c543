"""kopf handlers of the FineTuneJob (backend: kubernetes). Thin glue around st.reconcile.

Every trigger ends in :func:`reconcile_object`: under a per-object lock it reads the
FineTuneJob fresh from the API, observes its children and dependencies (independent reads at
once), lets the pure reducer decide, applies the decision (deletes, creates with 409 = exists,
patches, status), then posts one Event per transition. Running it twice in a row does nothing the second time.

Triggers:
- FineTuneJob created / spec changed / operator (re)started -> reconcile. Waiting is not an
  error: while the status says DependencyMissing, SpecChanged or ApiError (a refused request:
  quota, RBAC, 5xx), the `retry` timer reconciles every ``retry_interval`` seconds (no crash
  loop, one Event per distinct reason). Only an unreachable API server fails the handler
  (kopf.TemporaryError, kopf retries it).
- any event of a batch/v1 Job labelled managed-by tuneop -> reconcile its owner at once, unless
  the owner's last reconcile already saw exactly that version of the Job (`SeenJobs`: the ADDED
  event of the Job a reconcile has just created would redo the same reconcile).
- a timer, every ``progress_interval`` seconds while phase is Running: the newest
  ``{"event": "progress"}`` line of the training pod's log -> status.progress + metrics.
- FineTuneJob watch events -> the phase gauge; deletion -> its metric series are dropped.

Handlers are registered explicitly with :func:`register` (tests use a fresh registry each).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Optional

import kopf

from .. import kube
from .. import status as st
from ..builders import finetunejob as b
from ..metrics import METRICS
from . import together
from .common import ObjectLocks, get_live, now_iso

GROUP, VERSION, PLURAL = "tuneop.dev", "v1alpha1", "finetunejobs"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PREFIX = "tuneop.dev"


@dataclasses.dataclass
class OperatorConfig:
    image: str = b.DEFAULT_IMAGE
    # The platform's defaults for created pods (workload_defaults.parse); "trainer" applies here.
    workload_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress_interval: float = 15.0
    retry_interval: float = 30.0
    log_tail_lines: int = 200
    request_timeout: float = 60.0
    # backend: together
    together_poll_interval: float = 30.0
    together_base_url: Optional[str] = None  # None: $TOGETHER_BASE_URL, else the SDK's default
    together_max_retries: int = 2
    together_timeout: float = 30.0
    together_delete_retries: int = 5


CONFIG = OperatorConfig()


# ---------------------------------------------------------------------------------- settings


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """Our kopf settings: tuneop.dev prefixes, Events only for errors from logs (transitions
    are posted explicitly), bounded watches and requests."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.ERROR
    settings.posting.reporting_component = "tuneop"
    settings.posting.event_name_prefix = "tuneop-"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = CONFIG.request_timeout
    settings.networking.connect_timeout = 30


async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_settings(settings)


async def cleanup(**_: Any) -> None:
    await kube.close()


async def login(settings: kopf.OperatorSettings, logger: logging.Logger, **kwargs: Any) -> Any:
    """kopf's own login functions; the result is also kept for kube.py."""
    info = None
    if os.environ.get("KUBECONFIG"):
        info = kopf.login_with_kubeconfig(settings=settings, logger=logger, **kwargs)
    elif os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        info = kopf.login_with_service_account(settings=settings, logger=logger, **kwargs)
    elif os.path.exists(os.path.expanduser("~/.kube/config")):
        info = kopf.login_with_kubeconfig(settings=settings, logger=logger, **kwargs)
    if info is None:
        info = kopf.login_via_client(settings=settings, logger=logger, **kwargs)
    if info is not None:
        kube.set_connection(info, timeout=settings.networking.request_timeout or CONFIG.request_timeout)
    return info


# ---------------------------------------------------------------------------------- observe/apply

_locks = ObjectLocks()
_lock = _locks.get


# ConfigMap datasets up to this size are checked in the event loop (a thread hop costs more than
# checking a few hundred rows); larger ones (up to the 1 MiB a ConfigMap holds) in a thread.
INLINE_CHECK_MAX_CHARS = 64 * 1024


async def check_inline_dataset(text: str, declared: str, source: str) -> dict[str, Any]:
    from ..dataset import check_lines

    def check() -> dict[str, Any]:
        return check_lines(text, declared=declared, max_errors=10, source=source).to_dict()

    if len(text) <= INLINE_CHECK_MAX_CHARS:
        return check()
    return await asyncio.get_running_loop().run_in_executor(None, check)


async def gather(*aws: Any) -> list[Any]:
    """asyncio.gather that waits for every read and then raises the first error (no read is
    left running unobserved)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


def read_children(kc: kube.KubeClient, ns: str, name: str) -> Any:
    """The ConfigMap, validation Job and training Job of a FineTuneJob (backend: kubernetes)."""
    return gather(
        kc.get("v1", "ConfigMap", b.config_map_name(name), ns),
        kc.get("batch/v1", "Job", b.validation_job_name(name), ns),
        kc.get("batch/v1", "Job", b.training_job_name(name), ns),
    )


async def observe(
    kc: kube.KubeClient, body: dict[str, Any], children: Optional[list[Any]] = None
) -> st.Observed:
    """What exists for `body`. `children`: what :func:`read_children` returned, when it was read
    together with the FineTuneJob itself."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if (body.get("spec") or {}).get("backend") == "together":
        try:
            spec = st.spec_of(body)
        except Exception:  # noqa: BLE001  (the reducer reports SpecInvalid)
            return st.Observed()
        return await together.observe(kc, body, spec)
    try:
        spec: Optional[Any] = st.spec_of(body)
    except Exception:  # noqa: BLE001  (the reducer reports SpecInvalid)
        spec = None
    # Every independent read at once: the children first (they decide what else matters), then
    # the pods of existing Jobs and the dependencies (only needed before the training Job).
    obs = st.Observed()
    if children is None:
        children = await read_children(kc, ns, name)
    obs.config_map, obs.validation_job, obs.training_job = children
    deps = [] if (
        spec is None or obs.training_job is not None or st.is_settled(body)
    ) else st.dependencies(spec)
    reads: list[Any] = []
    if obs.validation_job or obs.training_job:
        reads.append(kc.list("v1", "Pod", ns, label_selector={b.OWNER_LABEL: name}))
    if spec is not None and spec.resources.nodes > 1:
        reads.append(kc.get("v1", "Service", b.service_name(name), ns))
    results = await gather(*reads, *(kc.get("v1", kind, dep, ns) for kind, dep, _ in deps))
    if obs.validation_job or obs.training_job:
        pods = results.pop(0)
        obs.validation_pods = st.pods_of(obs.validation_job, pods)
        obs.training_pods = st.pods_of(obs.training_job, pods)
    if spec is not None and spec.resources.nodes > 1:
        obs.service = results.pop(0)
    if spec is None or not deps:
        return obs
    contents: dict[str, dict[str, Any]] = {}
    for kind, dep, key in deps:
        obj = results.pop(0)
        if obj is None:
            obs.missing.append(f"{kind} {dep}")
            continue
        if key is not None:
            data = obj.get("data") or {}
            if key not in data and key not in (obj.get("binaryData") or {}):
                obs.missing.append(f"{kind} {dep} (key {key})")
        if kind == "ConfigMap":
            contents[dep] = obj.get("data") or {}
        del obj  # Secrets: only their existence matters
    if not obs.missing and not st.is_validated(body):
        for split, (cm, key) in st.inline_sources(spec).items():
            text = (contents.get(cm) or {}).get(key, "")
            obs.inline_datasets[split] = await check_inline_dataset(
                text, spec.dataset.format.value, f"configMap {cm}/{key}"
            )
    return obs


class SeenJobs:
    """The resourceVersion of each of our Jobs as the last completed reconcile of its owner saw
    it (read, or created by it), per event loop. An event of exactly that version of a Job would
    reconcile the same inputs again: the Job event handler skips it."""

    def __init__(self) -> None:
        self._rv: dict[tuple[int, str, str], dict[str, str]] = {}

    def _key(self, namespace: str, owner: str) -> tuple[int, str, str]:
        return (id(asyncio.get_running_loop()), namespace, owner)

    def remember(self, namespace: str, owner: str, jobs: Any) -> None:
        seen: dict[str, str] = {}
        for job in jobs:
            meta = (job or {}).get("metadata") or {}
            if meta.get("name") and meta.get("resourceVersion"):
                seen[meta["name"]] = str(meta["resourceVersion"])
        self._rv[self._key(namespace, owner)] = seen

    def seen(self, namespace: str, owner: str, job: str, resource_version: Optional[str]) -> bool:
        rv = self._rv.get(self._key(namespace, owner), {}).get(job)
        return rv is not None and rv == resource_version

    def forget(self, namespace: str, owner: str) -> None:
        self._rv.pop(self._key(namespace, owner), None)


_seen_jobs = SeenJobs()


async def apply(
    kc: kube.KubeClient, body: dict[str, Any], decision: st.Decision
) -> list[dict[str, Any]]:
    """Carry out `decision`; returns the objects created (as the API server answered)."""
    ns = body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    for ref in decision.delete:
        await kc.delete(ref["apiVersion"], ref["kind"], ref["name"], ns, propagation="Background")
    created = []
    for obj in decision.create:
        out, new = await kc.create(obj, ns)
        if new:
            created.append(out)
    for p in decision.patch:
        await kc.patch(p["apiVersion"], p["kind"], p["name"], ns, p["patch"])
    diff = st.merge_patch(body.get("status") or {}, decision.status)
    if diff:
        await kc.patch(API_VERSION, KIND, name, ns, {"status": diff}, subresource="status")
    for ev in decision.events:
        kopf.event(body, type=ev["type"], reason=ev["reason"], message=ev["message"])
    METRICS.set_phase(ns, name, decision.status.get("phase"))
    tg = decision.status.get("together") or {}
    if tg:
        if tg.get("costUSD") is not None:
            METRICS.set_cost(ns, name, tg["costUSD"])
        if decision.status.get("progress"):
            METRICS.set_progress(ns, name, decision.status["progress"])
    return created


async def reconcile_object(
    namespace: str, name: str, *, logger: Optional[logging.Logger] = None,
    prefetch: bool = False, unless_seen: Optional[tuple[str, Optional[str]]] = None,
) -> Optional[st.Decision]:
    """Observe -> decide -> apply for one FineTuneJob; None when it no longer exists.
    prefetch: read the children (backend: kubernetes) together with the FineTuneJob.
    unless_seen: (Job name, resourceVersion): do nothing when the last reconcile already saw
    that version of that Job (checked under the lock, after any reconcile in flight)."""
    log = logger or logging.getLogger("tuneop")
    started = time.monotonic()
    result: Optional[str] = "error"
    try:
        async with _lock(namespace, name):
            if unless_seen is not None and _seen_jobs.seen(namespace, name, *unless_seen):
                result = None
                return None
            kc = kube.client()
            children = None
            if prefetch:
                body, children = await gather(
                    get_live(kc, API_VERSION, KIND, name, namespace), read_children(kc, namespace, name)
                )
            else:
                body = await get_live(kc, API_VERSION, KIND, name, namespace)
            if body is None:
                result = "success"
                return None
            if (body.get("spec") or {}).get("backend") == "together":
                children = None
            observed = await observe(kc, body, children)
            decision = st.reconcile(
                body, observed, image=CONFIG.image, now=now_iso(),
                together_base_url=together.base_url(),
                trainer_defaults=CONFIG.workload_defaults.get("trainer"),
            )
            created = await apply(kc, body, decision)
            for ev in decision.events:
                log.info("%s: %s", ev["reason"], ev["message"])
            if decision.together:
                await together.run_actions(kc, body, decision, log)
            _seen_jobs.remember(namespace, name, [
                observed.validation_job, observed.training_job, observed.upload_job,
                observed.download_job, *(o for o in created if o.get("kind") == "Job"),
            ])
            result = "retry" if decision.retry_after else "success"
            return decision
    finally:
        if result is not None:
            METRICS.observe_reconcile(KIND, result, time.monotonic() - started)


# ---------------------------------------------------------------------------------- handlers


async def report_api_error(namespace: str, name: str, error: kube.ApiError) -> bool:
    """Put an API error of a reconcile into the status (reason ApiError). False if that failed too."""
    try:
        async with _lock(namespace, name):
            kc = kube.client()
            body = await kc.get(API_VERSION, KIND, name, namespace)
            if body is None:
                return True
            body.setdefault("apiVersion", API_VERSION)
            body.setdefault("kind", KIND)
            decision = st.api_error(body, f"Kubernetes API error: {error}", now=now_iso())
            await apply(kc, body, decision)
        return True
    except kube.ApiError:
        return False


async def reconcile_or_report(namespace: str, name: str, logger: logging.Logger, **kwargs: Any) -> bool:
    """Reconcile (kwargs: see :func:`reconcile_object`); an API error goes into the status.
    False when even that was impossible."""
    try:
        await reconcile_object(namespace, name, logger=logger, **kwargs)
        return True
    except kube.ApiError as e:
        logger.warning(f"reconcile of FineTuneJob {namespace}/{name} failed: {e}")
        return await report_api_error(namespace, name, e)


def _kubernetes_backend(spec: Any) -> bool:
    return (spec or {}).get("backend") != "together"


async def on_change(
    namespace: str, name: str, logger: logging.Logger, spec: kopf.Spec, **_: Any
) -> None:
    """create / update(spec) / resume. Waiting (a missing PVC, old Jobs being deleted, an API
    error) is not a handler failure: the status says why and the `retry` timer looks again.
    Only when the API server cannot even take the status does kopf retry the handler."""
    if not await reconcile_or_report(namespace, name, logger, prefetch=_kubernetes_backend(spec)):
        raise kopf.TemporaryError("the Kubernetes API is not reachable", delay=15)


def _is_waiting(status: kopf.Status, **_: Any) -> bool:
    return (status or {}).get("reason") in st.RETRY_REASONS and (status or {}).get("phase") not in st.TERMINAL


async def retry_timer(
    namespace: str, name: str, logger: logging.Logger, spec: kopf.Spec, **_: Any
) -> None:
    await reconcile_or_report(namespace, name, logger, prefetch=_kubernetes_backend(spec))


async def on_job_event(
    type: Optional[str], body: kopf.Body, logger: logging.Logger, **_: Any
) -> None:
    """Any change of one of our Jobs: reconcile its owner now, unless the owner's last reconcile
    already saw this very version of the Job (e.g. the ADDED event of the Job it created)."""
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(b.OWNER_LABEL)
    if not owner or not meta.get("namespace"):
        return
    unless_seen = None if type == "DELETED" else (meta.get("name", ""), meta.get("resourceVersion"))
    await reconcile_or_report(meta["namespace"], owner, logger, unless_seen=unless_seen)


async def on_ftj_event(
    type: Optional[str], name: str, namespace: str, status: kopf.Status, **_: Any
) -> None:
    if type == "DELETED":
        METRICS.forget(namespace, name)
        _locks.forget(namespace, name)
        _seen_jobs.forget(namespace, name)
    else:
        METRICS.set_phase(namespace, name, (status or {}).get("phase"))


def _is_running(status: kopf.Status, spec: kopf.Spec, **_: Any) -> bool:
    return (status or {}).get("phase") == "Running" and (spec or {}).get("backend") != "together"


def pick_progress_pod(pods: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The pod whose log has the progress: rank 0 (index 0) first, running first, newest first."""

    def rank(p: dict[str, Any]) -> tuple[bool, bool]:
        meta = p.get("metadata") or {}
        index = (meta.get("annotations") or {}).get(b.JOB_INDEX_ANNOTATION)
        return (index not in (None, "0"), (p.get("status") or {}).get("phase") != "Running")

    ordered = sorted(
        pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True
    )
    ordered.sort(key=rank)
    return ordered[0] if ordered else None


async def read_progress(namespace: str, name: str) -> Optional[dict[str, Any]]:
    kc = kube.client()
    job = await kc.get("batch/v1", "Job", b.training_job_name(name), namespace)
    if job is None:
        return None
    pods = st.pods_of(job, await kc.list("v1", "Pod", namespace, label_selector={b.OWNER_LABEL: name}))
    pod = pick_progress_pod(pods)
    if pod is None:
        return None
    try:
        text = await kc.pod_log(
            namespace, pod["metadata"]["name"], container=b.TRAINER_CONTAINER,
            tail_lines=CONFIG.log_tail_lines,
        )
    except kube.ApiError:
        return None  # the container may not have started yet
    return st.parse_progress(text, now=now_iso())


async def progress_timer(
    name: str, namespace: str, status: kopf.Status, logger: logging.Logger, **_: Any
) -> None:
    try:
        progress = await read_progress(namespace, name)
    except kube.ApiError as e:
        logger.debug(f"progress not read: {e}")
        return
    if not progress:
        return
    METRICS.set_progress(namespace, name, progress)
    old = dict((status or {}).get("progress") or {})
    same = {k: v for k, v in old.items() if k != "updatedAt"} == {
        k: v for k, v in progress.items() if k != "updatedAt"
    }
    if same:
        return
    patch = {"status": {"progress": st.merge_patch(old, progress) if old else progress}}
    await kube.client().patch(API_VERSION, KIND, name, namespace, patch, subresource="status")


# ---------------------------------------------------------------------------------- registration


def register(registry: Optional[kopf.OperatorRegistry] = None, config: Optional[OperatorConfig] = None) -> kopf.OperatorRegistry:
    """Register every FineTuneJob handler in `registry` (default: kopf's default registry)."""
    global CONFIG
    if config is not None:
        CONFIG = config
    reg = registry if registry is not None else kopf.get_default_registry()
    ftj = (GROUP, VERSION, PLURAL)
    kopf.on.startup(registry=reg)(startup)
    kopf.on.cleanup(registry=reg)(cleanup)
    kopf.on.login(registry=reg)(login)
    kopf.on.create(*ftj, registry=reg, id="reconcile")(on_change)
    kopf.on.update(*ftj, registry=reg, id="reconcile-spec", field="spec")(on_change)
    kopf.on.resume(*ftj, registry=reg, id="reconcile-resume")(on_change)
    kopf.on.event(*ftj, registry=reg, id="phase-metrics")(on_ftj_event)
    kopf.on.event(
        "batch", "v1", "jobs", registry=reg, id="child-job",
        labels={b.MANAGED_BY: "tuneop", b.OWNER_LABEL: kopf.PRESENT},
    )(on_job_event)
    kopf.timer(
        *ftj, registry=reg, id="retry", interval=CONFIG.retry_interval,
        initial_delay=CONFIG.retry_interval, when=_is_waiting,
    )(retry_timer)
    kopf.timer(
        *ftj, registry=reg, id="progress", interval=CONFIG.progress_interval,
        when=_is_running,
    )(progress_timer)
    together.register(reg, ftj)
    return reg
