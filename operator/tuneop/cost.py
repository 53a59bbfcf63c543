"""What a FineTuneJob costs: the estimate before anything is created, ``spec.maxCostUSD``'s
decisions, and the actual cost at the end (``status.cost``). Pure: dicts and numbers in and out.

backend kubernetes: GPU-hours = training tokens / the trainer's tokens per second for the model's
size, times the operator's hourly price of the GPU resource (``--gpu-hourly-price``, chart value
``gpuHourlyPriceUSD``). backend together: Together's own estimate (``POST
/v1/fine-tunes/estimate-price``), its ``total_price`` while it runs and at the end.

Deny by default: with ``spec.maxCostUSD`` set, a job without a USD estimate (no price for its GPUs,
a model of unknown size, no token count, Together could not estimate) does not start.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any, Mapping, Optional

from .api.finetunejob import FineTuneJobSpec, Method

SOURCE_THROUGHPUT = "throughput"
SOURCE_TOGETHER = "together"

# Model FLOP/s the trainer reaches per GPU, measured with benchmarks/gpu_trainer_speed.py on one
# NVIDIA H100 80GB HBM3 (bf16, 16 rows x 512 tokens per step, LoRA r 16, tuneop's speed plan). The
# benchmark counts 4 x matmul params + 6 x seq x hidden x layers FLOPs per token (LoRA: forward and
# the activation gradients; no weight gradients for the frozen base):
# - lora: median of the four "1b-lora/tuneop" runs, 248.5 (benchmarks/results/gpu/
#   gpu-trainer-speed-h100-run1.json), 207.3, 197.9, 219.7 (gpu-trainer-speed-h100-run2-1b-rounds.json)
#   -> 213.6 TFLOP/s (Llama-shaped 1.24B model: 39,200..49,300 tokens/s).
# - qlora: "8b-qlora/tuneop" (run1.json, one run): 284.9 TFLOP/s (8.03B model: 9,364 tokens/s).
# - full: not measured: taken as lora's rate, with weight gradients (6 FLOPs per parameter, not 4).
MEASURED_GPU = "NVIDIA H100 80GB"
MODEL_TFLOPS = {"lora": 213.6, "qlora": 284.9, "full": 213.6}
MEASURED_RUNS = {
    "lora": ("benchmarks/results/gpu/gpu-trainer-speed-h100-run1.json",
             "benchmarks/results/gpu/gpu-trainer-speed-h100-run2-1b-rounds.json"),
    "qlora": ("benchmarks/results/gpu/gpu-trainer-speed-h100-run1.json",),
}
# FLOPs per trained token and parameter: forward 2 + activation gradients 2 (+ weight gradients 2
# for full fine-tuning). DPO adds the reference model's forward pass (2): not measured.
FLOPS_PER_PARAM = {"lora": 4.0, "qlora": 4.0, "full": 6.0}
DPO_REFERENCE_FLOPS_PER_PARAM = 2.0

_SIZE = re.compile(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z])")


def model_params(base_model: str) -> Optional[float]:
    """Parameters of the base model as its name says (``Qwen/Qwen3-8B`` -> 8e9, ``SmolLM2-135M`` ->
    1.35e8, ``Mixtral-8x7B`` -> 5.6e10); None when the name does not say. The first size in the
    last path element counts (``Qwen3-30B-A3B``: 30B, all experts; an over-estimate for MoE)."""
    last = base_model.rstrip("/").rsplit("/", 1)[-1]
    m = _SIZE.search(last)
    if m is None:
        return None
    n = float(m.group(2)) * (1e9 if m.group(3) in "Bb" else 1e6)
    if m.group(1):
        n *= int(m.group(1))
    return n if n > 0 else None


def flops_per_token(params: float, adapter_type: str, method: str) -> float:
    per_param = FLOPS_PER_PARAM[adapter_type]
    if method == Method.dpo.value:
        per_param += DPO_REFERENCE_FLOPS_PER_PARAM
    return per_param * params


def tokens_per_second_per_gpu(params: float, adapter_type: str, method: str) -> float:
    """Training tokens per second of one GPU (the measured model FLOP/s over the FLOPs per token)."""
    return MODEL_TFLOPS[adapter_type] * 1e12 / flops_per_token(params, adapter_type, method)


def training_tokens(spec: FineTuneJobSpec, dataset: Mapping[str, Any]) -> tuple[Optional[int], str]:
    """(tokens the training loop processes, how): the dataset's token estimate (status.dataset:
    characters / 4, tuneop's dataset check) with rows truncated at maxSeqLength, times epochs, or
    maxSteps x rows per step when that ends training first."""
    tokens = dataset.get("estimatedTokens")
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or tokens <= 0:
        return None, "the dataset check reported no token count"
    hp = spec.hyperparameters
    rows = dataset.get("trainRows")
    how = f"~{int(tokens):,} dataset tokens (characters / 4)"
    per_row: Optional[float] = None
    if isinstance(rows, int) and rows > 0:
        per_row = tokens / rows
        if per_row > hp.max_seq_length:
            per_row = float(hp.max_seq_length)
            tokens = per_row * rows
            how += f", rows cut at maxSeqLength {hp.max_seq_length}"
    total = tokens * hp.epochs
    how += f" x {hp.epochs:g} epochs"
    if hp.max_steps is not None and per_row is not None:
        world = max(spec.resources.gpus, 1) * spec.resources.nodes
        by_steps = hp.max_steps * hp.batch_size * hp.gradient_accumulation_steps * world * per_row
        if by_steps < total:
            total = by_steps
            how = f"maxSteps {hp.max_steps} x {hp.batch_size * hp.gradient_accumulation_steps * world} rows x ~{per_row:,.0f} tokens"
    return int(math.ceil(total)), how


def estimate_kubernetes(
    spec: FineTuneJobSpec, dataset: Mapping[str, Any], prices: Optional[Mapping[str, float]],
) -> dict[str, Any]:
    """status.cost of a backend kubernetes job before its training Job is created."""
    res = spec.resources
    out: dict[str, Any] = {"source": SOURCE_THROUGHPUT}
    tokens, how = training_tokens(spec, dataset)
    if tokens is None:
        out["basis"] = f"no estimate: {how}"
        return out
    out["estimatedTokens"] = tokens
    if res.gpus == 0:
        out.update(estimatedGpuHours=0.0, estimateUSD=0.0,
                   basis=f"{how}; resources.gpus is 0: CPU training, no GPU time to price")
        return out
    params = model_params(spec.base_model)
    if params is None:
        out["basis"] = (f"no estimate: the size of baseModel {spec.base_model!r} is unknown "
                        "(its name has no size such as 8B or 135M)")
        return out
    adapter = spec.adapter.type.value  # lora | qlora | full: the keys of MODEL_TFLOPS
    tps = tokens_per_second_per_gpu(params, adapter, spec.method.value)
    gpu_hours = tokens / tps / 3600.0
    budget = spec.hyperparameters.max_train_seconds
    world = res.gpus * res.nodes
    capped = ""
    if budget is not None and gpu_hours > budget * world / 3600.0:
        gpu_hours = budget * world / 3600.0
        capped = f", capped by maxTrainSeconds {budget}"
    out["estimatedGpuHours"] = round(gpu_hours, 4)
    basis = (f"{how} at {tps:,.0f} tokens/s per GPU ({_size(params)} {adapter}"
             f"{' dpo' if spec.method == Method.dpo else ''}, the trainer's speed measured on {MEASURED_GPU}; "
             f"training loop only){capped}")
    price = (prices or {}).get(res.gpu_resource_name)
    if price is None:
        out["basis"] = (f"{basis}; no USD estimate: the operator has no hourly price for "
                        f"{res.gpu_resource_name} (--gpu-hourly-price, chart gpuHourlyPriceUSD)")
        return out
    out["estimateUSD"] = cents_up(gpu_hours * price)
    out["basis"] = f"{basis}; {gpu_hours:.3g} GPU-hours x {usd(price)}/h per {res.gpu_resource_name}"
    return out


def _size(params: float) -> str:
    return f"{params / 1e9:g}B" if params >= 1e9 else f"{params / 1e6:g}M"


def usd(value: float) -> str:
    return f"${value:,.2f}" if value == 0 or value >= 0.01 else f"${value:.2g}"


def cents_up(value: float) -> float:
    """An estimate in whole cents, rounded up: what spec.maxCostUSD is compared with never
    understates it (a job of a fraction of a cent is $0.01, not $0)."""
    return math.ceil(round(value * 100, 6)) / 100


def estimate_together(reply: Optional[Mapping[str, Any]], error: Optional[str] = None) -> dict[str, Any]:
    """status.cost from Together's estimate-price reply (``estimated_total_price`` in USD), or why
    there is none (``estimation_available: false`` with its reason, or the call's error)."""
    out: dict[str, Any] = {"source": SOURCE_TOGETHER}
    if error is not None or reply is None:
        out["basis"] = f"no estimate: Together's estimate-price failed: {error or 'no reply'}"
        return out
    if reply.get("estimation_available") is False:
        out["basis"] = f"no estimate: Together cannot estimate this job ({reply.get('unavailable_reason') or 'no reason given'})"
        return out
    price = reply.get("estimated_total_price")
    if not isinstance(price, (int, float)) or isinstance(price, bool) or price < 0:
        out["basis"] = f"no estimate: Together's estimate-price has no estimated_total_price ({price!r})"
        return out
    out["estimateUSD"] = cents_up(float(price))
    tokens = 0.0
    for key in ("estimated_train_token_count", "estimated_eval_token_count"):
        v = reply.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            tokens += v
    if tokens:
        out["estimatedTokens"] = int(tokens)
    basis = "Together's estimate-price"
    if reply.get("allowed_to_proceed") is False:
        basis += " (Together says the price is over your credit limit and balance)"
    out["basis"] = basis
    return out


def refusal(max_usd: Optional[float], cost: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Why ``spec.maxCostUSD`` refuses to start the job (None: it may start). No limit: never;
    no USD estimate: refused (deny by default)."""
    if max_usd is None:
        return None
    cost = cost or {}
    est = cost.get("estimateUSD")
    if est is None:
        why = str(cost.get("basis") or "no estimate")
        return f"spec.maxCostUSD is {usd(max_usd)} but there is no USD estimate to check it against ({why})"
    if est > max_usd:
        return f"estimated cost {usd(est)} is over spec.maxCostUSD {usd(max_usd)}"
    return None


def over_limit_while_running(max_usd: Optional[float], cost_usd: Optional[float]) -> Optional[str]:
    """Together: the job's cost so far (``total_price``) passed ``spec.maxCostUSD``."""
    if max_usd is None or cost_usd is None or cost_usd <= max_usd:
        return None
    return f"cost at Together {usd(cost_usd)} passed spec.maxCostUSD {usd(max_usd)}"


def _time(text: Any) -> Optional[dt.datetime]:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def job_run_seconds(job: Mapping[str, Any]) -> Optional[float]:
    """Seconds a finished Job ran: ``status.startTime`` to ``completionTime`` (succeeded) or to its
    Failed condition's time. A Job suspended and resumed restarts ``startTime``: its last run."""
    st = job.get("status") or {}
    start = _time(st.get("startTime"))
    end = _time(st.get("completionTime"))
    if end is None:
        for c in st.get("conditions") or []:
            if c.get("type") == "Failed" and c.get("status") == "True":
                end = _time(c.get("lastTransitionTime"))
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


def actual_kubernetes(
    cost: Optional[Mapping[str, Any]], job: Mapping[str, Any], spec: FineTuneJobSpec,
    prices: Optional[Mapping[str, float]],
) -> dict[str, Any]:
    """status.cost at the end: the training Job's run time x its GPUs x the GPU price."""
    out = dict(cost or {})
    seconds = job_run_seconds(job)
    if seconds is None:
        return out
    res = spec.resources
    gpu_hours = seconds * res.gpus * res.nodes / 3600.0
    out["actualGpuHours"] = round(gpu_hours, 4)
    price = (prices or {}).get(res.gpu_resource_name)
    if res.gpus == 0:
        out["actualUSD"] = 0.0
    elif price is not None:
        out["actualUSD"] = round(gpu_hours * price, 2)
    return out


class PriceError(ValueError):
    pass


def parse_prices(text: Optional[str]) -> dict[str, float]:
    """``--gpu-hourly-price`` / ``$TUNEOP_GPU_HOURLY_PRICE_USD``: a JSON object
    ``{"nvidia.com/gpu": 2.5}`` or ``nvidia.com/gpu=2.5,amd.com/gpu=1.8`` (USD per GPU-hour)."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    items: list[tuple[Any, Any]]
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PriceError(f"not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise PriceError("expected an object of GPU resource name -> USD per hour")
        items = list(data.items())
    else:
        items = []
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise PriceError(f"{part.strip()!r}: expected RESOURCE=USD_PER_HOUR")
            items.append((name.strip(), value.strip()))
    out: dict[str, float] = {}
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise PriceError("a GPU resource name is empty")
        try:
            price = float(value)
        except (TypeError, ValueError):
            raise PriceError(f"{name}: price {value!r} is not a number") from None
        if not math.isfinite(price) or price < 0:
            raise PriceError(f"{name}: price {value!r} must be a finite number >= 0")
        out[name] = price
    return out
