"""metrics.py: values in, exposition out (scraped over HTTP and parsed like Prometheus does)."""
from __future__ import annotations

import urllib.request
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

from tuneop.metrics import PHASES, Metrics, start_metrics_server


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(m: Metrics, metric: str, **labels: str) -> Optional[float]:
    return samples(m.render().decode()).get((metric, tuple(sorted(labels.items()))))


def test_every_phase_is_exported_and_counted() -> None:
    m = Metrics()
    for phase in PHASES:
        assert value(m, "tuneop_finetunejobs", phase=phase) == 0
    m.set_phase("a", "x", "Running")
    m.set_phase("a", "y", "Running")
    m.set_phase("b", "x", "Failed")
    assert value(m, "tuneop_finetunejobs", phase="Running") == 2
    m.set_phase("a", "y", "Succeeded")  # a job moves on: counted once
    assert value(m, "tuneop_finetunejobs", phase="Running") == 1
    assert value(m, "tuneop_finetunejobs", phase="Succeeded") == 1


def test_reconcile_counter_and_histogram() -> None:
    m = Metrics()
    m.observe_reconcile("FineTuneJob", "success", 0.02)
    m.observe_reconcile("FineTuneJob", "success", 0.2)
    m.observe_reconcile("FineTuneJob", "error", 0.01)
    assert value(m, "tuneop_reconcile_total", kind="FineTuneJob", result="success") == 2
    assert value(m, "tuneop_reconcile_total", kind="FineTuneJob", result="error") == 1
    assert value(m, "tuneop_reconcile_duration_seconds_count", kind="FineTuneJob") == 3
    assert value(m, "tuneop_reconcile_duration_seconds_bucket", kind="FineTuneJob", le="0.05") == 2


def test_training_progress_and_forget() -> None:
    m = Metrics()
    m.set_phase("team-a", "news", "Running")
    m.set_progress("team-a", "news", {"step": 30, "totalSteps": 120, "loss": 0.75})
    labels = {"namespace": "team-a", "name": "news"}
    assert value(m, "tuneop_training_step", **labels) == 30
    assert value(m, "tuneop_training_total_steps", **labels) == 120
    assert value(m, "tuneop_training_loss", **labels) == 0.75
    assert value(m, "tuneop_training_progress_ratio", **labels) == 0.25
    m.forget("team-a", "news")
    text = m.render().decode()
    assert 'name="news"' not in text
    assert value(m, "tuneop_finetunejobs", phase="Running") == 0
    m.forget("team-a", "news")  # twice is fine


def test_progress_without_totals() -> None:
    m = Metrics()
    m.set_progress("ns", "j", {"step": 3})
    assert value(m, "tuneop_training_step", namespace="ns", name="j") == 3
    assert value(m, "tuneop_training_progress_ratio", namespace="ns", name="j") is None


def test_metrics_server_serves_its_own_registry() -> None:
    m = Metrics()
    m.set_phase("a", "x", "Pending")
    server, thread = start_metrics_server(0, "127.0.0.1", metrics=m)
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    s = samples(text)
    assert s[("tuneop_finetunejobs", (("phase", "Pending"),))] == 1
    # Its own registry: no process/python collectors of the global default one.
    assert not any(name.startswith("python_") for name, _ in s)


def test_together_requests_and_cost_share_the_operators_registry() -> None:
    m = Metrics()
    m.together.record("get", "200")
    m.together.record("GET", "429")
    m.together.record("POST", "error")
    m.set_cost("team-a", "news", 1.23456789)
    text = m.render().decode()
    assert value(m, "tuneop_together_requests_total", method="GET", code="200") == 1
    assert value(m, "tuneop_together_requests_total", method="GET", code="429") == 1
    assert value(m, "tuneop_together_requests_total", method="POST", code="error") == 1
    assert value(m, "tuneop_finetunejob_cost_usd", namespace="team-a", name="news") == 1.23456789
    assert "tuneop_finetunejob_cost_usd" in text
    m.forget("team-a", "news")
    assert value(m, "tuneop_finetunejob_cost_usd", namespace="team-a", name="news") is None


def test_cost_series_come_from_the_status() -> None:
    m = Metrics()
    m.set_costs("ns", "k8s", {"cost": {"estimateUSD": 4.5}})
    assert value(m, "tuneop_finetunejob_estimated_cost_usd", namespace="ns", name="k8s") == 4.5
    assert value(m, "tuneop_finetunejob_cost_usd", namespace="ns", name="k8s") is None
    m.set_costs("ns", "k8s", {"cost": {"estimateUSD": 4.5, "actualUSD": 6.0}})
    assert value(m, "tuneop_finetunejob_cost_usd", namespace="ns", name="k8s") == 6.0
    m.set_costs("ns", "tg", {"together": {"costUSD": 2.0}, "cost": {"estimateUSD": 1.0, "basis": "x"}})
    assert value(m, "tuneop_finetunejob_cost_usd", namespace="ns", name="tg") == 2.0
    m.set_costs("ns", "none", {"cost": {"basis": "no estimate"}})
    assert value(m, "tuneop_finetunejob_estimated_cost_usd", namespace="ns", name="none") is None
    m.forget("ns", "k8s")
    assert value(m, "tuneop_finetunejob_estimated_cost_usd", namespace="ns", name="k8s") is None
