"""kopf handlers of the AdapterDeployment. Thin glue around adapterdeployment/builders.py and
adapterdeployment/reconcile.py (pure) and serving/client.py (``AsyncVllmClient``: vLLM's runtime LoRA API).

Every trigger ends in :func:`reconcile_object`, which, under a per-object lock:

1. reads the AdapterDeployment and the FineTuneJobs it references, fresh from the API;
2. ensures the children: Deployment / Service / HPA ``<name>-vllm`` (create, 409 = exists; the
   Deployment's pod template is patched only when its ``tuneop.dev/template-hash`` changed, which
   rolls the pods; replicas are patched on their own; the HPA is deleted when autoscaling is off);
3. lists the vLLM pods and keeps only the Deployment's own (:func:`tuneop.adapterdeployment.builders.trusted_pods`:
   controller ReplicaSet owned by the Deployment, by uid, and its ``pod-template-hash``; a look-alike
   pod gets no admin call, no place in the status and one Warning Event ``UntrustedPod``), asks each
   ready one which adapters it serves (``GET /v1/models``), applies
   :func:`tuneop.adapterdeployment.reconcile.plan` through the admin client (load missing, unload extra; a
   restarted pod serves nothing, so everything is loaded again), one Event per adapter
   loaded / unloaded / failed;
4. finds why the pods do not work, if they do not (:func:`tuneop.podcauses.pod_cause` over the
   Deployment and all its pods, ready or not; for a crash loop the last line of the previous
   container's log, read once per restart of that container), one Warning Event per distinct
   cause;
5. writes the status (per adapter: state and the pods serving it; conditions AdaptersReady,
   Available, Ready, PodsHealthy) and the metrics.

The API server's warnings when the Deployment is created or its template patched (Pod
Security's ``warn`` mode) are one Warning Event ``DeploymentWarning`` per distinct text.

Running it twice in a row does nothing the second time. vLLM errors are not handler failures:
the adapter is Failed in the status and the next tick tries again.

Triggers: AdapterDeployment created / spec changed / operator resumed; a timer every
``interval`` seconds; any event of a pod or Deployment labelled with an AdapterDeployment; a
FineTuneJob whose phase, adapter sha256 or output changed (e.g. it just Succeeded) reconciles the
AdapterDeployments that reference it. Which ones do is kept in memory by a kopf index of the
AdapterDeployments (``ad_by_finetunejob``, fed by their watch): a FineTuneJob event costs no API
request unless an AdapterDeployment references it. An index a moment behind loses nothing: an
AdapterDeployment's own create/update handler reads its FineTuneJobs fresh.

Pod admin URL: ``http://<podIP>:8000``; ``admin_urls`` (pod name -> URL) and, only when
``admin_url_annotation`` is on (tests), the pod annotation ``tuneop.dev/admin-url`` override it.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import secrets
import time
from typing import Any, Mapping, Optional

import kopf
from pydantic import ValidationError

from .. import kube, podcauses, workload_defaults
from ..api.adapterdeployment import AdapterDeploymentSpec
from ..finetunejob import handlers as finetunejob
from ..finetunejob.reconcile import merge_patch
from ..glue import ObjectLocks, get_live, now_iso
from ..metrics import METRICS
from ..serving.client import AsyncVllmClient, VllmError
from . import basemodel as bm
from . import builders as b
from . import reconcile as sa
from . import servingdefaults as sd
from . import vllm

GROUP, VERSION, PLURAL = "tuneop.dev", "v1alpha1", "adapterdeployments"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AdapterDeployment"
FTJ_KIND = "FineTuneJob"
ADMIN_URL_ANNOTATION = "tuneop.dev/admin-url"
UNTRUSTED_POD = "UntrustedPod"  # Event reason: a pod with the vLLM pods' labels that is not the Deployment's


@dataclasses.dataclass
class AdapterConfig:
    vllm_image: str = vllm.DEFAULT_IMAGE
    trainer_image: str = b.DEFAULT_TRAINER_IMAGE  # type: ignore[attr-defined]  # the fetch init containers (re-exported)
    interval: float = 10.0
    admin_timeout: float = 60.0
    admin_port: int = b.CONTAINER_PORT
    admin_urls: dict[str, str] = dataclasses.field(default_factory=dict)
    admin_url_annotation: bool = False  # tests only: honor the pod annotation tuneop.dev/admin-url
    # The platform's defaults for vLLM pods (workload_defaults.parse(...)["vllm"] applies).
    workload_defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


CONFIG = AdapterConfig()

_locks = ObjectLocks()
_lock = _locks.get
_failures: dict[tuple[str, ...], str] = {}  # (ns, name, op, adapter) -> last failure posted
_ftj_seen: dict[tuple[str, str], Any] = {}
# (ns, name, adapter) -> (fingerprint, message, monotonic time) of the last base model refusal by a pod
_base_refused: dict[tuple[str, str, str], tuple[tuple[Any, ...], str, float]] = {}
_causes: dict[tuple[str, str], str] = {}  # (ns, name) -> key of the last pod cause posted as an Event
# (ns, name) -> (pod, container, restartCount, last log line) of the last crash-loop log read
_crash_logs: dict[tuple[str, str], tuple[str, str, int, Optional[str]]] = {}
CRASH_LOG_TAIL_LINES = 20
CRASH_LOG_LIMIT_BYTES = 16 * 1024


def admin_url(pod: dict[str, Any]) -> Optional[str]:
    meta = pod.get("metadata") or {}
    if meta.get("name") in CONFIG.admin_urls:
        return CONFIG.admin_urls[meta["name"]]
    if CONFIG.admin_url_annotation:
        url = (meta.get("annotations") or {}).get(ADMIN_URL_ANNOTATION)
        if url:
            return url
    ip = (pod.get("status") or {}).get("podIP")
    return f"http://{ip}:{CONFIG.admin_port}" if ip else None


def _event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(body, type=type_, reason=reason, message=message)  # type: ignore[arg-type]  # kopf accepts dicts
    except Exception:  # noqa: BLE001  (outside kopf's context: no event poster)
        logging.getLogger("tuneop").info("%s: %s", reason, message)


# ---------------------------------------------------------------------------------- children


async def ensure_children(
    kc: kube.KubeClient, body: dict[str, Any], spec: Any, ftjs: dict[str, Any]
) -> Optional[dict[str, Any]]:
    """Create or update Deployment, Service, HPA; returns the Deployment as the API has it."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    child = b.child_name(name)
    want = b.build_deployment(body, spec, finetunejobs=ftjs, image=CONFIG.vllm_image,
                              trainer_image=CONFIG.trainer_image)
    dep = await kc.get("apps/v1", "Deployment", child, ns)
    if dep is None:
        with kube.capture_warnings() as warned:
            dep, created = await kc.create(want, ns)
        _api_warnings(body, f"creating Deployment {child}", warned)
        if created:
            _event(body, "Normal", "DeploymentCreated", f"Deployment {child} created")
        else:
            dep = await kc.get("apps/v1", "Deployment", child, ns)
    else:
        patch: dict[str, Any] = {}
        want_hash = want["metadata"]["annotations"][b.TEMPLATE_HASH_ANNOTATION]
        tmpl = (dep.get("spec") or {}).get("template") or {}
        have_hash = ((tmpl.get("metadata") or {}).get("annotations") or {}).get(b.TEMPLATE_HASH_ANNOTATION)
        if have_hash != want_hash:
            patch = {
                "metadata": {"annotations": {b.TEMPLATE_HASH_ANNOTATION: want_hash}},
                "spec": {"template": merge_patch(tmpl, want["spec"]["template"])},
            }
        if "replicas" in want["spec"] and (dep.get("spec") or {}).get("replicas") != want["spec"]["replicas"]:
            patch.setdefault("spec", {})["replicas"] = want["spec"]["replicas"]
        if patch:
            with kube.capture_warnings() as warned:
                dep = await kc.patch("apps/v1", "Deployment", child, ns, patch)
            _api_warnings(body, f"patching Deployment {child}", warned)
            if have_hash != want_hash:
                _event(body, "Normal", "RollingUpdate",
                       f"pod template of Deployment {child} changed ({have_hash} -> {want_hash}): pods roll")
    svc_want = b.build_service(body, spec)
    svc = await kc.get("v1", "Service", child, ns)
    if svc is None:
        await kc.create(svc_want, ns)
    else:
        have = svc.get("spec") or {}
        sub = {k: svc_want["spec"][k] for k in ("type", "selector", "ports")
               if _differs(have.get(k), svc_want["spec"][k])}
        if sub:
            await kc.patch("v1", "Service", child, ns, {"spec": sub})
    hpa_want = b.build_hpa(body, spec)
    hpa = await kc.get("autoscaling/v2", "HorizontalPodAutoscaler", child, ns)
    if hpa_want is None:
        if hpa is not None and ((hpa.get("metadata") or {}).get("labels") or {}).get(b.OWNER_LABEL) == name:
            await kc.delete("autoscaling/v2", "HorizontalPodAutoscaler", child, ns)
    elif hpa is None:
        await kc.create(hpa_want, ns)
    elif _differs(hpa.get("spec"), hpa_want["spec"]):
        await kc.patch("autoscaling/v2", "HorizontalPodAutoscaler", child, ns, {"spec": hpa_want["spec"]})
    return dep


