"""kopf handlers of the FineTuneJob: thin glue around ``tuneop.backends.reconcile``; each backend
(``tuneop/backends/``) brings its observe, reducer, outside calls and handlers of its own.

Every trigger ends in :func:`reconcile_object`: under a per-object lock it reads the
FineTuneJob fresh from the API, observes its children and dependencies (independent reads at
once; the first reconcile of a new object assumes it has no children, see
:func:`first_reconcile`), lets the pure reducer decide, applies the decision (deletes, creates
with 409 = exists, patches, status), then posts one Event per transition. Running it twice in a row does nothing the second time.

Triggers:
- FineTuneJob created / spec changed / operator (re)started -> reconcile. Waiting is not an
  error: while the status says DependencyMissing, SpecChanged or ApiError (a refused request:
  quota, RBAC, 5xx), the `retry` timer reconciles every ``retry_interval`` seconds (no crash
  loop, one Event per distinct reason). Only an unreachable API server fails the handler
  (kopf.TemporaryError, kopf retries it).
- any event of a batch/v1 Job labelled managed-by tuneop -> reconcile its owner at once, unless
  the owner's last reconcile already saw that Job as it is now (`SeenJobs`: the ADDED event of the
  Job a reconcile has just created, and the Job controller's first update of it, which only adds
  the start time, would redo the same reconcile).
- every ``progress_interval`` seconds, for each FineTuneJob in phase Running (one task of the
  operator, :class:`ProgressPoller`, fed by the FineTuneJob watch; not a kopf timer per object,
  which would put a finalizer on every job): the newest ``{"event": "progress"}`` line of the
  training pod's log -> status.progress + metrics.
- FineTuneJob watch events -> the phase gauge; deletion -> its metric series are dropped.

What kopf needs to tell a new spec from one already handled is the status' own
``observedGeneration`` (:class:`GenerationDiffBase`), so handling a FineTuneJob writes nothing
but its status: no last-handled-configuration annotation, no finalizer (only ``backend:
together`` jobs with work at Together get one, for the cancel on delete).

Handlers are registered explicitly with :func:`register` (tests use a fresh registry each).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import weakref
from typing import Any, Mapping, Optional

import kopf

from .. import kube
from ..backends import kubernetes as k8s
from ..backends import registered as backends
from ..backends.base import Host, gather
from ..backends.together.handlers import base_url as together_base_url
from ..glue import EVENTS, ObjectLocks, PeeringSelf, get_live, now_iso, still_leading, typed
from ..metrics import METRICS
from . import builders as b
from . import reconcile as st
from . import startfrom

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
    # USD per GPU-hour by GPU resource name (--gpu-hourly-price): the cost estimate of backend kubernetes.
    gpu_hourly_price_usd: dict[str, float] = dataclasses.field(default_factory=dict)
    # kopf peering of this replica (None: standalone). kopf pauses its handlers while another
    # replica leads; the operator's own tasks (ProgressPoller) check the peering objects themselves.
    peering: Optional[PeeringSelf] = None


CONFIG = OperatorConfig()


# ---------------------------------------------------------------------------------- settings


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """Our kopf settings: tuneop.dev prefixes, Events only for errors from logs (transitions
    are posted explicitly), bounded watches and requests."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = ProgressAnnotations(prefix=PREFIX)
    settings.persistence.diffbase_storage = GenerationDiffBase(
        kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration"), kinds={KIND},
        remembered=_observed.get, watch_only=WATCH_ONLY_KINDS,
    )
    settings.posting.level = logging.ERROR
    settings.posting.reporting_component = "tuneop"
    settings.posting.event_name_prefix = "tuneop-"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = CONFIG.request_timeout
    settings.networking.connect_timeout = 30
    # kopf runs one worker per object with events in flight; an idle one keeps the object's last
    # event for idle_timeout (5 s by default) and there is no limit: a burst of 1,000 FineTuneJobs
    # held ~2,000 of them at once (RSS). 128 at a time and 0.5 s idle: the burst takes about as long.
    settings.queueing.worker_limit = 128
    settings.queueing.idle_timeout = 0.5


def spec_handled(body: Any, remembered: Optional[int] = None) -> Optional[bool]:
    """Whether the current spec was reconciled: ``status.observedGeneration ==
    metadata.generation``, or `remembered` (the generation this process last wrote into the
    status of this object) is it, for an event older than that status write. None when the
    object has no generation to tell (then kopf's own annotation decides)."""
    generation = ((body or {}).get("metadata") or {}).get("generation")
    if generation is None:
        return None
    return generation in (((body or {}).get("status") or {}).get("observedGeneration"), remembered)


