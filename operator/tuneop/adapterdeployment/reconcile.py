"""Which adapters an AdapterDeployment serves, where, and what to do about it. Pure: no I/O.

- :func:`desired_adapters`: the spec + the referenced FineTuneJobs -> one entry per adapter
  ``{name, path, sha256, ready, reason, requires}``. ``path`` is the adapter directory inside a
  vLLM pod; ``requires`` names what the pod must have for that path to exist (``pvc:<claim>``
  mounted, or ``url:<adapter>`` fetched by an init container). An adapter whose FineTuneJob has
  not Succeeded (or does not exist) waits: ``ready`` False and ``reason`` names the job and phase.
- :func:`plan`: desired adapters + what each ready pod serves -> :class:`Action` list (load the
  missing ones on every ready pod, unload the extra ones; the base model is never touched).
- :func:`adapter_status` and :func:`reduce_status`: the AdapterDeployment's ``status``.

Paths inside a vLLM pod (PVC ``X`` is mounted read-only at ``/mnt/pvc/X``):

- ``source.pvc``: ``/mnt/pvc/<claim>/<path>``
- ``fineTuneJobRef``: ``/mnt/pvc/<output claim>/<output path>/adapter`` (from the job's spec)
- ``source.url``: ``/adapters/<name>`` (an emptyDir filled by the ``fetch`` init containers)
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from ..api.adapterdeployment import AdapterDeploymentSpec
from ..finetunejob.reconcile import find_condition, make_condition
from ..jobconfig import pod_pvc_dir

URL_ADAPTER_ROOT = "/adapters"
# On each vLLM pod: the URL adapters its init containers fetched (comma-separated names).
URL_ADAPTERS_ANNOTATION = "tuneop.dev/url-adapters"
SUCCEEDED = "Succeeded"

# Adapter states (status.adapters[].state)
WAITING = "Waiting"
PENDING = "Pending"
LOADED = "Loaded"
FAILED = "Failed"

# Condition types and reasons
ADAPTERS_READY = "AdaptersReady"
AVAILABLE = "Available"
READY = "Ready"
PODS_HEALTHY = "PodsHealthy"
SPEC_INVALID = "SpecInvalid"


def child_name(name: str) -> str:
    """Deployment, Service and HPA of an AdapterDeployment: ``<name>-vllm``."""
    return f"{name}-vllm"


def endpoint(name: str, namespace: str, port: int) -> str:
    return f"http://{child_name(name)}.{namespace}.svc:{port}/v1"


# ---------------------------------------------------------------------------------- desired


def ftj_output(ftj: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """(claim, path) of a FineTuneJob's output PVC, read from its spec; None if it has none."""
    pvc = (((ftj.get("spec") or {}).get("output") or {}).get("pvc")) or {}
    claim = pvc.get("claimName")
    if not claim:
        return None
    return claim, str(pvc.get("path") or "")


def ftj_adapter_path(ftj: Mapping[str, Any]) -> Optional[str]:
    out = ftj_output(ftj)
    if out is None:
        return None
    claim, path = out
    return posixpath.join(pod_pvc_dir(claim), path, "adapter") if path else posixpath.join(pod_pvc_dir(claim), "adapter")