def _api_warnings(body: dict[str, Any], doing: str, texts: list[str]) -> None:
    """One Warning Event per distinct API server warning text (per AdapterDeployment)."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for text in texts:
        key = (ns, name, "apiwarning", text)
        if key not in _failures:
            _failures[key] = text
            _event(body, "Warning", "DeploymentWarning",
                   podcauses.shorten(f"the API server warned when {doing}: {text}"))


def _differs(have: Any, want: Any) -> bool:
    """True when `want` is not contained in `have` (server defaults in `have` are ignored)."""
    if isinstance(want, dict):
        return not isinstance(have, dict) or any(_differs(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return (not isinstance(have, list) or len(have) != len(want)
                or any(_differs(h, w) for h, w in zip(have, want)))
    return have != want


# ---------------------------------------------------------------------------------- adapters


async def ensure_guard(kc: kube.KubeClient, body: dict[str, Any]) -> None:
    """ConfigMap ``<name>-vllm-guard`` with the current guard source (patched after an upgrade)."""
    ns = body["metadata"]["namespace"]
    want = b.build_guard_configmap(body)
    cm_name = want["metadata"]["name"]
    have = await kc.get("v1", "ConfigMap", cm_name, ns)
    if have is None:
        await kc.create(want, ns)
    elif ((have.get("metadata") or {}).get("annotations") or {}).get(b.GUARD_SHA_ANNOTATION) != \
            want["metadata"]["annotations"][b.GUARD_SHA_ANNOTATION]:
        await kc.patch("v1", "ConfigMap", cm_name, ns,
                       {"metadata": {"annotations": want["metadata"]["annotations"]}, "data": want["data"]})


def _token_of(secret: Optional[dict[str, Any]]) -> Optional[str]:
    raw = ((secret or {}).get("data") or {}).get(vllm.ADMIN_TOKEN_KEY)
    if not raw:
        return None
    try:
        tok = base64.b64decode(raw).decode().strip()
    except ValueError:
        return None
    return tok if len(tok) >= 16 else None


async def ensure_admin_token(kc: kube.KubeClient, body: dict[str, Any]) -> Optional[str]:
    """The admin token from Secret ``<name>-vllm-admin``; a missing Secret is (re)created with a
    fresh random token. None (and a Warning) when the Secret exists without a usable token: it is
    not overwritten (the operator may only get and create Secrets); deleting it heals it."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    sname = b.admin_secret_name(name)
    secret = await kc.get("v1", "Secret", sname, ns)
    if secret is None:
        secret, created = await kc.create(b.build_admin_secret(body, secrets.token_urlsafe(32)), ns)
        if created:
            _event(body, "Normal", "AdminCredentialCreated",
                   f"Secret {sname} created: the admin credential of the vLLM pods' adapter API")
        else:
            secret = await kc.get("v1", "Secret", sname, ns)
    token = _token_of(secret)
    key = (ns, name, "secret", sname)
    if token is None:
        if _failures.get(key) != "invalid":
            _failures[key] = "invalid"
            _event(body, "Warning", "AdminCredentialInvalid",
                   f"Secret {sname} has no usable key {vllm.ADMIN_TOKEN_KEY!r}; delete it and tuneop recreates it")
    else:
        _failures.pop(key, None)
    return token