class ObservedGenerations:
    """uid -> the generation this process last wrote as ``status.observedGeneration``."""

    def __init__(self) -> None:
        self._gen: dict[str, int] = {}

    def remember(self, body: dict[str, Any], generation: Any) -> None:
        uid = (body.get("metadata") or {}).get("uid")
        if uid and isinstance(generation, int):
            self._gen[uid] = generation

    def get(self, body: Any) -> Optional[int]:
        uid = ((body or {}).get("metadata") or {}).get("uid")
        return self._gen.get(uid) if uid else None

    def forget(self, uid: Optional[str]) -> None:
        if uid:
            self._gen.pop(uid, None)

    def clear(self) -> None:
        self._gen.clear()


_observed = ObservedGenerations()


def essence_source(body: Any, extra_fields: Any = None) -> Any:
    """What kopf's ``DiffBaseStorage.build`` reads of `body`, without what it deep-copies only to
    drop: the status and the metadata other than labels and annotations (on a real API server
    ``managedFields`` alone is several KB per object, copied twice per event). The essence built
    from it is the same. With `extra_fields` (a handler on a status field) the whole body."""
    if extra_fields or not isinstance(body, Mapping):
        return body
    meta = body.get("metadata") or {}
    slim: dict[str, Any] = {k: v for k, v in body.items() if k not in ("status", "metadata")}
    slim["metadata"] = {k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta}
    return kopf.Body(slim)  # type: ignore[arg-type]  # a RawBody is a plain dict at run time


# Kinds tuneop watches with on.event handlers only (its Jobs; the AdapterDeployments' Deployments):
# no create/update/resume handler, timer or daemon reads their essence (test_handlers pins it).
WATCH_ONLY_KINDS = frozenset({"Job", "Deployment"})


class GenerationDiffBase(kopf.DiffBaseStorage):
    """kopf's "last handled state" of `kinds` taken from the status instead of an annotation.

    The reconcile writes ``status.observedGeneration`` (the Kubernetes convention) with every
    status, and a spec change bumps ``metadata.generation``; so an object whose status has
    observed its generation is "handled" (kopf sees no change), any other is new or changed
    (kopf runs the create/update handlers, which are the same reconcile). Nothing is stored:
    handling an object costs no PATCH of kopf's own. An event that left the API server before
    the status write (kopf waits for its own patches, not ours) is told apart by `remembered`
    (``ObservedGenerations.get``). Other kinds, objects without a generation, and the diff of a
    changed object use `fallback` (the annotation of older tuneop versions).
    `watch_only`: kinds no handler reads the essence of (on.event only): kopf builds one for
    every event of every resource anyway, a deep copy of the whole object (a Job's pod template)
    and another one to clear it; theirs is empty.
    """

    def __init__(self, fallback: kopf.DiffBaseStorage, kinds: Any,
                 remembered: Any = lambda body: None, watch_only: Any = ()) -> None:
        super().__init__()
        self.fallback = fallback
        self.kinds = frozenset(kinds)
        self.remembered = remembered
        self.watch_only = frozenset(watch_only)

    def _ours(self, body: Any) -> Optional[bool]:
        return spec_handled(body, self.remembered(body)) if body.get("kind") in self.kinds else None

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        if body.get("kind") in self.watch_only:
            return kopf.BodyEssence()
        return self.fallback.build(body=essence_source(body, extra_fields), extra_fields=extra_fields)

    def fetch(self, *, body: Any) -> Any:
        if self._ours(body):
            return self.build(body=body)  # the current state: no change
        return self.fallback.fetch(body=body)

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        if self._ours(body) is None:
            self.fallback.store(body=body, patch=patch, essence=essence)


def lone_marker(prefix: str, have: Any, patch: Any) -> Optional[str]:
    """kopf's ``<prefix>/kopf-managed`` annotation when `patch` would add it (to the annotations
    `have`) although no other annotation of `prefix` stays on the object: the marker is there to
    tell other kopf operators whose annotations these are; with none, it is a PATCH for nothing."""
    marker = f"{prefix}/kopf-managed"
    if marker not in (patch or {}) or marker in (have or {}):
        return None
    merged = {**dict(have or {}), **dict(patch or {})}
    stays = [k for k, v in merged.items() if k.startswith(f"{prefix}/") and k != marker and v is not None]
    return None if stays else marker


