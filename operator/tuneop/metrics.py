"""Prometheus metrics of the operator, in their own CollectorRegistry.

- ``tuneop_finetunejobs{phase}``: FineTuneJobs per phase (every phase always exported).
- ``tuneop_reconcile_total{kind,result}``: reconciles by result (success|retry|error).
- ``tuneop_reconcile_duration_seconds{kind}``: reconcile duration histogram.
- ``tuneop_training_step|total_steps|loss|progress_ratio{namespace,name}``: the latest progress
  of each training job; removed when the job is deleted (:meth:`Metrics.forget`).
- ``tuneop_finetunejob_cost_usd{namespace,name}``: price of a backend-together job so far (USD), or
  what a backend-kubernetes job cost at its end (``status.cost.actualUSD``).
- ``tuneop_finetunejob_estimated_cost_usd{namespace,name}``: the estimate before it started
  (``status.cost.estimateUSD``).
- ``tuneop_together_requests_total{method,code}``: requests to the Together API
  (:class:`TogetherRequestMetrics`, the ``on_request`` callback of the Together client).
- ``tuneop_adapterdeployment_replicas{namespace,name,state=desired|ready}``: vLLM pods.
- ``tuneop_adapters{namespace,name,state=desired|loaded}``: adapters in the spec / loaded on
  every ready pod.
- ``tuneop_adapter_operations_total{op=load|unload,result=success|error}`` and
  ``tuneop_adapter_operation_seconds{op}``: calls of vLLM's runtime LoRA API.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server


class TogetherRequestMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "tuneop_together_requests",
            "HTTP requests sent to the Together API, by method and status code ('error': no response).",
            ["method", "code"],
            registry=self.registry,
        )

    def record(self, method: str, code: str) -> None:
        """The ``on_request`` callback of :class:`tuneop.backends.together.client.TogetherClient`."""
        self.requests.labels(method=method.upper(), code=str(code)).inc()

    def value(self, method: str, code: str) -> float:
        """Current count (tests)."""
        v = self.registry.get_sample_value(
            "tuneop_together_requests_total", {"method": method.upper(), "code": str(code)}
        )
        return v or 0.0


PHASES = ("Pending", "Validating", "Running", "Evaluating", "Succeeded", "Failed", "Suspended")


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.finetunejobs = Gauge(
            "tuneop_finetunejobs", "FineTuneJobs by phase.", ["phase"], registry=r
        )
        self.reconcile_total = Counter(
            "tuneop_reconcile", "Reconciles by kind and result.", ["kind", "result"], registry=r
        )
        self.reconcile_duration = Histogram(
            "tuneop_reconcile_duration_seconds", "Duration of one reconcile.", ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        labels = ["namespace", "name"]
        self.training_step = Gauge(
            "tuneop_training_step", "Latest optimizer step.", labels, registry=r
        )
        self.training_total_steps = Gauge(
            "tuneop_training_total_steps", "Total optimizer steps.", labels, registry=r
        )
        self.training_loss = Gauge("tuneop_training_loss", "Latest training loss.", labels, registry=r)
        self.training_progress_ratio = Gauge(
            "tuneop_training_progress_ratio", "step / total steps (0..1).", labels, registry=r
        )
        self.cost_usd = Gauge(
            "tuneop_finetunejob_cost_usd",
            "Price of the job so far in USD (backend together), or its actual cost at the end.",
            labels, registry=r,
        )
        self.estimated_cost_usd = Gauge(
            "tuneop_finetunejob_estimated_cost_usd", "Estimated cost in USD before the job started.",
            labels, registry=r,
        )
        self.together = TogetherRequestMetrics(r)
        self.ad_replicas = Gauge(
            "tuneop_adapterdeployment_replicas", "vLLM pods of an AdapterDeployment.",
            ["namespace", "name", "state"], registry=r,
        )
        self.adapters = Gauge(
            "tuneop_adapters", "Adapters of an AdapterDeployment: desired, loaded on every ready pod.",
            ["namespace", "name", "state"], registry=r,
        )
        self.adapter_ops = Counter(
            "tuneop_adapter_operations", "vLLM runtime LoRA API calls.", ["op", "result"], registry=r
        )
        self.adapter_op_seconds = Histogram(
            "tuneop_adapter_operation_seconds", "Duration of one vLLM load/unload call.", ["op"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r,
        )
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        self._refresh_phases()

    # --- phases

    def _refresh_phases(self) -> None:
        counts = {p: 0 for p in PHASES}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, n in counts.items():
            self.finetunejobs.labels(phase=phase).set(n)

    def set_phase(self, namespace: str, name: str, phase: Optional[str]) -> None:
        with self._lock:
            if phase:
                self._phases[(namespace, name)] = phase
            else:
                self._phases.pop((namespace, name), None)
            self._refresh_phases()

    # --- reconciles

    def observe_reconcile(self, kind: str, result: str, seconds: float) -> None:
        self.reconcile_total.labels(kind=kind, result=result).inc()
        self.reconcile_duration.labels(kind=kind).observe(max(seconds, 0.0))

    # --- training progress

    def set_progress(self, namespace: str, name: str, progress: dict[str, Any]) -> None:
        step = progress.get("step")
        total = progress.get("totalSteps", progress.get("total_steps"))
        loss = progress.get("loss")
        if step is not None:
            self.training_step.labels(namespace, name).set(step)
        if total:
            self.training_total_steps.labels(namespace, name).set(total)
            if step is not None:
                self.training_progress_ratio.labels(namespace, name).set(
                    min(max(float(step) / float(total), 0.0), 1.0)
                )
        if loss is not None:
            self.training_loss.labels(namespace, name).set(loss)

    def set_cost(self, namespace: str, name: str, usd: float) -> None:
        self.cost_usd.labels(namespace, name).set(float(usd))

    def set_costs(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """The cost series from a FineTuneJob's status: ``together.costUSD`` (else ``cost.actualUSD``)
        and ``cost.estimateUSD``."""
        cost = status.get("cost") or {}
        actual = (status.get("together") or {}).get("costUSD")
        if actual is None:
            actual = cost.get("actualUSD")
        if isinstance(actual, (int, float)):
            self.set_cost(namespace, name, actual)
        if isinstance(cost.get("estimateUSD"), (int, float)):
            self.estimated_cost_usd.labels(namespace, name).set(float(cost["estimateUSD"]))

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted FineTuneJob."""
        for g in (
            self.training_step, self.training_total_steps, self.training_loss,
            self.training_progress_ratio, self.cost_usd, self.estimated_cost_usd,
        ):
            try:
                g.remove(namespace, name)
            except KeyError:
                pass
        self.set_phase(namespace, name, None)

    # --- AdapterDeployments

    def set_adapterdeployment(
        self, namespace: str, name: str, *, desired_replicas: int, ready_replicas: int,
        desired_adapters: int, loaded_adapters: int,
    ) -> None:
        self.ad_replicas.labels(namespace, name, "desired").set(desired_replicas)
        self.ad_replicas.labels(namespace, name, "ready").set(ready_replicas)
        self.adapters.labels(namespace, name, "desired").set(desired_adapters)
        self.adapters.labels(namespace, name, "loaded").set(loaded_adapters)

    def observe_adapter_operation(self, op: str, result: str, seconds: float) -> None:
        self.adapter_ops.labels(op=op, result=result).inc()
        self.adapter_op_seconds.labels(op=op).observe(max(seconds, 0.0))

    def forget_adapterdeployment(self, namespace: str, name: str) -> None:
        for g in (self.ad_replicas, self.adapters):
            for state in ("desired", "ready", "loaded"):
                try:
                    g.remove(namespace, name, state)
                except KeyError:
                    pass

    # --- exposition

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", metrics: Optional[Metrics] = None
) -> Any:
    """Serve /metrics of `metrics` (default: the operator's) on addr:port in a thread."""
    m = metrics if metrics is not None else METRICS
    return _start_http_server(port, addr=addr, registry=m.registry)