async def _timed(op: str, coro: Any) -> Any:
    started = time.monotonic()
    try:
        out = await coro
    except VllmError:
        METRICS.observe_adapter_operation(op, "error", time.monotonic() - started)
        raise
    METRICS.observe_adapter_operation(op, "success", time.monotonic() - started)
    return out


async def sync_adapters(
    body: dict[str, Any], desired: list[dict[str, Any]], pods: list[dict[str, Any]], admin_token: Optional[str],
    logger: kopf.Logger, *, spec: Optional[AdapterDeploymentSpec] = None,
    finetunejobs: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, set[str]], dict[str, Any]]:
    """Make every ready pod serve exactly the ready desired adapters. Returns (what each ready
    pod serves afterwards, failures: adapter -> message, or {message, reason} for a base model
    mismatch). Unreachable pods serve nothing. With ``spec``: loads carry the adapter's
    allowBaseModelMismatch, and an adapter refused for its base model (by the operator before any
    pod, :func:`tuneop.adapterdeployment.basemodel.early_refusals`, or by a pod's guard) is not loaded again
    until the refusal no longer stands (:func:`tuneop.adapterdeployment.basemodel.held`)."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    allow = bm.allowed(spec) if spec is not None else {}
    unverified = {a.name: bool(a.allow_unverified) for a in spec.adapters} if spec is not None else {}
    early = bm.early_refusals(spec, finetunejobs or {}, desired) if spec is not None else {}
    by_name = {d["name"]: d for d in desired}
    ready = sorted((p for p in pods if sa.pod_ready(p)), key=lambda p: p["metadata"]["name"])
    clients: dict[str, AsyncVllmClient] = {}
    loaded: dict[str, dict[str, Optional[str]]] = {}
    provides: dict[str, set[str]] = {}
    unreachable: dict[str, str] = {}
    sha = {d["name"]: d.get("sha256") for d in desired}
    for pod in ready:
        pname = pod["metadata"]["name"]
        url = admin_url(pod)
        if url is None:
            unreachable[pname] = "no pod IP"
            continue
        client = AsyncVllmClient(url, admin_token=admin_token, timeout=CONFIG.admin_timeout)
        try:
            loaded[pname] = {n: m.root for n, m in (await client.loaded_adapters()).items()}
        except VllmError as e:
            unreachable[pname] = _explain(e)
            logger.warning(f"vLLM pod {pname} not reachable: {_explain(e)}")
            continue
        clients[pname] = client
        provides[pname] = sa.pod_provides(pod)
    prev = {a.get("name"): a for a in (body.get("status") or {}).get("adapters") or []}
    reload = [
        d["name"] for d in desired
        if d.get("ready") and d.get("sha256")
        and (prev.get(d["name"]) or {}).get("state") in (sa.LOADED, sa.PENDING, sa.FAILED)
        and (prev.get(d["name"]) or {}).get("sha256") not in (None, d["sha256"])
    ]
    failures: dict[str, Any] = {}
    for n, why in early.items():
        failures[n] = {"message": why, "reason": bm.REASON}
        _warn_once(body, (ns, name, "base", n), bm.REASON, f"adapter {n}: {why}")
    for act in sa.plan(desired, loaded, provides=provides, reload=reload):
        client = clients[act.pod]
        key = (ns, name, act.op, act.name)
        if act.op == "load" and spec is not None:
            if act.name in early:
                continue
            fp = bm.fingerprint(spec, by_name[act.name])
            standing = bm.held(_base_refused.get((ns, name, act.name)), fp, time.monotonic())
            if standing is not None:
                failures.setdefault(act.name, {"message": standing, "reason": bm.REASON})
                continue
        try:
            if act.op == "load":
                # "already loaded" is success whatever the path (check_conflict=False: no second request)
                await _timed("load", client.load_adapter(
                    act.name, act.path or "", sha256=sha.get(act.name), check_conflict=False,
                    allow_base_model_mismatch=allow.get(act.name, False),
                    allow_unverified=unverified.get(act.name, False)))
                _base_refused.pop((ns, name, act.name), None)
                loaded[act.pod][act.name] = act.path
                _event(body, "Normal", "AdapterLoaded", f"adapter {act.name} loaded on pod {act.pod} from {act.path}")
            else:
                await _timed("unload", client.unload_adapter(act.name))
                loaded[act.pod].pop(act.name, None)
                _event(body, "Normal", "AdapterUnloaded", f"adapter {act.name} unloaded from pod {act.pod}")
            _failures.pop(key, None)
        except VllmError as e:
            if act.op == "load" and e.reason == bm.GUARD_REASON:
                msg = f"refused by pod {act.pod}: {e.message}"[:1000]
                failures.setdefault(act.name, {"message": msg, "reason": bm.REASON})
                if spec is not None:
                    _base_refused[(ns, name, act.name)] = (bm.fingerprint(spec, by_name[act.name]), msg,
                                                           time.monotonic())
                logger.warning(f"adapter {act.name}: {msg}")
                _warn_once(body, (ns, name, "base", act.name), bm.REASON, f"adapter {act.name}: {msg}")
                continue
            msg = f"{act.op} on pod {act.pod} failed: {_explain(e)}"[:500]
            if act.op == "load":
                failures.setdefault(act.name, msg)
            logger.warning(f"adapter {act.name}: {msg}")
            if _failures.get(key) != msg:
                _failures[key] = msg
                reason = "AdapterLoadFailed" if act.op == "load" else "AdapterUnloadFailed"
                _event(body, "Warning", reason, f"adapter {act.name}: {msg} (retried)")
    serving = {p: set(v) for p, v in loaded.items()}
    for p, why in unreachable.items():
        serving[p] = set()
        if "credential" in why:
            for d in desired:
                if d.get("ready"):
                    failures.setdefault(d["name"], f"pod {p}: {why}")
    return serving, failures


def _warn_untrusted(body: dict[str, Any], untrusted: dict[str, str], logger: kopf.Logger) -> None:
    """One Warning Event ``UntrustedPod`` per pod that carries the vLLM pods' labels but is not the
    Deployment's own (:func:`tuneop.adapterdeployment.builders.trusted_pods`): it gets no admin call."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for pod, why in sorted(untrusted.items()):
        msg = podcauses.shorten(f"pod {pod} has the labels of {b.child_name(name)}'s pods but is not its own "
                                f"({why}): it gets no admin call and does not count in the status")
        if _failures.get((ns, name, UNTRUSTED_POD, pod)) != msg:
            logger.warning(msg)
        _warn_once(body, (ns, name, UNTRUSTED_POD, pod), UNTRUSTED_POD, msg)
    for key in [k for k in _failures if k[:3] == (ns, name, UNTRUSTED_POD) and k[3] not in untrusted]:
        _failures.pop(key, None)  # gone (or trusted now): a later look-alike of that name is warned about again