class ProgressAnnotations(kopf.AnnotationsProgressStorage):
    """kopf's progress in annotations, as usual (retries of a failing handler are remembered), but
    a handler that succeeded at once leaves no trace: kopf would still add its marker annotation."""

    def purge(self, *, key: Any, body: Any, patch: Any) -> None:
        super().purge(key=key, body=body, patch=patch)
        meta = patch.get("metadata")
        annotations = meta.get("annotations") if isinstance(meta, dict) else None
        if not isinstance(annotations, dict):
            return
        marker = lone_marker(self.prefix or "", (body.get("metadata") or {}).get("annotations"), annotations)
        if marker is not None:
            del annotations[marker]
            if not annotations:
                del meta["annotations"]
            if not meta:
                del patch["metadata"]


async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_settings(settings)
    _poller.start(CONFIG.progress_interval, CONFIG.retry_interval)


async def cleanup(**_: Any) -> None:
    await _poller.stop()
    await EVENTS.flush()
    await kube.close()


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster_server(environ: Any) -> Optional[str]:
    """The API server as every in-cluster client finds it (client-go's InClusterConfig): the
    KUBERNETES_SERVICE_HOST/PORT the kubelet puts in each pod's environment, not the DNS name
    kubernetes.default.svc (kopf's service-account login), which needs cluster DNS to resolve."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def login_in_cluster(environ: Any = os.environ, account_dir: str = SERVICE_ACCOUNT_DIR) -> Optional[kopf.ConnectionInfo]:
    """The pod's service account at the API server's service address (None outside a pod)."""
    server = in_cluster_server(environ)
    token_path = os.path.join(account_dir, "token")
    if server is None or not os.path.exists(token_path):
        return None
    with open(token_path, encoding="utf-8") as f:
        token = f.read().strip()
    namespace = None
    if os.path.exists(os.path.join(account_dir, "namespace")):
        with open(os.path.join(account_dir, "namespace"), encoding="utf-8") as f:
            namespace = f.read().strip() or None
    ca = os.path.join(account_dir, "ca.crt")
    return kopf.ConnectionInfo(server=server, ca_path=ca if os.path.exists(ca) else None, token=token,
                               scheme="Bearer", default_namespace=namespace)


async def login(settings: kopf.OperatorSettings, logger: kopf.Logger, **kwargs: Any) -> Any:
    """The pod's service account (at the API server's service address), else kopf's own login
    functions; the result is also kept for kube.py."""
    info = None
    if os.environ.get("KUBECONFIG"):
        info = kopf.login_with_kubeconfig(settings=settings, logger=logger, **kwargs)
    elif os.path.exists(os.path.join(SERVICE_ACCOUNT_DIR, "token")):
        info = login_in_cluster() or kopf.login_with_service_account(settings=settings, logger=logger, **kwargs)
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


class SeenJobs:
    """What each of our Jobs was as the last completed reconcile of its owner saw it (read, or
    created by it), per event loop: its resourceVersion and :func:`st.job_fingerprint`. An event of
    that very version, or of a version that differs only in what no reconcile reads (the startTime
    the Job controller adds right after the create), would reconcile the same inputs again: the Job
    event handler skips it. Nothing is decided from it: an operator that restarts has none and
    reconciles once more."""

    def __init__(self) -> None:
        # keyed by the loop object itself (weakly): id() of a closed loop is reused by the next one
        self._rv: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[str, str], dict[str, tuple[str, Optional[str]]]]
        ] = weakref.WeakKeyDictionary()

    def _of_loop(self) -> dict[tuple[str, str], dict[str, tuple[str, Optional[str]]]]:
        return self._rv.setdefault(asyncio.get_running_loop(), {})

    def remember(self, namespace: str, owner: str, jobs: Any) -> None:
        seen: dict[str, tuple[str, Optional[str]]] = {}
        for job in jobs:
            meta = (job or {}).get("metadata") or {}
            if meta.get("name") and meta.get("resourceVersion"):
                seen[meta["name"]] = (str(meta["resourceVersion"]), st.job_fingerprint(job))
        self._of_loop()[(namespace, owner)] = seen

    def seen(self, namespace: str, owner: str, job: dict[str, Any]) -> bool:
        meta = job.get("metadata") or {}
        was = self._of_loop().get((namespace, owner), {}).get(meta.get("name") or "")
        if was is None or not meta.get("resourceVersion"):
            return False
        return was[0] == str(meta["resourceVersion"]) or was[1] == st.job_fingerprint(job)

    def forget(self, namespace: str, owner: str) -> None:
        self._of_loop().pop((namespace, owner), None)


_seen_jobs = SeenJobs()


def first_reconcile(body: dict[str, Any]) -> bool:
    """A FineTuneJob (backend: kubernetes) that no reconcile has written a status to yet: its
    children are almost surely not there, so the first reconcile assumes so rather than reading
    them (:class:`ChildExists` corrects it when one is)."""
    return not body.get("status") and _prefetches(body.get("spec"))


def use_given(given: Any, written_generation: Optional[int]) -> bool:
    """Can the first reconcile take the object from kopf's create event instead of reading it? Only
    when that body has no status, is not being deleted, and this process has not written a status
    to it since (`written_generation`, from ObservedGenerations): then nothing a reconcile decides
    from can be newer on the server than a spec change, which kopf delivers as its own event."""
    if not isinstance(given, dict) or written_generation is not None:
        return False
    if (given.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return first_reconcile(given)


class ChildExists(Exception):
    """A child assumed absent was there (409 on its create): observe for real and decide again.
    `created`: what the same apply did create (its children are created at once)."""

    def __init__(self, message: str, created: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.created = created


def created_next_to_a_foreign_config(created: list[dict[str, Any]], config_map: Optional[dict[str, Any]],
                                     uid: Optional[str]) -> list[dict[str, Any]]:
    """The Jobs of `created` that were created at once with a ConfigMap create that found one
    there already, when that ConfigMap is not the one they need: of another spec (its spec hash)
    or another owner (a FineTuneJob of the same name, deleted: its ConfigMap goes with it). Their
    pods could read it: they are deleted and made again once the ConfigMap is right."""
    if config_map is None:
        return []
    owners = {o.get("uid") for o in (config_map.get("metadata") or {}).get("ownerReferences") or ()}
    return [
        o for o in created
        if o.get("kind") == "Job" and (st.child_hash(config_map) != st.child_hash(o) or uid not in owners)
    ]


async def apply(
    kc: kube.KubeClient, body: dict[str, Any], decision: st.Decision, *, assumed_absent: bool = False,
) -> list[dict[str, Any]]:
    """Carry out `decision`; returns the objects created (as the API server answered).
    assumed_absent: the children were not read but assumed absent; a create that finds one
    raises ChildExists before anything else (status, Events) is written.
    The Events go through the API client (see below)."""
    ns = body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    for ref in decision.delete:
        await kc.delete(ref["apiVersion"], ref["kind"], ref["name"], ns, propagation="Background")
    created = []
    if assumed_absent:
        # A new FineTuneJob's children (its ConfigMap, Service, Job) at once: one round trip, not
        # one each (a pod waits for its ConfigMap volume). One that was there already (409): see
        # ChildExists and created_next_to_a_foreign_config.
        results = await gather(*(kc.create(obj, ns) for obj in decision.create))
        created = [out for out, new in results if new]
        found = [obj for obj, (_, new) in zip(decision.create, results) if not new]
        if found:
            raise ChildExists(", ".join(
                f"{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}" for obj in found), created)
    else:
        for obj in decision.create:
            out, new = await kc.create(obj, ns)
            if new:
                created.append(out)
    for p in decision.patch:
        await kc.patch(p["apiVersion"], p["kind"], p["name"], ns, p["patch"])
    diff = st.merge_patch(body.get("status") or {}, decision.status)
    if diff:
        await kc.patch(API_VERSION, KIND, name, ns, {"status": diff}, subresource="status")
    _observed.remember(body, decision.status.get("observedGeneration"))
    for ev in decision.events:
        # Through tuneop's client (its few connections), not kopf.event: kopf posts each Event from a
        # worker of its own on a connection pool without a limit. Queued (glue.EVENTS): posted in
        # order after the reconcile; a refused one is logged, the status is written already.
        EVENTS.post(kc, body, ev["type"], ev["reason"], ev["message"])
    METRICS.set_phase(ns, name, decision.status.get("phase"))
    METRICS.set_costs(ns, name, decision.status)
    tg = decision.status.get("together") or {}
    if tg:
        if decision.status.get("progress"):
            METRICS.set_progress(ns, name, decision.status["progress"])
    return created


def _decide(body: dict[str, Any], observed: st.Observed) -> st.Decision:
    return backends.reconcile(
        body, observed, image=CONFIG.image, now=now_iso(),
        together_base_url=together_base_url(CONFIG),
        trainer_defaults=CONFIG.workload_defaults.get("trainer"),
        gpu_prices=CONFIG.gpu_hourly_price_usd,
    )


def host() -> Host:
    """What this glue lends the backends' own glue."""
    return Host(
        config=CONFIG, api_version=API_VERSION, kind=KIND, prefix=PREFIX, now=now_iso, lock=_lock,
        reconcile=reconcile_or_report, apply=apply,
    )


