"""backend: kubernetes: the training runs in Jobs on this cluster (TRL + PEFT in the trainer image).

Children: ``<name>-config`` (ConfigMap: the resolved job config), ``<name>-validate`` (a Job
checking PVC/URL datasets), ``<name>-train`` (the training Job; Indexed, with a headless Service,
for several nodes). Its reducer is :func:`tuneop.finetunejob.reconcile.reconcile_kubernetes`; its builders are in
:mod:`tuneop.finetunejob.builders`. The training pod's progress is read by the FineTuneJob glue's
progress poller (the pods' logs).
"""
from __future__ import annotations

from typing import Any, Optional

import kopf

from .. import kube
from ..api.finetunejob import FineTuneJobSpec
from ..finetunejob import builders as b
from ..finetunejob import gang
from ..finetunejob import reconcile as st
from .base import Host, ReduceOptions, check_inline_dataset, gather


def read_ahead(kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec) -> None:
    """Start the reads :func:`observe` makes first for a FineTuneJob nothing has reconciled yet:
    its dependencies (its children are assumed absent then: see the glue's first_reconcile)."""
    ns = body["metadata"]["namespace"]
    for kind, dep, _ in st.dependencies(spec):
        kc.read_ahead("v1", kind, dep, ns)


def read_children(kc: kube.KubeClient, ns: str, name: str) -> Any:
    """The ConfigMap, validation Job and training Job of a FineTuneJob (backend: kubernetes)."""
    return gather(
        kc.get("v1", "ConfigMap", b.config_map_name(name), ns),
        kc.get("batch/v1", "Job", b.validation_job_name(name), ns),
        kc.get("batch/v1", "Job", b.training_job_name(name), ns),
    )


async def observe(
    kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec, children: Optional[list[Any]] = None
) -> st.Observed:
    """What exists for `body`. `children`: what :func:`read_children` returned, when it was read
    together with the FineTuneJob itself."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    # Every independent read at once: the children first (they decide what else matters), then
    # the pods of existing Jobs and the dependencies (only needed before the training Job).
    obs = st.Observed()
    if children is None:
        children = await read_children(kc, ns, name)
    obs.config_map, obs.validation_job, obs.training_job = children
    deps = [] if (
        obs.training_job is not None or st.is_settled(body)
    ) else st.dependencies(spec)
    reads: list[Any] = []
    # restarting a multi-node gang: the failed Job's pods, until they stop (finetunejob/gang.py)
    regang = obs.training_job is None and spec.resources.nodes > 1 and gang.restarts_of(body.get("status")) > 0
    list_pods = bool(obs.validation_job or obs.training_job or regang)
    if list_pods:
        reads.append(kc.list("v1", "Pod", ns, label_selector={b.OWNER_LABEL: name}))
    if spec.resources.nodes > 1:
        reads.append(kc.get("v1", "Service", b.service_name(name), ns))
    # the dependencies from the API server's watch cache (absence is read again from etcd): an
    # object's existence and content a moment old, as any read is once used
    results = await gather(*reads, *(kc.get_recent("v1", kind, dep, ns) for kind, dep, _ in deps))
    if list_pods:
        pods = results.pop(0)
        obs.validation_pods = st.pods_of(obs.validation_job, pods)
        obs.training_pods = (gang.pods_named(b.training_job_name(name), pods) if regang
                             else st.pods_of(obs.training_job, pods))
    if spec.resources.nodes > 1:
        obs.service = results.pop(0)
    waiting = [p for p in st.active_pods([*obs.validation_pods, *obs.training_pods]) if not st.pod_running(p)]
    if waiting and st.waiting_for_pods(body.get("status")):
        # a pod whose volumes cannot be mounted says so only in Events (FailedMount): read them while
        # the job is already known to wait on its pods, never on the happy path
        names = {(p.get("metadata") or {}).get("name") for p in waiting}
        events = await kc.list("v1", "Event", ns, field_selector={"involvedObject.kind": "Pod", "type": "Warning"})
        obs.pod_events = [e for e in events if (e.get("involvedObject") or {}).get("name") in names]
    if not deps:
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


class KubernetesBackend:
    name = "kubernetes"
    prefetch = True

    def check(self, spec: FineTuneJobSpec) -> list[str]:
        return []  # everything it cannot do is a status of its reducer (e.g. UnsupportedHardware)

    def children(self, ftj: dict[str, Any], spec: FineTuneJobSpec, *, image: str) -> list[dict[str, Any]]:
        return b.build_children(ftj, spec, image=image)

    async def observe(
        self, host: Host, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec,
        children: Optional[list[Any]] = None,
    ) -> st.Observed:
        return await observe(kc, body, spec, children)

    def read_ahead(self, kc: kube.KubeClient, body: dict[str, Any], spec: FineTuneJobSpec) -> None:
        read_ahead(kc, body, spec)

    def reconcile(self, start: st.Start, options: ReduceOptions) -> st.Decision:
        return st.reconcile_kubernetes(start, image=options.image, trainer_defaults=options.trainer_defaults,
                                       gpu_prices=options.gpu_prices)

    async def act(
        self, host: Host, kc: kube.KubeClient, body: dict[str, Any], decision: st.Decision, logger: Any
    ) -> None:
        return None  # nothing outside Kubernetes

    def register(self, host: Host, registry: kopf.OperatorRegistry, resource: tuple[str, str, str]) -> None:
        return None  # the FineTuneJob glue's Job watch and progress poller serve it


BACKEND = KubernetesBackend()