def _warn_once(body: dict[str, Any], key: tuple[str, ...], reason: str, message: str) -> None:
    """One Warning Event per distinct message under `key`."""
    if _failures.get(key) != message:
        _failures[key] = message
        _event(body, "Warning", reason, message)


def _explain(e: VllmError) -> str:
    """A VllmError for status and Events (never a token: the guard does not echo it)."""
    if e.reason in ("bad_credential", "no_credential_configured"):
        return (f"{e.status} the pod does not have the current admin credential yet ({e.reason}; the kubelet "
                "refreshes Secret volumes within about a minute)")
    if e.reason:
        return f"{e.status} refused by tuneop's guard ({e.reason}): {e.message}"
    return f"{e.status} {e.message}"


# ---------------------------------------------------------------------------------- pods


async def observe_pods(
    kc: kube.KubeClient, body: dict[str, Any], deployment: Optional[dict[str, Any]], pods: list[dict[str, Any]],
    admin_token: Optional[str], logger: kopf.Logger,
) -> Optional[dict[str, Any]]:
    """Why the vLLM pods do not work (None: they do, or are starting). A crash loop gets the last
    line of its previous log: one read per restart of the container (at most one per reconcile),
    none for any other cause."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    cause = podcauses.pod_cause(pods, workload=deployment)
    if not podcauses.needs_log(cause):
        _crash_logs.pop((ns, name), None)
        return cause
    assert cause is not None
    seen = (cause["pod"], cause["container"], int(cause.get("restarts") or 0))
    cached = _crash_logs.get((ns, name))
    if cached is not None and cached[:3] == seen:
        line = cached[3]
    else:
        line = None
        try:
            text = await kc.pod_log(ns, cause["pod"], container=cause["container"], previous=True,
                                    tail_lines=CRASH_LOG_TAIL_LINES, limit_bytes=CRASH_LOG_LIMIT_BYTES)
            line = podcauses.last_log_line(text, secrets=[admin_token])
        except kube.ApiError as e:
            logger.info(f"previous log of pod {cause['pod']} container {cause['container']}: {e.status} {e.reason}")
        _crash_logs[(ns, name)] = (*seen, line)
    return podcauses.with_log_line(cause, line)


def _post_cause(body: dict[str, Any], old_status: dict[str, Any], cause: Optional[dict[str, Any]]) -> None:
    """One Warning Event per distinct pod cause (its ``key``), not one per reconcile."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if cause is None:
        _causes.pop((ns, name), None)
        return
    prev = next((c for c in old_status.get("conditions") or [] if c.get("type") == sa.PODS_HEALTHY), None)
    if podcauses.is_new(cause, _causes.get((ns, name)), prev):
        _event(body, "Warning", cause["reason"], cause["message"])
    _causes[(ns, name)] = cause["key"]