async def observe(
    kc: kube.KubeClient, body: dict[str, Any], children: Optional[list[Any]] = None
) -> st.Observed:
    """What exists for `body`, as its backend reads it (nothing for an invalid spec: the reducer
    says SpecInvalid). `children`: what :func:`tuneop.backends.kubernetes.read_children` returned,
    when it was read together with the FineTuneJob itself."""
    try:
        spec = st.spec_of(body)
    except Exception:  # noqa: BLE001  (pydantic.ValidationError; the reducer reports SpecInvalid)
        return st.Observed()
    backend = backends.get(spec.backend)
    observed = await backend.observe(host(), kc, body, spec, children if backend.prefetch else None)
    source = startfrom.needs_source(spec, body.get("status"), st.current_hash(body))
    if source is not None and not st.is_settled(body):
        observed.start_from_job = await kc.get(API_VERSION, KIND, source, body["metadata"]["namespace"])
    return observed


async def reconcile_object(
    namespace: str, name: str, *, logger: Optional[kopf.Logger] = None,
    prefetch: bool = False, unless_seen: Optional[dict[str, Any]] = None,
    assume_new: bool = False, given: Optional[dict[str, Any]] = None,
) -> Optional[st.Decision]:
    """Observe -> decide -> apply for one FineTuneJob; None when it no longer exists.
    prefetch: read the children (backend: kubernetes) together with the FineTuneJob.
    unless_seen: a Job (as its watch event had it): do nothing when the last reconcile already saw
    that Job so (:class:`SeenJobs`; checked under the lock, after any reconcile in flight).
    assume_new: kopf has just seen it created; if the fresh object has no status either
    (:func:`first_reconcile`), its children are assumed absent instead of read: their creates
    tell (a 409 -> read them and decide again; no status or Event was written in between).
    given: with assume_new, the object as kopf's create event had it; used instead of a fresh
    read when :func:`use_given` says it cannot be stale in a way that matters."""
    log = logger or logging.getLogger("tuneop")
    started = time.monotonic()
    result: Optional[str] = "error"
    try:
        async with _lock(namespace, name):
            if unless_seen is not None and _seen_jobs.seen(namespace, name, unless_seen):
                result = None
                return None
            kc = kube.client()
            children = None
            body: Optional[dict[str, Any]]
            if assume_new and given is not None and use_given(given, _observed.get(given)):
                body = typed(dict(given), API_VERSION, KIND)  # given: already a copy of its own (_plain)
            elif prefetch:
                body, children = await gather(
                    get_live(kc, API_VERSION, KIND, name, namespace), k8s.read_children(kc, namespace, name)
                )
            else:
                body = await get_live(kc, API_VERSION, KIND, name, namespace)
            if body is None:
                result = "success"
                return None
            if not _prefetches(body.get("spec")):
                children = None
            assumed = assume_new and children is None and first_reconcile(body)
            observed = await observe(kc, body, [None, None, None] if assumed else children)
            decision = _decide(body, observed)
            try:
                created = await apply(kc, body, decision, assumed_absent=assumed)
            except ChildExists as e:
                log.info(f"{e} exists already: reading the object and its children")
                body = await get_live(kc, API_VERSION, KIND, name, namespace)
                if body is None:
                    result = "success"
                    return None
                observed = await observe(kc, body)
                redo = created_next_to_a_foreign_config(
                    e.created, observed.config_map, (body.get("metadata") or {}).get("uid"))
                for job in redo:
                    log.info(f"Job {job['metadata']['name']} was created next to a ConfigMap of another "
                             "spec or owner: deleting it, to make it again once the ConfigMap is right")
                    await kc.delete("batch/v1", "Job", job["metadata"]["name"], namespace, propagation="Background")
                if redo:
                    observed = await observe(kc, body)
                decision = _decide(body, observed)
                created = await apply(kc, body, decision)
            for ev in decision.events:
                log.info("%s: %s", ev["reason"], ev["message"])
            await _backend_of(body).act(host(), kc, body, decision, log)
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