def desired_adapters(
    spec: AdapterDeploymentSpec, finetunejobs: Mapping[str, Optional[Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """One entry per spec adapter, in spec order (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for a in spec.adapters:
        entry: dict[str, Any] = {"name": a.name, "path": None, "sha256": None, "ready": True, "reason": "",
                                 "requires": None}
        if a.source is not None:
            entry["sha256"] = a.source.sha256
            if a.source.pvc is not None:
                p = a.source.pvc
                entry["path"] = posixpath.join(pod_pvc_dir(p.claim_name), p.path) if p.path else pod_pvc_dir(p.claim_name)
                entry["requires"] = f"pvc:{p.claim_name}"
            else:
                entry["path"] = posixpath.join(URL_ADAPTER_ROOT, a.name)
                entry["requires"] = f"url:{a.name}"
        else:
            ref = a.fine_tune_job_ref
            assert ref is not None
            ftj = finetunejobs.get(ref.name)
            if not ftj:
                entry.update(ready=False, reason=f"FineTuneJob {ref.name} not found")
            else:
                out_pvc = ftj_output(ftj)
                if out_pvc is not None:
                    entry["path"] = ftj_adapter_path(ftj)
                    entry["requires"] = f"pvc:{out_pvc[0]}"
                status = ftj.get("status") or {}
                phase = status.get("phase") or "Pending"
                entry["sha256"] = (status.get("adapter") or {}).get("sha256")
                if phase != SUCCEEDED:
                    entry.update(ready=False, reason=f"FineTuneJob {ref.name} is {phase}")
                elif out_pvc is None:
                    entry.update(ready=False, reason=f"FineTuneJob {ref.name} has no output PVC")
        out.append(entry)
    return out


def adapter_claims(spec: AdapterDeploymentSpec, finetunejobs: Mapping[str, Optional[Mapping[str, Any]]]) -> list[str]:
    """PVCs holding adapters (source.pvc claims + output PVCs of referenced FineTuneJobs), sorted.
    A FineTuneJob that does not exist yet contributes nothing (its claim is mounted once it does)."""
    claims = set()
    for d in desired_adapters(spec, finetunejobs):
        req = d.get("requires") or ""
        if req.startswith("pvc:"):
            claims.add(req[4:])
    return sorted(claims)


def url_adapters(spec: AdapterDeploymentSpec) -> list[tuple[str, str, Optional[str]]]:
    """(name, url, sha256) of every URL adapter, in spec order."""
    return [
        (a.name, a.source.url, a.source.sha256)
        for a in spec.adapters
        if a.source is not None and a.source.url is not None
    ]


# ---------------------------------------------------------------------------------- plan


@dataclass(frozen=True, order=True)
class Action:
    pod: str
    op: str  # "load" | "unload"
    name: str
    path: Optional[str] = None


def plan(
    desired: Iterable[Mapping[str, Any]],
    loaded_per_pod: Mapping[str, Iterable[str] | Mapping[str, Optional[str]]],
    *,
    provides: Optional[Mapping[str, set[str]]] = None,
    base_model: Optional[str] = None,
    reload: Iterable[str] = (),
) -> list[Action]:
    """What to do on each (ready) pod so that it serves exactly the ready desired adapters.

    loaded_per_pod: pod -> names it serves (or name -> path it was loaded from; a different path
    than desired means unload + load). provides: pod -> the ``requires`` keys the pod can satisfy
    (mounted claims, fetched URL adapters); an adapter a pod cannot reach is neither loaded there
    nor unloaded (the pod is about to be replaced by the rolling update). None: every pod has all.
    reload: names to unload and load again everywhere (e.g. the FineTuneJob produced a new sha256).
    The base model (``base_model``) is never unloaded. Order: pods by name; per pod, unloads
    (by name) before loads (by name), so that ``maxLoras`` slots are freed first.
    """
    want = {d["name"]: d for d in desired if d.get("ready") and d.get("path")}
    reload_set = set(reload)
    actions: list[Action] = []
    for pod in sorted(loaded_per_pod):
        raw = loaded_per_pod[pod]
        loaded: dict[str, Optional[str]] = dict(raw) if isinstance(raw, Mapping) else {n: None for n in raw}
        has = None if provides is None else provides.get(pod, set())
        unloads: list[Action] = []
        loads: list[Action] = []
        for name in sorted(loaded):
            if base_model is not None and name == base_model:
                continue
            d = want.get(name)
            if d is None:
                unloads.append(Action(pod, "unload", name))
                continue
            if has is not None and d.get("requires") and d["requires"] not in has:
                continue
            stale = loaded[name] is not None and loaded[name] != d["path"]
            if stale or name in reload_set:
                unloads.append(Action(pod, "unload", name))
                loads.append(Action(pod, "load", name, d["path"]))
        for name in sorted(want):
            if name in loaded:
                continue
            d = want[name]
            if has is not None and d.get("requires") and d["requires"] not in has:
                continue
            loads.append(Action(pod, "load", name, d["path"]))
        actions += unloads + sorted(loads)
    return actions


def pod_provides(pod: Mapping[str, Any]) -> set[str]:
    """What a vLLM pod can serve from: ``pvc:<claim>`` per mounted claim, ``url:<name>`` per
    URL adapter fetched by its init containers (annotation ``tuneop.dev/url-adapters``)."""

    spec = pod.get("spec") or {}
    out = {
        f"pvc:{v['persistentVolumeClaim']['claimName']}"
        for v in spec.get("volumes") or []
        if (v.get("persistentVolumeClaim") or {}).get("claimName")
    }
    ann = ((pod.get("metadata") or {}).get("annotations") or {}).get(URL_ADAPTERS_ANNOTATION) or ""
    out |= {f"url:{n}" for n in ann.split(",") if n}
    return out


def pod_ready(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    st = pod.get("status") or {}
    if st.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


# ---------------------------------------------------------------------------------- status


def adapter_status(
    desired: Iterable[Mapping[str, Any]],
    loaded_per_pod: Mapping[str, Iterable[str]],
    *,
    failures: Optional[Mapping[str, str | Mapping[str, str]]] = None,
    previous: Iterable[Mapping[str, Any]] = (),
    now: str,
) -> list[dict[str, Any]]:
    """status.adapters: per adapter its state, message, path, sha256 and the pods serving it
    (each with ``since``: kept from the previous status while the pod keeps serving it).

    Waiting: its FineTuneJob has not Succeeded. Failed: the last load failed (``failures``:
    name -> message, or ``{message, reason}`` whose reason, e.g. ``BaseModelMismatch``, becomes the
    entry's ``reason``; ``sha256`` then stays the previous one, so that a failed reload of a new
    sha256 is tried again). Loaded: every ready pod (at least one) serves it. Pending: otherwise.
    """
    failures = failures or {}
    prev = {p.get("name"): p for p in previous or ()}
    ready_pods = sorted(loaded_per_pod)
    out: list[dict[str, Any]] = []
    for d in desired:
        name = d["name"]
        old_since = {p.get("pod"): p.get("since") for p in (prev.get(name) or {}).get("pods") or []}
        reason: Optional[str] = None
        serving = [p for p in ready_pods if name in set(loaded_per_pod[p])]
        pods = [{"pod": p, "since": old_since.get(p) or now} for p in serving]
        if not d.get("ready"):
            state, message = WAITING, d.get("reason") or "waiting"
        elif name in failures:
            failure = failures[name]
            state, message = FAILED, str(failure["message"] if isinstance(failure, Mapping) else failure)
            if isinstance(failure, Mapping) and failure.get("reason"):
                reason = str(failure["reason"])
        elif ready_pods and len(serving) == len(ready_pods):
            state, message = LOADED, f"loaded on {len(serving)}/{len(ready_pods)} pods"
        else:
            state = PENDING
            message = f"loaded on {len(serving)}/{len(ready_pods)} pods" if ready_pods else "no ready pod"
        entry: dict[str, Any] = {"name": name, "state": state, "message": message, "pods": pods}
        if reason:
            entry["reason"] = reason
        if d.get("path"):
            entry["path"] = d["path"]
        sha = d.get("sha256")
        if state == FAILED and (prev.get(name) or {}).get("sha256"):
            sha = prev[name]["sha256"]  # not served yet: the next tick compares against the old one
        if sha:
            entry["sha256"] = sha
        out.append(entry)
    return out


def _condition(type_: str, ok: bool, reason: str, message: str, *, now: str, generation: Optional[int],
               previous: list[dict[str, Any]]) -> dict[str, Any]:
    return make_condition(type_, ok, reason, message, now=now, generation=generation,
                          previous=find_condition(previous, type_))


def reduce_status(
    body: Mapping[str, Any],
    *,
    adapters: list[dict[str, Any]],
    deployment: Optional[Mapping[str, Any]],
    now: str,
    spec_error: Optional[str] = None,
    pod_cause: Optional[Mapping[str, Any]] = None,
    serving: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The complete new status of an AdapterDeployment from its per-adapter status and its
    Deployment: conditions AdaptersReady, Available and the aggregate Ready (all with
    observedGeneration), phase (Ready | Progressing | Pending | Failed), replicas, readyReplicas,
    adaptersDesired, adaptersReady, endpoint.

    pod_cause (``tuneop.podcauses.pod_cause``: {reason, message}) is why the pods do not work:
    condition ``PodsHealthy`` is False with its reason and message (True, ``PodsHealthy``, when
    there is none), and while no replica is available ``Available`` (hence ``Ready`` and
    ``status.message``) carries it instead of ``NoReplicasAvailable``. serving
    (``servingdefaults.derive``) is ``status.serving``; None keeps the previous one."""
    meta = body.get("metadata") or {}
    gen = meta.get("generation")
    old = dict(body.get("status") or {})
    prev_conds = list(old.get("conditions") or [])
    spec = body.get("spec") or {}
    port = int(((spec.get("service") or {}).get("port")) or 8000)
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "endpoint": endpoint(meta.get("name", ""), meta.get("namespace", "default"), port),
    }
    if spec_error is not None:
        cond = _condition(READY, False, SPEC_INVALID, spec_error, now=now, generation=gen, previous=prev_conds)
        status.update(phase="Failed", message=spec_error, conditions=[cond], adaptersDesired=0, adaptersReady=0,
                      adapters=[])
        if old.get("serving") is not None:
            status["serving"] = old["serving"]  # what the pods still run with: the floor of the next choice
        return status
    if serving is not None:
        status["serving"] = dict(serving)
    elif old.get("serving") is not None:
        status["serving"] = old["serving"]

    dstat = (deployment or {}).get("status") or {}
    dspec = (deployment or {}).get("spec") or {}
    wanted = int(dspec.get("replicas", spec.get("replicas", 1)) if deployment else spec.get("replicas", 1))
    ready = int(dstat.get("readyReplicas") or 0)
    available = int(dstat.get("availableReplicas") or 0)
    status["replicas"] = int(dstat.get("replicas") or 0)
    status["readyReplicas"] = ready

    if deployment is None:
        av = (False, "DeploymentMissing", f"Deployment {child_name(meta.get('name', ''))} does not exist yet")
    elif wanted == 0:
        av = (False, "ScaledToZero", "replicas is 0")
    elif available >= 1:
        av = (True, "MinimumReplicasAvailable", f"{available}/{wanted} replicas available")
    elif pod_cause:
        av = (False, str(pod_cause["reason"]), f"0/{wanted} replicas available: {pod_cause['message']}")
    else:
        av = (False, "NoReplicasAvailable", f"0/{wanted} replicas available")
    ph = (False, str(pod_cause["reason"]), str(pod_cause["message"])) if pod_cause else \
        (True, PODS_HEALTHY, "no pod problem found")

    counts = {s: sum(1 for a in adapters if a["state"] == s) for s in (WAITING, PENDING, LOADED, FAILED)}
    total = len(adapters)
    if counts[FAILED]:
        names = ", ".join(a["name"] for a in adapters if a["state"] == FAILED)
        ar = (False, "AdapterLoadFailed", f"failed to load: {names}")
    elif counts[WAITING]:
        names = ", ".join(f"{a['name']} ({a['message']})" for a in adapters if a["state"] == WAITING)
        ar = (False, "AdaptersWaiting", f"waiting: {names}")
    elif counts[PENDING]:
        names = ", ".join(a["name"] for a in adapters if a["state"] == PENDING)
        ar = (False, "AdaptersPending", f"not yet loaded on every ready pod: {names}")
    else:
        ar = (True, "AllAdaptersLoaded", f"{total} adapters loaded on {ready} pods" if total else "no adapters")

    if av[0] and ar[0]:
        rd = (True, "Ready", f"{ready} pods serving the base model and {total} adapters")
        phase = "Ready"
    elif not av[0]:
        rd = (False, av[1], av[2])
        phase = "Pending"
    else:
        rd = (False, ar[1], ar[2])
        phase = "Progressing"
    status["conditions"] = [
        _condition(AVAILABLE, *av, now=now, generation=gen, previous=prev_conds),
        _condition(ADAPTERS_READY, *ar, now=now, generation=gen, previous=prev_conds),
        _condition(READY, *rd, now=now, generation=gen, previous=prev_conds),
        _condition(PODS_HEALTHY, *ph, now=now, generation=gen, previous=prev_conds),
    ]
    status.update(
        phase=phase,
        message=rd[2],
        adaptersDesired=total,
        adaptersReady=counts[LOADED],
        adapters=adapters,
    )
    return status