# ---------------------------------------------------------------------------------- reconcile


async def reconcile_object(
    namespace: str, name: str, *, logger: Optional[kopf.Logger] = None
) -> Optional[dict[str, Any]]:
    """Children, adapters, status of one AdapterDeployment; returns the new status (None: gone)."""
    log = logger or logging.getLogger("tuneop")
    started = time.monotonic()
    result = "error"
    try:
        async with _lock(namespace, name):
            kc = kube.client()
            body = await get_live(kc, API_VERSION, KIND, name, namespace)
            if body is None:
                result = "success"
                return None
            old = body.get("status") or {}
            try:
                spec = b.parse_spec(workload_defaults.apply(body.get("spec") or {}, CONFIG.workload_defaults,
                                                            "vllm"))
            except ValidationError as e:
                msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())[:1000]
                status = sa.reduce_status(body, adapters=[], deployment=None, now=now_iso(), spec_error=msg)
                diff = merge_patch(old, status)
                if diff:
                    await kc.patch(API_VERSION, KIND, name, namespace, {"status": diff}, subresource="status")
                    _event(body, "Warning", sa.SPEC_INVALID, msg)
                result = "success"
                return status
            ftjs: dict[str, Any] = {}
            for a in spec.adapters:
                if a.fine_tune_job_ref is not None:
                    ftjs[a.fine_tune_job_ref.name] = await kc.get(API_VERSION, FTJ_KIND, a.fine_tune_job_ref.name, namespace)
            desired = sa.desired_adapters(spec, ftjs)
            await ensure_guard(kc, body)
            admin_token = await ensure_admin_token(kc, body)
            serving = sd.derive(spec, sd.adapter_ranks(spec, ftjs, old.get("serving")), old.get("serving"))
            _serving_changed(body, old.get("serving"), serving)
            deployment = await ensure_children(kc, body, sd.resolved(spec, serving), ftjs)
            labelled = [
                p for p in await kc.list("v1", "Pod", namespace, label_selector=b.selector_labels(name))
                # kmock (and defensive code) : filter by labels ourselves
                if all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v
                       for k, v in b.selector_labels(name).items())
            ]
            # Listed after the pods: a pod's ReplicaSet exists before the pod does.
            replicasets = await kc.list("apps/v1", "ReplicaSet", namespace, label_selector=b.selector_labels(name))
            pods, untrusted = b.trusted_pods(labelled, replicasets, deployment)
            if ((deployment or {}).get("metadata") or {}).get("uid"):
                _warn_untrusted(body, untrusted, log)
            elif untrusted:  # not a pod's fault: no pod is trusted until the Deployment is read back
                log.info(f"Deployment {b.child_name(name)} has no uid yet: no admin call to its pods")
            served, failures = await sync_adapters(body, desired, pods, admin_token, log, spec=spec,
                                                   finetunejobs=ftjs)
            refused = rank_refusals(failures)
            if refused:  # a pod read an adapter's rank (adapter_config.json) and it is above the pods'
                grown = sd.derive(spec, sd.adapter_ranks(spec, ftjs, serving, refused), serving)
                _serving_changed(body, serving, grown)
                if (grown["maxLoraRank"], grown["maxLoras"]) != (serving["maxLoraRank"], serving["maxLoras"]):
                    deployment = await ensure_children(kc, body, sd.resolved(spec, grown), ftjs)
                serving = grown
            cause = await observe_pods(kc, body, deployment, pods, admin_token, log)
            _post_cause(body, old, cause)
            now = now_iso()
            adapters = sa.adapter_status(desired, served, failures=failures, previous=old.get("adapters") or [],
                                         now=now)
            status = sa.reduce_status(body, adapters=adapters, deployment=deployment, now=now, pod_cause=cause,
                                      serving=serving)
            diff = merge_patch(old, status)
            if diff:
                await kc.patch(API_VERSION, KIND, name, namespace, {"status": diff}, subresource="status")
            METRICS.set_adapterdeployment(
                namespace, name,
                desired_replicas=int(((deployment or {}).get("spec") or {}).get("replicas") or spec.replicas),
                ready_replicas=status.get("readyReplicas") or 0,
                desired_adapters=status.get("adaptersDesired") or 0,
                loaded_adapters=status.get("adaptersReady") or 0,
            )
            result = "retry" if failures else "success"
            return status
    finally:
        METRICS.observe_reconcile(KIND, result, time.monotonic() - started)


