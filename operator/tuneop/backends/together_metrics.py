"""Prometheus counter of the requests tuneop makes to the Together API.

``tuneop_together_requests_total{method,code}``: one increment per HTTP request the ``together``
SDK sends (retries included), by HTTP method and status code; ``code="error"`` when no response
came back (connection refused or dropped, timeout).

Usage (the operator passes its own registry; tests pass a fresh ``CollectorRegistry``)::

    metrics = TogetherRequestMetrics(registry)
    client = TogetherClient(api_key, on_request=metrics.record)
"""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter

__all__ = ["TogetherRequestMetrics"]


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
        """The ``on_request`` callback of :class:`tuneop.backends.together.TogetherClient`."""
        self.requests.labels(method=method.upper(), code=str(code)).inc()

    def value(self, method: str, code: str) -> float:
        """Current count (tests)."""
        v = self.registry.get_sample_value(
            "tuneop_together_requests_total", {"method": method.upper(), "code": str(code)}
        )
        return v or 0.0