async def reconcile_or_report(namespace: str, name: str, logger: kopf.Logger, **kwargs: Any) -> bool:
    """Reconcile (kwargs: see :func:`reconcile_object`); an API error goes into the status.
    False when even that was impossible."""
    try:
        await reconcile_object(namespace, name, logger=logger, **kwargs)
        return True
    except kube.ApiError as e:
        logger.warning(f"reconcile of FineTuneJob {namespace}/{name} failed: {e}")
        return await report_api_error(namespace, name, e)


def _backend_name(spec: Any) -> str:
    return str((spec or {}).get("backend") or k8s.BACKEND.name)


def _prefetches(spec: Any) -> bool:
    """Whether the backend `spec` names reads kubernetes' children (read with the object)."""
    name = _backend_name(spec)
    return name in backends.names() and backends.get(name).prefetch


def _backend_of(body: dict[str, Any]) -> backends.FineTuneBackend:
    """The backend of a FineTuneJob whose spec the reducer accepted (kubernetes' for one it did not:
    its act() does nothing)."""
    name = _backend_name(body.get("spec"))
    return backends.get(name) if name in backends.names() else k8s.BACKEND


def _plain(body: Any) -> Optional[dict[str, Any]]:
    """kopf's Body as a plain, independent dict (None if it cannot be one)."""
    try:
        return json.loads(json.dumps(dict(body)))
    except (TypeError, ValueError):
        return None