def rank_refusals(failures: Mapping[str, Any]) -> dict[str, int]:
    """adapter -> its rank, for the loads vLLM refused because the rank is above the pods' maxLoraRank."""
    out: dict[str, int] = {}
    for name, failure in failures.items():
        msg = failure.get("message") if isinstance(failure, Mapping) else failure
        rank = sd.rank_from_error(str(msg or ""))
        if rank is not None:
            out[name] = rank
    return out


def _serving_changed(body: dict[str, Any], old: Optional[Mapping[str, Any]], new: Mapping[str, Any]) -> None:
    """One Normal Event when the pods' maxLoraRank or maxLoras change (the template rolls with them)."""
    if not old or (old.get("maxLoraRank"), old.get("maxLoras")) == (new["maxLoraRank"], new["maxLoras"]):
        return
    _event(body, "Normal", "ServingSettingsChanged",
           podcauses.shorten(f"maxLoraRank {old.get('maxLoraRank')} -> {new['maxLoraRank']}, maxLoras "
                             f"{old.get('maxLoras')} -> {new['maxLoras']}: {new.get('message') or ''}"))


async def _reconcile_quietly(namespace: str, name: str, logger: kopf.Logger) -> bool:
    try:
        await reconcile_object(namespace, name, logger=logger)
        return True
    except kube.ApiError as e:
        logger.warning(f"reconcile of AdapterDeployment {namespace}/{name} failed: {e}")
        return False


