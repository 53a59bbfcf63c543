"""spec.maxCostUSD and status.cost in the backend-kubernetes reducer (pure: state in, decision out)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_status import LATER, OK_REPORT, applied, body, cond, event_reasons, job, names, pod  # noqa: E402

from tuneop.backends import registered as backends  # noqa: E402
from tuneop.finetunejob import builders as b  # noqa: E402
from tuneop.finetunejob import reconcile as s  # noqa: E402

NOW = "2026-01-01T00:00:00Z"
PRICES = {"nvidia.com/gpu": 3.0}
INLINE = {"train": {"configMap": {"name": "news-data", "key": "train.jsonl"}}}


def run(ftj: dict[str, Any], prices: Optional[dict[str, float]] = None, now: str = NOW, **observed: Any) -> s.Decision:
    return backends.reconcile(ftj, s.Observed(**observed), image="trainer:1", now=now,
                              gpu_prices=PRICES if prices is None else prices)


def inline(**spec: Any) -> dict[str, Any]:
    return body(dataset={"train": INLINE["train"]}, **spec)


def test_the_estimate_is_in_the_status_before_the_training_job_is_created() -> None:
    d = run(inline(), inline_datasets={"train": OK_REPORT})
    assert names(d.create) == ["news-config", "news-train"]
    c = d.status["cost"]
    assert c["source"] == "throughput" and c["estimatedTokens"] == 900000 * 3
    assert c["estimateUSD"] > 0 and c["estimatedGpuHours"] > 0
    assert s.find_condition(d.status["conditions"], "CostLimitExceeded") is None


def test_over_the_limit_creates_nothing_and_says_both_figures() -> None:
    ok = run(inline(), inline_datasets={"train": OK_REPORT})
    est = ok.status["cost"]["estimateUSD"]
    ftj = inline(maxCostUSD=round(est / 2, 2))
    d = run(ftj, inline_datasets={"train": OK_REPORT})
    assert d.create == [] and d.calls == []
    assert d.status["phase"] == "Pending" and d.status["reason"] == "CostLimitExceeded"
    c = cond(d.status, "CostLimitExceeded")
    assert c["status"] == "True" and f"${est:,.2f}" in c["message"] and f"${est / 2:,.2f}" in c["message"]
    assert "jobName" not in d.status
    warn = [e for e in d.events if e["reason"] == "CostLimitExceeded"]
    assert len(warn) == 1 and warn[0]["type"] == "Warning" and f"${est:,.2f}" in warn[0]["message"]
    # Idempotent: the same reconcile again creates nothing and posts no second Event.
    again = run(applied(ftj, d), inline_datasets={"train": OK_REPORT})
    assert again.create == [] and again.events == []
    # Raising the limit starts it: the spec hash is unchanged (nothing restarts), the condition goes.
    raised = applied(ftj, d, generation=2)
    raised["spec"]["maxCostUSD"] = est + 1
    assert b.spec_hash(s.spec_of(raised)) == d.status["specHash"]
    r = run(raised)
    assert names(r.create) == ["news-config", "news-train"]
    assert s.find_condition(r.status["conditions"], "CostLimitExceeded") is None
    assert r.status["reason"] == "TrainingPending"


def test_no_price_with_a_limit_is_refused_without_a_limit_it_runs() -> None:
    d = run(inline(maxCostUSD=100.0), prices={}, inline_datasets={"train": OK_REPORT})
    assert d.create == [] and d.status["reason"] == "CostLimitExceeded"
    assert "no USD estimate" in d.status["message"] and "nvidia.com/gpu" in d.status["message"]
    assert "estimateUSD" not in d.status["cost"] and d.status["cost"]["estimatedGpuHours"] > 0
    free = run(inline(), prices={}, inline_datasets={"train": OK_REPORT})
    assert names(free.create) == ["news-config", "news-train"]
    assert "no hourly price" in free.status["cost"]["basis"]


def test_pvc_dataset_is_validated_first_then_refused_before_the_training_job() -> None:
    first = run(body(maxCostUSD=0.01))
    assert names(first.create) == ["news-config", "news-validate"]  # the CPU-only check counts the tokens
    ftj = applied(body(maxCostUSD=0.01), first)
    message = json.dumps({"event": "validated", "datasets": {"train": OK_REPORT}})
    d = run(ftj, config_map=b.build_config_map(ftj), validation_job=job(ftj, "validate", "succeeded"),
            validation_pods=[pod("news-validate", "validate", message=message)])
    assert d.create == [] and d.status["reason"] == "CostLimitExceeded"
    assert event_reasons(d) == ["DatasetValid", "CostLimitExceeded"]
    assert d.status["dataset"]["estimatedTokens"] == 900000


def test_actual_cost_at_the_end_from_the_jobs_run_time() -> None:
    ftj = inline(resources={"gpus": 2})
    created = run(ftj, inline_datasets={"train": OK_REPORT})
    ftj = applied(ftj, created)
    train = job(ftj, "train", "succeeded")
    train["status"].update(startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:30:00Z")
    message = json.dumps({"event": "done", "adapter": {"path": "/x", "sha256": "a" * 64}})
    d = run(ftj, now=LATER, config_map=b.build_config_map(ftj), training_job=train,
            training_pods=[pod("news-train", "trainer", message=message)])
    assert d.status["phase"] == "Succeeded"
    c = d.status["cost"]
    assert c["actualGpuHours"] == 3.0 and c["actualUSD"] == 9.0
    assert c["estimateUSD"] == created.status["cost"]["estimateUSD"]
    failed = job(ftj, "train", "failed")
    failed["status"]["startTime"] = "2026-01-01T00:00:00Z"
    failed["status"]["conditions"][0]["lastTransitionTime"] = "2026-01-01T00:30:00Z"
    f = run(ftj, now=LATER, config_map=b.build_config_map(ftj), training_job=failed)
    assert f.status["phase"] == "Failed" and f.status["cost"]["actualUSD"] == 3.0


def test_a_new_spec_forgets_the_old_cost() -> None:
    d = run(inline(), inline_datasets={"train": OK_REPORT})
    ftj = applied(inline(), d, generation=2)
    ftj["spec"]["hyperparameters"] = {"epochs": 1}
    again = run(ftj, inline_datasets={"train": OK_REPORT}, config_map=b.build_config_map(inline()))
    assert again.status["cost"]["estimatedTokens"] == 900000
