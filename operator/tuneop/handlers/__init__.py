"""The operator process: kopf handlers of tuneop's resources, and :func:`run_operator`."""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from typing import Any, Optional

import kopf

from .. import kube, metrics
from ..adapterdeployment import handlers as adapterdeployment
from ..adapterdeployment import vllm
from ..finetunejob import handlers as finetunejob
from ..finetunejob.builders import DEFAULT_IMAGE
from ..finetunejob.handlers import login
from ..glue import PEERING_GROUP, PeeringSelf, peering_object


def default_priority(now: Optional[float] = None, rnd: Optional[random.Random] = None) -> int:
    """The kopf peering priority of a replica started without ``--priority``: the older the replica,
    the higher (so a replica that starts later, e.g. in a rolling update, never takes over from a
    running one), plus a random tiebreak (replicas with the same priority would all pause).
    Negative milliseconds since the epoch, times 1024, plus 0..1023: fits a JSON int64."""
    ms = int((time.time() if now is None else now) * 1000)
    return -(ms * 1024) + (rnd or random.SystemRandom()).randrange(1024)


def ensure_peering_objects(name: str, namespaces: Optional[list[str]]) -> Any:
    """A kopf startup handler: create the peering object(s) the operator peers through unless they
    exist (409). It must run before kopf's peering starts: with --peering, kopf keeps the operator
    paused while its peering object is missing, and an object created while replicas already run
    would show each of them an empty peer list (all active until their next keep-alive).
    Needs the CRDs (charts/tuneop installs them): a 404 is retried, then the operator exits."""

    async def ensure_peering(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
        # kopf authenticates only after the startup handlers: log in the way the operator does.
        info = await login(settings=settings, logger=logger)
        if info is None:
            raise kopf.TemporaryError("no Kubernetes credentials for the peering object", delay=2)
        kc = kube.KubeClient.from_connection(info, timeout=30)
        targets: list[Optional[str]] = [*namespaces] if namespaces else [None]
        try:
            for ns in targets:
                path, body = peering_object(name, ns)
                try:
                    await kc.request("POST", path, body=body, subject=f"{body['kind']} {name}")
                    logger.info(f"created the peering object {body['kind']} {name}" + (f" in {ns}" if ns else ""))
                except kube.ApiError as e:
                    if e.status == 409:
                        continue
                    if e.status == 403:
                        # may not create it: it has to exist already (else kopf keeps the operator paused)
                        logger.warning(f"may not create {body['kind']} {name}" + (f" in {ns}" if ns else "")
                                       + f" ({e}); it must exist for the operator to run")
                        continue
                    if e.status == 404:
                        raise kopf.TemporaryError(
                            f"{body['kind']} is not served: install kopf's peering CRDs "
                            f"(kopfpeerings / clusterkopfpeerings.{PEERING_GROUP})", delay=2) from e
                    raise kopf.TemporaryError(f"creating {body['kind']} {name}: {e}", delay=2) from e
        finally:
            await kc.close()

    return ensure_peering


def run_operator(
    namespaces: Optional[list[str]] = None,
    metrics_port: Optional[int] = 8080,
    image: str = DEFAULT_IMAGE,
    *,
    metrics_addr: str = "0.0.0.0",
    liveness_endpoint: Optional[str] = None,
    liveness_port: Optional[int] = None,
    progress_interval: float = 15.0,
    retry_interval: float = 30.0,
    together_poll_interval: float = 30.0,
    together_base_url: Optional[str] = None,
    vllm_image: Optional[str] = None,
    adapter_interval: float = 10.0,
    workload_defaults: Optional[dict[str, Any]] = None,
    gpu_hourly_price_usd: Optional[dict[str, float]] = None,
    verbose: bool = False,
    debug: bool = False,
    stop_flag: Optional[threading.Event] = None,
    ready_flag: Optional[threading.Event] = None,
    settings: Any = None,
    peering_name: Optional[str] = None,
    priority: Optional[int] = None,
    identity: Optional[str] = None,
) -> None:
    """Run the operator until stopped (blocks; `tuneop operator` calls this).

    namespaces: watch these namespaces; None or [] watches the whole cluster.
    metrics_port: serve Prometheus /metrics on metrics_addr:metrics_port (None: no server).
    image: the trainer image for FineTuneJobs without spec.image.
    liveness_endpoint: e.g. "http://0.0.0.0:8081/healthz" (kopf's probe endpoint);
    liveness_port: shorthand for liveness_endpoint="http://0.0.0.0:<port>/healthz".
    progress_interval: seconds between reads of a running training pod's progress.
    retry_interval: seconds between reconciles of a job that waits (missing PVC, API error).
    together_poll_interval: seconds between polls of an active Together fine-tuning job.
    together_base_url: the Together API (None: $TOGETHER_BASE_URL, else Together's own).
    vllm_image: the vLLM image of AdapterDeployments without spec.vllm.image
    (None: tuneop.adapterdeployment.vllm.DEFAULT_IMAGE).
    adapter_interval: seconds between adapter reconciles of each AdapterDeployment (pods
    restarted, vLLM errors retried).
    workload_defaults: the platform's defaults for created pods (``workload_defaults.parse``):
    ``trainer`` fills empty ``spec.resources`` fields of FineTuneJobs, ``vllm`` of AdapterDeployments.
    gpu_hourly_price_usd: USD per GPU-hour by GPU resource name (``cost.parse_prices``): the cost
    estimate of backend kubernetes FineTuneJobs (none: no USD estimate).
    settings: a ``kopf.OperatorSettings`` to start from (None: kopf's defaults); the startup
    handler applies tuneop's own settings on top (benchmarks pass scanning disabled for kmock).
    peering_name: None (one replica, Recreate): kopf runs standalone, without peering. A name: kopf
    peering through the KopfPeering of that name in each of `namespaces` (the ClusterKopfPeering
    when cluster-wide), created at start-up when missing: of the replicas peering there, only the
    one with the highest priority handles anything, the others wait paused (docs/operating.md).
    priority: this replica's peering priority (None: :func:`default_priority`, the oldest wins).
    identity: its name in the peering object (None: $POD_ID, else tuneop-<host>-<random>); passed to
    kopf and used by the operator's own tasks to find themselves there (:func:`tuneop.glue.still_leading`).
    """


    kopf.configure(verbose=verbose, debug=debug)
    registry = kopf.OperatorRegistry()
    me: Optional[PeeringSelf] = None
    if peering_name:
        # An explicit identity: the operator's own tasks look themselves up in the peering objects.
        me = PeeringSelf(
            name=peering_name, namespaces=tuple(namespaces or ()),
            identity=identity or os.environ.get("POD_ID") or f"tuneop-{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
            priority=default_priority() if priority is None else priority,
        )
    finetunejob.register(
        registry,
        finetunejob.OperatorConfig(
            image=image, progress_interval=progress_interval, retry_interval=retry_interval,
            together_poll_interval=together_poll_interval, together_base_url=together_base_url,
            workload_defaults=dict(workload_defaults or {}), peering=me,
            gpu_hourly_price_usd=dict(gpu_hourly_price_usd or {}),
        ),
    )
    adapterdeployment.register(
        registry,
        adapterdeployment.AdapterConfig(
            vllm_image=vllm_image or vllm.DEFAULT_IMAGE, trainer_image=image, interval=adapter_interval,
            workload_defaults=dict(workload_defaults or {}),
        ),
    )
    if liveness_port and not liveness_endpoint:
        liveness_endpoint = f"http://0.0.0.0:{liveness_port}/healthz"
    if metrics_port:
        metrics.start_metrics_server(metrics_port, metrics_addr)
    kwargs: dict[str, Any] = {}
    if namespaces:
        kwargs["namespaces"] = list(namespaces)
    else:
        kwargs["clusterwide"] = True
    if me is not None:
        kopf.on.startup(registry=registry, id="peering-object", retries=15, backoff=2)(
            ensure_peering_objects(me.name, list(me.namespaces)))
        kwargs.update(peering_name=me.name, priority=me.priority, identity=me.identity)
    else:
        kwargs["standalone"] = True
    kopf.run(
        registry=registry,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        settings=settings,
        **kwargs,
    )


__all__ = ["default_priority", "peering_object", "run_operator"]
