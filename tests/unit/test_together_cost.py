"""backend together: Together's price estimate before the create, spec.maxCostUSD (refuse; cancel a
job whose price passes it) and the actual cost (pure reducer; Together jobs are wire dicts)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_together_status import UPLOADED, after, body, cond, finished, ft, pod, reasons, run  # noqa: E402

from tuneop.backends.together import client as T  # noqa: E402
from tuneop.backends.together import status as TS  # noqa: E402
from tuneop.backends.together.client import estimate_params  # noqa: E402
from tuneop.finetunejob import reconcile as s  # noqa: E402

ESTIMATE = {"estimation_available": True, "allowed_to_proceed": True, "estimated_total_price": 4.2,
            "estimated_train_token_count": 9000, "estimated_eval_token_count": 0, "user_limit": 100.0}


def uploaded(ftj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the FineTuneJob with its upload Job created, what observe sees once that Job succeeded)."""
    d = run(ftj)
    ftj = after(ftj, d)
    return ftj, {"config_map": d.create[0], "upload_job": finished(d.create[1]),
                 "upload_pods": [pod("news-upload", "upload", UPLOADED)]}


def test_estimate_files_after_the_upload_and_only_once() -> None:
    ftj, seen = uploaded(body())
    assert TS.estimate_files(ftj, s.Observed()) is None  # not uploaded yet
    assert TS.estimate_files(ftj, s.Observed(**seen)) == ("file-train", None, "messages")
    d = run(ftj, **seen, together_estimate=ESTIMATE)
    done = after(ftj, d)
    assert TS.estimate_files(done, s.Observed(**seen)) is None  # recorded: never asked again
    stale = after(done, d, hyperparameters={"epochs": 1})  # a new spec asks again, after its own upload
    assert TS.estimate_files(stale, s.Observed(**seen)) is None  # the upload Job is of the old spec


def test_estimate_recorded_then_created() -> None:
    ftj, seen = uploaded(body(maxCostUSD=10.0))
    d = run(ftj, **seen, together_estimate=ESTIMATE)
    assert d.status["cost"] == {"source": "together", "estimateUSD": 4.2, "estimatedTokens": 9000,
                                "basis": "Together's estimate-price"}
    assert [c["op"] for c in d.calls] == ["create"] and d.status["reason"] == "CreatingTogetherJob"


def test_over_the_limit_creates_nothing_and_raising_it_creates() -> None:
    ftj, seen = uploaded(body(maxCostUSD=3.0))
    d = run(ftj, **seen, together_estimate=ESTIMATE)
    assert d.calls == [] and d.status["phase"] == "Pending" and d.status["reason"] == "CostLimitExceeded"
    assert "$4.20" in d.status["message"] and "$3.00" in d.status["message"]
    assert cond(d.status, "CostLimitExceeded")["status"] == "True"
    assert "suffix" not in (d.status.get("together") or {})  # nothing is being created
    assert not TS.needs_finalizer(after(ftj, d))
    ev = [e for e in d.events if e["reason"] == "CostLimitExceeded"]
    assert len(ev) == 1 and ev[0]["type"] == "Warning" and "$4.20" in ev[0]["message"]
    raised = after(ftj, d, maxCostUSD=5.0)
    r = run(raised, **seen)
    assert [c["op"] for c in r.calls] == ["create"]
    assert s.find_condition(r.status["conditions"], "CostLimitExceeded") is None


@pytest.mark.parametrize("reply", [
    {"estimation_available": False, "unavailable_reason": "multimodal_dataset"},
    {"estimation_available": True, "estimated_total_price": None},
])
def test_no_estimate_with_a_limit_is_refused_without_a_limit_created(reply: dict[str, Any]) -> None:
    ftj, seen = uploaded(body(maxCostUSD=100.0))
    d = run(ftj, **seen, together_estimate=reply)
    assert d.calls == [] and d.status["reason"] == "CostLimitExceeded"
    assert "no USD estimate" in d.status["message"]
    free, seen = uploaded(body())
    f = run(free, **seen, together_estimate=reply)
    assert [c["op"] for c in f.calls] == ["create"] and "estimateUSD" not in f.status["cost"]