# ---------------------------------------------------------------------------------- handlers


async def on_change(namespace: str, name: str, logger: kopf.Logger, **_: Any) -> None:
    """create / update(spec) / resume."""
    if not await _reconcile_quietly(namespace, name, logger):
        raise kopf.TemporaryError("the Kubernetes API refused a request; retrying", delay=15)


async def adapters_timer(namespace: str, name: str, logger: kopf.Logger, **_: Any) -> None:
    """Every `interval` seconds: pods restarted, adapters lost, vLLM errors retried."""
    await _reconcile_quietly(namespace, name, logger)


async def on_child_event(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    """A vLLM pod or the Deployment changed (ready, restarted, scaled): reconcile the owner."""
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(b.OWNER_LABEL)
    if owner and meta.get("namespace"):
        await _reconcile_quietly(meta["namespace"], owner, logger)


def referenced_jobs(spec: Any) -> list[str]:
    """The FineTuneJobs an AdapterDeployment's spec (a dict) names in ``fineTuneJobRef``."""
    return sorted({
        str(ref["name"])
        for a in ((spec or {}).get("adapters") or []) if isinstance(a, dict)
        for ref in [a.get("fineTuneJobRef")] if isinstance(ref, dict) and ref.get("name")
    })


def references(ad: dict[str, Any], ftj_name: str) -> bool:
    return ftj_name in referenced_jobs(ad.get("spec"))


def ad_by_finetunejob(namespace: Optional[str], name: str, spec: Any, **_: Any) -> dict[tuple[Optional[str], str], str]:
    """kopf index: (namespace, FineTuneJob name) -> the AdapterDeployments referencing it."""
    return {(namespace, job): name for job in referenced_jobs(spec)}


def ftj_fingerprint(event_type: Optional[str], body: Mapping[str, Any]) -> Optional[tuple[Any, ...]]:
    """What of a FineTuneJob matters to the AdapterDeployments serving it (None: deleted)."""
    if event_type == "DELETED":
        return None
    st = body.get("status") or {}
    return (
        st.get("phase"), (st.get("adapter") or {}).get("sha256"),
        str(((body.get("spec") or {}).get("output") or {})),
    )


async def on_ftj_event(
    type: Optional[str], body: kopf.Body, name: str, namespace: str, logger: kopf.Logger,
    ad_by_finetunejob: Any = None, **_: Any,
) -> None:
    """A FineTuneJob's phase, adapter or output changed: reconcile the AdapterDeployments that
    reference it (its adapter may now be served, or its claim mounted)."""
    fingerprint = ftj_fingerprint(type, body)
    key = (namespace, name)
    if key in _ftj_seen and _ftj_seen[key] == fingerprint:
        return
    _ftj_seen[key] = fingerprint
    if type == "DELETED":
        _ftj_seen.pop(key, None)
    for ad_name in sorted(set((ad_by_finetunejob or {}).get(key, ()))):
        await _reconcile_quietly(namespace, ad_name, logger)


async def on_ad_event(type: Optional[str], name: str, namespace: str, **_: Any) -> None:
    if type == "DELETED":
        METRICS.forget_adapterdeployment(namespace, name)
        _locks.forget(namespace, name)
        for k in [k for k in _failures if k[:2] == (namespace, name)]:
            _failures.pop(k, None)
        for k in [k for k in _base_refused if k[:2] == (namespace, name)]:
            _base_refused.pop(k, None)
        _causes.pop((namespace, name), None)
        _crash_logs.pop((namespace, name), None)


# ---------------------------------------------------------------------------------- registration


def register(
    registry: Optional[kopf.OperatorRegistry] = None,
    config: Optional[AdapterConfig] = None,
    *,
    with_common: bool = False,
) -> kopf.OperatorRegistry:
    """Register the AdapterDeployment handlers. with_common: also the operator-wide startup,
    login and cleanup handlers (``finetunejob.register`` registers those already)."""
    global CONFIG
    if config is not None:
        CONFIG = config
    _failures.clear()
    _ftj_seen.clear()
    _base_refused.clear()
    _causes.clear()
    _crash_logs.clear()
    reg = registry if registry is not None else kopf.get_default_registry()
    if with_common:
        kopf.on.startup(registry=reg)(finetunejob.startup)
        kopf.on.cleanup(registry=reg)(finetunejob.cleanup)
        kopf.on.login(registry=reg)(finetunejob.login)
    ad = (GROUP, VERSION, PLURAL)
    owned: dict[str, Any] = {b.MANAGED_BY: "tuneop", b.OWNER_LABEL: kopf.PRESENT}
    # kopf's handler protocols type `namespace` as `str | None` (None only for cluster-scoped resources);
    # AdapterDeployments are namespaced, so these handlers take a str.
    kopf.on.create(*ad, registry=reg, id="ad-reconcile")(on_change)  # type: ignore[arg-type]
    kopf.on.update(*ad, registry=reg, id="ad-reconcile-spec", field="spec")(on_change)  # type: ignore[arg-type]
    kopf.on.resume(*ad, registry=reg, id="ad-reconcile-resume")(on_change)  # type: ignore[arg-type]
    kopf.on.event(*ad, registry=reg, id="ad-metrics")(on_ad_event)  # type: ignore[arg-type]
    kopf.timer(*ad, registry=reg, id="ad-adapters", interval=CONFIG.interval)(adapters_timer)  # type: ignore[arg-type]
    kopf.on.event("v1", "pods", registry=reg, id="ad-pod", labels=owned)(on_child_event)  # type: ignore[arg-type]
    kopf.on.event("apps", "v1", "deployments", registry=reg, id="ad-deployment", labels=owned)(on_child_event)  # type: ignore[arg-type]
    kopf.index(*ad, registry=reg, id="ad_by_finetunejob")(ad_by_finetunejob)
    kopf.on.event(GROUP, VERSION, "finetunejobs", registry=reg, id="ad-finetunejob")(on_ftj_event)  # type: ignore[arg-type]
    return reg