async def on_change(
    namespace: str, name: str, logger: kopf.Logger, spec: kopf.Spec, status: kopf.Status,
    body: kopf.Body, **_: Any,
) -> None:
    """create / update(spec) / resume. Waiting (a missing PVC, old Jobs being deleted, an API
    error) is not a handler failure: the status says why and the `retry` timer looks again.
    Only when the API server cannot even take the status does kopf retry the handler."""
    new = not status  # as kopf saw it: nothing reconciled it yet (children: see first_reconcile)
    if not await reconcile_or_report(
        namespace, name, logger, prefetch=_prefetches(spec) and not new, assume_new=new,
        given=_plain(body) if new else None,
    ):
        raise kopf.TemporaryError("the Kubernetes API is not reachable", delay=15)


def _is_waiting(status: Optional[Mapping[str, Any]], **_: Any) -> bool:
    return (status or {}).get("reason") in st.RETRY_REASONS and (status or {}).get("phase") not in st.TERMINAL


async def retry_timer(
    namespace: str, name: str, logger: kopf.Logger, spec: kopf.Spec, **_: Any
) -> None:
    await reconcile_or_report(namespace, name, logger, prefetch=_prefetches(spec))


async def on_job_event(
    type: Optional[str], body: kopf.Body, logger: kopf.Logger, **_: Any
) -> None:
    """Any change of one of our Jobs: reconcile its owner now, unless the owner's last reconcile
    already saw this very version of the Job (e.g. the ADDED event of the Job it created)."""
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(b.OWNER_LABEL)
    if not owner or not meta.get("namespace"):
        return
    unless_seen = None if type == "DELETED" else dict(body)
    await reconcile_or_report(meta["namespace"], owner, logger, unless_seen=unless_seen)


async def read_ahead(body: Any) -> None:
    """The watch event of a FineTuneJob nothing has reconciled yet (no status): start the reads its
    first reconcile makes (its backend's :class:`~tuneop.backends.base.ReadsAhead`), which kopf
    runs right after this event's other handlers; the reconcile joins them in flight (about 1 ms
    sooner than its own). Nothing is decided here and nothing kept."""
    if (body.get("status") or not isinstance(body.get("spec"), Mapping)
            or not (body.get("metadata") or {}).get("namespace")):
        return
    try:
        spec = st.spec_of({"spec": dict(body["spec"])})
    except Exception:  # noqa: BLE001  (pydantic.ValidationError: the reconcile says SpecInvalid)
        return
    backend = backends.get(spec.backend) if spec.backend in backends.names() else None
    if isinstance(backend, backends.ReadsAhead):
        backend.read_ahead(kube.client(), body, spec)
        # let the reads go out now: kopf reaches the reconcile without giving the loop a turn
        await asyncio.sleep(0)


async def on_ftj_event(
    type: Optional[str], name: str, namespace: str, status: Optional[Mapping[str, Any]], spec: kopf.Spec,
    body: kopf.Body, uid: Optional[str] = None, **_: Any,
) -> None:
    if type == "DELETED":
        _observed.forget(uid)
        METRICS.forget(namespace, name)
        _locks.forget(namespace, name)
        _seen_jobs.forget(namespace, name)
        _poller.forget(namespace, name)
    else:
        await read_ahead(body)
        METRICS.set_phase(namespace, name, (status or {}).get("phase"))
        restore_metrics(namespace, name, status)
        _poller.track(namespace, name, status, spec)
    for waiter in _start_waiters.update(namespace, name, None if type == "DELETED" else status, spec):
        # a job waits for this one (spec.startFrom.fineTuneJob): it may start now, or fail
        await reconcile_or_report(namespace, waiter, logging.getLogger("tuneop"))