def test_a_failed_estimate_waits_with_a_limit_and_is_noted_without() -> None:
    err = {"reason": "TogetherUnavailable", "message": "estimate price: HTTP 503", "statusCode": 503,
           "retryAfter": 20.0}
    ftj, seen = uploaded(body(maxCostUSD=100.0))
    d = run(ftj, **seen, together_estimate_error=err)
    assert d.calls == [] and d.status["reason"] == "TogetherUnavailable" and "cost" not in d.status
    assert d.retry_after == 20.0 and d.status["together"]["retryAt"]
    assert d.status["reason"] in s.RETRY_REASONS
    free, seen = uploaded(body())
    f = run(free, **seen, together_estimate_error=err)
    assert [c["op"] for c in f.calls] == ["create"] and "HTTP 503" in f.status["cost"]["basis"]
    no_key = {"reason": "DependencyMissing", "message": "Secret together has no key api-key"}
    k = run(ftj, **seen, together_estimate_error=no_key)
    assert k.calls == [] and k.status["reason"] == "DependencyMissing" and "cost" not in k.status
    rejected = {"reason": "TogetherRejected", "message": "estimate price: HTTP 400: bad model", "statusCode": 400}
    r = run(ftj, **seen, together_estimate_error=rejected)
    assert r.calls == [] and r.status["reason"] == "CostLimitExceeded" and "HTTP 400" in r.status["message"]


def running(limit: float) -> dict[str, Any]:
    ftj, seen = uploaded(body(maxCostUSD=limit))
    d = run(ftj, **seen, together_estimate=ESTIMATE)
    ftj = after(ftj, d)
    d2 = TS.job_created(ftj, {"id": "ft-1", "status": "pending"}, False, now="2026-01-01T00:00:00Z")
    return after(ftj, d2)


def test_a_price_past_the_limit_cancels_then_fails() -> None:
    ftj = running(5.0)
    ok = run(ftj, together_job=ft("running", total_price=4_000_000_000))
    assert ok.calls == [] and ok.status["phase"] == "Running"
    d = run(ftj, together_job=ft("running", total_price=6_500_000_000))
    assert d.calls == [{"op": "cancel", "jobId": "ft-1", "stale": False}]
    assert d.status["reason"] == "CostLimitExceeded" and d.status["cost"]["cancelledOverLimit"] is True
    assert "$6.50" in d.status["message"] and "$5.00" in d.status["message"]
    assert "CostLimitExceeded" in reasons(d)
    ftj = after(ftj, d)
    asked = run(ftj, together_job=ft("cancel_requested", total_price=6_500_000_000))
    assert asked.calls == [] and asked.status["reason"] == "CostLimitExceeded" and asked.status["phase"] != "Failed"
    gone = run(after(ftj, asked), together_job=ft("cancelled", total_price=6_600_000_000))
    assert gone.status["phase"] == "Failed" and gone.status["reason"] == "CostLimitExceeded"
    assert gone.status["cost"]["actualUSD"] == 6.6 and gone.status["cost"]["estimateUSD"] == 4.2


def test_actual_cost_when_the_job_completes() -> None:
    ftj = running(100.0)
    d = run(ftj, together_job=ft("completed", total_price=1_234_567_890))
    assert d.status["cost"]["actualUSD"] == pytest.approx(1.234567890)
    assert d.status["reason"] == "Downloading"


def test_estimate_params_follow_the_sdks_shape() -> None:
    from tuneop.api.finetunejob import parse_spec

    spec = parse_spec(body()["spec"])
    lora = estimate_params(T.create_params(spec, training_file="f-1", validation_file="f-2", suffix="x",
                                           dataset_format="messages"))
    assert lora["training_file"] == "f-1" and lora["validation_file"] == "f-2" and lora["n_evals"] == 1
    assert lora["model"] and lora["n_epochs"] == 2
    assert lora["training_method"] == {"method": "sft", "train_on_inputs": False}
    assert lora["training_type"]["type"] == "Lora" and lora["training_type"]["lora_r"] == spec.adapter.r
    full = parse_spec({**body()["spec"], "adapter": {"type": "full"}, "method": "dpo",
                       "dataset": {**body()["spec"]["dataset"], "format": "preference"}})
    p = estimate_params(T.create_params(full, training_file="f-1", validation_file=None, suffix="x"))
    assert p["training_type"] == {"type": "Full"} and p["training_method"]["method"] == "dpo"
    assert "validation_file" not in p
    from together.types import fine_tuning_estimate_price_params as sdk

    assert set(lora) <= set(sdk.FineTuningEstimatePriceParams.__annotations__)


def test_a_retry_after_of_the_estimate_is_kept_until_asked_again() -> None:
    err = {"reason": "TogetherRateLimited", "message": "estimate price: HTTP 429", "statusCode": 429,
           "retryAfter": 60.0}
    ftj, seen = uploaded(body(maxCostUSD=100.0))
    d = run(ftj, **seen, together_estimate_error=err)
    retry_at = d.status["together"]["retryAt"]
    assert d.status["reason"] == "TogetherRateLimited" and d.retry_after == 60.0
    waiting = after(ftj, d)
    assert TS.wait_seconds(waiting["status"], "2026-01-01T00:00:00Z") > 0  # observe does not ask yet
    w = run(waiting, **seen)  # not asked this time
    assert w.calls == [] and w.status["reason"] == "EstimatingCost" and w.status["together"]["retryAt"] == retry_at
    assert w.retry_after == pytest.approx(60.0)
