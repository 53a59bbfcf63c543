"""The operator process: kopf handlers of tuneop's resources, and :func:`run_operator`."""
from __future__ import annotations

import threading
from typing import Any, Optional

from ..builders.finetunejob import DEFAULT_IMAGE


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
    verbose: bool = False,
    debug: bool = False,
    stop_flag: Optional[threading.Event] = None,
    ready_flag: Optional[threading.Event] = None,
    settings: Any = None,
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
    (None: tuneop.serving.vllm.DEFAULT_IMAGE).
    adapter_interval: seconds between adapter reconciles of each AdapterDeployment (pods
    restarted, vLLM errors retried).
    workload_defaults: the platform's defaults for created pods (``workload_defaults.parse``):
    ``trainer`` fills empty ``spec.resources`` fields of FineTuneJobs, ``vllm`` of AdapterDeployments.
    settings: a ``kopf.OperatorSettings`` to start from (None: kopf's defaults); the startup
    handler applies tuneop's own settings on top (benchmarks pass scanning disabled for kmock).
    One replica (Recreate): kopf runs standalone, without peering.
    """
    import kopf

    from .. import metrics
    from ..serving import vllm
    from . import adapterdeployment, finetunejob

    kopf.configure(verbose=verbose, debug=debug)
    registry = kopf.OperatorRegistry()
    finetunejob.register(
        registry,
        finetunejob.OperatorConfig(
            image=image, progress_interval=progress_interval, retry_interval=retry_interval,
            together_poll_interval=together_poll_interval, together_base_url=together_base_url,
            workload_defaults=dict(workload_defaults or {}),
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
    kopf.run(
        registry=registry,
        standalone=True,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        settings=settings,
        **kwargs,
    )


__all__ = ["run_operator"]