class StartWaiters:
    """Which FineTuneJobs wait for which (status reason WaitingForStartFrom, from the watch): an
    event of a waited-for job that could end the wait (it finished, changed or went away) reconciles
    its waiters at once; the `retry` timer looks again anyway."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], str] = {}  # (namespace, waiter) -> the job it waits for

    def update(self, namespace: str, name: str, status: Any, spec: Any) -> list[str]:
        """Record the event of `name`; -> the jobs to reconcile because of it."""
        st_ = dict(status or {})
        ref = ((dict(spec or {}).get("startFrom") or {}).get("fineTuneJob") or {}).get("name")
        if st_.get("reason") == startfrom.WAITING_FOR_START and ref:
            self._waiting[(namespace, name)] = str(ref)
        else:
            self._waiting.pop((namespace, name), None)
        if status is not None and st_.get("phase") not in st.TERMINAL:
            return []
        return sorted(w for (ns, w), ref_ in self._waiting.items() if ns == namespace and ref_ == name)

    def waits_for(self, namespace: str, name: str) -> Optional[str]:
        """The job `name` waits for, as the watch last showed it (None: it does not wait)."""
        return self._waiting.get((namespace, name))


_start_waiters = StartWaiters()


def restore_metrics(namespace: str, name: str, status: Any) -> None:
    """The training series of a job as its status has them: after an operator restart the watch's
    first events re-export finished and running jobs alike (not only the ones polled later)."""
    st_ = dict(status or {})
    if st_.get("progress"):
        METRICS.set_progress(namespace, name, dict(st_["progress"]))
    METRICS.set_costs(namespace, name, st_)


def _is_running(status: Optional[Mapping[str, Any]], spec: Optional[Mapping[str, Any]], **_: Any) -> bool:
    return (status or {}).get("phase") in (st.RUNNING, st.EVALUATING) and _backend_name(spec) == "kubernetes"


class ProgressPoller:
    """The FineTuneJobs in phase Running or Evaluating (backend: kubernetes) as the watch last
    showed them, and one task that reads the progress of each every `interval` seconds, at most
    `concurrency` at a time. Needs no finalizer (a kopf timer per object would add one) and reads
    nothing when a job has just started (its pod is not there yet).

    It also keeps the jobs Pending on pods that have not started (:func:`st.waiting_for_pods`) and
    reconciles each every `pending_interval` seconds: a pod that cannot be scheduled or pulled
    changes no Job, so no Job event would tell the operator why it waits."""

    def __init__(self, concurrency: int = 8) -> None:
        self.concurrency = concurrency
        self._running: dict[tuple[str, str], dict[str, Any]] = {}  # -> status
        self._pending: set[tuple[str, str]] = set()
        self._task: Optional[asyncio.Task[None]] = None

    def track(self, namespace: str, name: str, status: Any, spec: Any) -> None:
        key = (namespace, name)
        if _is_running(status, spec):
            self._running[key] = json.loads(json.dumps(dict(status or {})))
        else:
            self._running.pop(key, None)
        if _backend_name(spec) == "kubernetes" and st.waiting_for_pods(dict(status or {})):
            self._pending.add(key)
        else:
            self._pending.discard(key)

    def forget(self, namespace: str, name: str) -> None:
        self._running.pop((namespace, name), None)
        self._pending.discard((namespace, name))

    def running(self) -> list[tuple[str, str]]:
        return sorted(self._running)

    def pending(self) -> list[tuple[str, str]]:
        return sorted(self._pending)

    def start(self, interval: float, pending_interval: Optional[float] = None) -> None:
        """Start polling in the running event loop (the operator's startup)."""
        self._running.clear()
        self._pending.clear()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(interval), name="tuneop-progress")
        self._pending_task: Optional[asyncio.Task[None]] = loop.create_task(
            self._pending_loop(pending_interval or interval), name="tuneop-pending-pods"
        )

    async def _pending_loop(self, interval: float) -> None:
        log = logging.getLogger("tuneop")
        while True:
            await asyncio.sleep(interval)
            if not await self._leading(log):
                continue
            for namespace, name in self.pending():
                try:
                    await reconcile_or_report(namespace, name, log, prefetch=True)
                except Exception as e:  # noqa: BLE001  (the loop must outlive any one failure)
                    log.warning(f"reconcile of pending FineTuneJob {namespace}/{name} failed: {e!r}")

    async def stop(self) -> None:
        tasks = [self._task, getattr(self, "_pending_task", None)]
        self._task = self._pending_task = None
        for task in tasks:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _loop(self, interval: float) -> None:
        log = logging.getLogger("tuneop")
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._leading(log):
                    continue
                await self.poll_all(log)
            except Exception as e:  # noqa: BLE001  (the loop must outlive any one failure)
                log.warning(f"progress polling failed: {e!r}")

    async def _leading(self, log: logging.Logger) -> bool:
        """Whether this replica acts now (kopf peering; always without it). A replica paused in
        favour of another one neither polls nor reconciles what it tracked while it led."""
        if CONFIG.peering is None:
            return True  # standalone: no peering object to read
        try:
            return await still_leading(kube.client(), CONFIG.peering)
        except kube.ApiError as e:
            log.warning(f"peering object not read ({e}): this round is skipped")
            return False

    async def poll_all(self, logger: logging.Logger) -> None:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(namespace: str, name: str) -> None:
            async with sem:
                if (namespace, name) in self._running:
                    await poll_progress(namespace, name, self._running[(namespace, name)], logger)

        results = await asyncio.gather(*(one(ns, n) for ns, n in self.running()), return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                logger.warning(f"progress not read: {r!r}")


_poller = ProgressPoller()


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


async def read_log_tail(namespace: str, name: str) -> Optional[str]:
    """The tail of the training pod's log (rank 0); None while there is none to read."""
    kc = kube.client()
    job = await kc.get("batch/v1", "Job", b.training_job_name(name), namespace)
    if job is None:
        return None
    pods = st.pods_of(job, await kc.list("v1", "Pod", namespace, label_selector={b.OWNER_LABEL: name}))
    pod = pick_progress_pod(pods)
    if pod is None:
        return None
    try:
        return await kc.pod_log(
            namespace, pod["metadata"]["name"], container=b.TRAINER_CONTAINER,
            tail_lines=CONFIG.log_tail_lines,
        )
    except kube.ApiError:
        return None  # the container may not have started yet


async def poll_progress(
    namespace: str, name: str, old: Optional[dict[str, Any]], logger: logging.Logger
) -> None:
    """Read one running job's log tail: metrics, and the status (progress; phase Evaluating once
    the trainer scores the test split, with one Event) when it changed. `old`: its status as the
    watch last showed it."""
    try:
        text = await read_log_tail(namespace, name)
    except kube.ApiError as e:
        logger.debug(f"progress not read: {e}")
        return
    if not text:
        return
    progress = st.parse_progress(text)
    if progress:
        METRICS.set_progress(namespace, name, progress)
    async with _lock(namespace, name):
        status = dict(old or {})
        patch, events = st.progress_update(status, text, now=now_iso(), generation=status.get("observedGeneration"))
        if events:
            # a phase change: decide it on the status as it is now, not as the watch last showed it
            fresh = await get_live(kube.client(), API_VERSION, KIND, name, namespace)
            if fresh is None:
                return
            status = dict(fresh.get("status") or {})
            patch, events = st.progress_update(
                status, text, now=now_iso(), generation=(fresh.get("metadata") or {}).get("generation"),
            )
        if patch is None:
            return
        body = await kube.client().patch(API_VERSION, KIND, name, namespace, patch, subresource="status")
    for ev in events:
        if body:
            EVENTS.post(kube.client(), typed(dict(body), API_VERSION, KIND), ev["type"], ev["reason"], ev["message"])
        logger.info("%s: %s", ev["reason"], ev["message"])


# ---------------------------------------------------------------------------------- registration


def register(registry: Optional[kopf.OperatorRegistry] = None, config: Optional[OperatorConfig] = None) -> kopf.OperatorRegistry:
    """Register every FineTuneJob handler in `registry` (default: kopf's default registry)."""
    global CONFIG
    if config is not None:
        CONFIG = config
    reg = registry if registry is not None else kopf.get_default_registry()
    _observed.clear()
    ftj = (GROUP, VERSION, PLURAL)
    kopf.on.startup(registry=reg)(startup)
    kopf.on.cleanup(registry=reg)(cleanup)
    kopf.on.login(registry=reg)(login)
    # kopf's handler protocols type `namespace` as `str | None` (None only for cluster-scoped
    # resources); FineTuneJobs are namespaced, so these handlers take a str.
    kopf.on.create(*ftj, registry=reg, id="reconcile")(on_change)  # type: ignore[arg-type]  # namespace: see above
    kopf.on.update(*ftj, registry=reg, id="reconcile-spec", field="spec")(on_change)  # type: ignore[arg-type]  # namespace: see above
    kopf.on.resume(*ftj, registry=reg, id="reconcile-resume")(on_change)  # type: ignore[arg-type]  # namespace: see above
    kopf.on.event(*ftj, registry=reg, id="phase-metrics")(on_ftj_event)  # type: ignore[arg-type]  # namespace: see above
    kopf.on.event(
        "batch", "v1", "jobs", registry=reg, id="child-job",
        labels={b.MANAGED_BY: "tuneop", b.OWNER_LABEL: kopf.PRESENT},
    )(on_job_event)
    kopf.timer(
        *ftj, registry=reg, id="retry", interval=CONFIG.retry_interval,
        initial_delay=CONFIG.retry_interval, when=_is_waiting,
    )(retry_timer)  # type: ignore[arg-type]  # namespace: see above
    for name in backends.names():
        backends.get(name).register(host(), reg, ftj)
    return reg
