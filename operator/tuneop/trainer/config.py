"""Reading the resolved job config and the pure decisions derived from it.

Nothing here imports torch: the hardware facts are passed in, which keeps every decision testable.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from ..api.finetunejob import AdapterType, FineTuneJobSpec, Hyperparameters, Precision
from .errors import CONFIG_INVALID, TrainerError

SAVE_FRACTION = 0.1  # checkpoint about every 10% of training
MAX_SAVE_STEPS = 500  # ... and at least every 500 steps
LOG_POINTS = 50  # about 50 progress events per run
EVAL_POINTS = 5  # validation loss about every 20% of training (and at the end)
MAX_EVAL_STEPS = 1000


@dataclass(frozen=True)
class Paths:
    model: str
    train: str
    output: str
    validation: Optional[str] = None
    test: Optional[str] = None


@dataclass(frozen=True)
class JobConfig:
    spec: FineTuneJobSpec
    paths: Paths
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or "finetunejob")


def parse_config(doc: Any) -> JobConfig:
    """The resolved job config document -> JobConfig; TrainerError(ConfigInvalid) when malformed."""
    if not isinstance(doc, dict):
        raise TrainerError(CONFIG_INVALID, "job config must be a JSON object")
    if "spec" not in doc or "paths" not in doc:
        raise TrainerError(CONFIG_INVALID, "job config needs 'spec' and 'paths'")
    try:
        spec = FineTuneJobSpec.model_validate(doc["spec"])
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise TrainerError(CONFIG_INVALID, f"invalid spec: {problems}") from None
    raw = doc["paths"]
    if not isinstance(raw, dict):
        raise TrainerError(CONFIG_INVALID, "paths must be an object")
    for key in ("model", "train", "output"):
        if not raw.get(key) or not isinstance(raw[key], str):
            raise TrainerError(CONFIG_INVALID, f"paths.{key} is required")
    for key in ("validation", "test"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise TrainerError(CONFIG_INVALID, f"paths.{key} must be a string")
    paths = Paths(
        model=raw["model"],
        train=raw["train"],
        output=raw["output"],
        validation=raw.get("validation") or None,
        test=raw.get("test") or None,
    )
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return JobConfig(spec=spec, paths=paths, metadata=metadata)


def load_config(path: str) -> JobConfig:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise TrainerError(CONFIG_INVALID, f"cannot read job config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise TrainerError(
            CONFIG_INVALID, f"job config {path} is not JSON (line {e.lineno}: {e.msg})"
        ) from None
    return parse_config(doc)


# ---------------------------------------------------------------- hardware decisions

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo_text: str) -> set[str]:
    for line in cpuinfo_text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def read_cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            return cpu_flags(f.read())
    except OSError:
        return set()


def cpu_supports_bf16(flags: set[str]) -> bool:
    return any(f in flags for f in CPU_BF16_FLAGS)


def choose_precision(
    precision: Precision | str, cuda: bool, cuda_bf16: bool, cpu_bf16: bool
) -> str:
    """-> 'bf16' | 'fp16' | 'fp32'. auto: bf16 where the hardware runs it fast, else fp32."""
    p = Precision(precision)
    if p == Precision.auto:
        if cuda:
            return "bf16" if cuda_bf16 else "fp32"
        return "bf16" if cpu_bf16 else "fp32"
    if p == Precision.fp16 and not cuda:
        raise TrainerError(
            "UnsupportedHardware", "precision fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU"
        )
    if p == Precision.bf16 and cuda and not cuda_bf16:
        raise TrainerError(
            "UnsupportedHardware", "precision bf16 is not supported by this GPU; use auto or fp16"
        )
    return p.value


def load_dtype_name(precision: str, adapter_type: AdapterType | str) -> str:
    """dtype the base weights are loaded in: half precision for frozen LoRA bases, fp32 master
    weights for full fine-tuning (mixed precision autocasts the compute)."""
    if AdapterType(adapter_type) == AdapterType.full:
        return "float32"
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def estimate_training_bytes(
    n_params: int,
    hidden_size: int,
    num_layers: int,
    batch_size: int,
    seq_len: int,
    adapter_type: AdapterType | str,
    weight_bytes: int = 2,
) -> int:
    """Rough peak memory of a training step without gradient checkpointing."""
    kind = AdapterType(adapter_type)
    if kind == AdapterType.full:
        states = n_params * (4 + 4 + 8)  # fp32 weights, grads, Adam moments
    elif kind == AdapterType.qlora:
        states = n_params // 2 + int(n_params * 0.02) * 16
    else:
        states = n_params * weight_bytes + int(n_params * 0.02) * 16  # frozen base + adapter/optimizer
    # activations kept for backward: ~34 values per token per hidden unit per layer (attention incl.)
    activations = batch_size * seq_len * hidden_size * num_layers * 34 * 2
    return int(states + activations)


def decide_gradient_checkpointing(
    setting: Optional[bool], cuda: bool, need_bytes: int, device_bytes: Optional[int]
) -> bool:
    """Explicit setting wins; unset: off on CPU, on GPU only when the estimate does not fit."""
    if setting is not None:
        return bool(setting)
    if not cuda or not device_bytes:
        return False
    return need_bytes > 0.85 * device_bytes


# ---------------------------------------------------------------- steps

def steps_per_epoch(rows: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    per_step = max(1, batch_size * max(1, world_size))
    micro_batches = math.ceil(rows / per_step)
    return max(1, math.ceil(micro_batches / max(1, grad_accum)))


def total_steps(hp: Hyperparameters, rows: int, world_size: int = 1) -> int:
    if hp.max_steps:
        return int(hp.max_steps)
    return max(1, math.ceil(hp.epochs * steps_per_epoch(rows, hp.batch_size, hp.gradient_accumulation_steps, world_size)))


def logging_steps(total: int) -> int:
    return max(1, total // LOG_POINTS)


def save_steps(total: int) -> int:
    return max(1, min(MAX_SAVE_STEPS, math.ceil(total * SAVE_FRACTION)))


def eval_steps(total: int) -> int:
    return max(1, min(MAX_EVAL_STEPS, math.ceil(total / EVAL_POINTS)))


def training_arguments(
    hp: Hyperparameters,
    output_dir: str,
    total: int,
    precision: str,
    gradient_checkpointing: bool,
    has_eval: bool,
    cuda: bool,
    world_size: int = 1,
) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig (transformers 5 / TRL 1.x names)."""
    steps_save = save_steps(total)
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": float(hp.epochs),
        "max_steps": int(hp.max_steps) if hp.max_steps else -1,
        "learning_rate": float(hp.learning_rate),
        "per_device_train_batch_size": int(hp.batch_size),
        "per_device_eval_batch_size": int(hp.batch_size),
        "gradient_accumulation_steps": int(hp.gradient_accumulation_steps),
        "lr_scheduler_type": hp.lr_scheduler.value,
        # transformers 5: a float < 1 is a ratio of the total steps (warmup_ratio is gone)
        "warmup_steps": float(hp.warmup_ratio) if hp.warmup_ratio < 1 else int(total),
        "weight_decay": float(hp.weight_decay),
        "max_length": int(hp.max_seq_length),
        "seed": int(hp.seed),
        "data_seed": int(hp.seed),
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "gradient_checkpointing": bool(gradient_checkpointing),
        "logging_strategy": "steps",
        "logging_steps": logging_steps(total),
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": steps_save,
        "save_total_limit": 2,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": eval_steps(total) if has_eval else None,
        "report_to": [],
        "disable_tqdm": True,
        "log_level": "warning",
        "dataloader_num_workers": 0,
        "remove_unused_columns": True,
        "include_num_input_tokens_seen": "non_padding",
        "save_only_model": False,
        "use_cpu": not cuda,
    }
    if gradient_checkpointing:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if world_size > 1:
        args["ddp_backend"] = "nccl" if cuda else "gloo"
        args["ddp_find_unused_parameters"] = False
    return args
