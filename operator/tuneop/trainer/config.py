"""Reading the resolved job config and the pure decisions derived from it.

Nothing here imports torch: the hardware facts are passed in, which keeps every decision testable.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

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
class StartFromConfig:
    """The resolved spec.startFrom: the adapter or checkpoint directory to continue, where it is (for
    messages) and the sha256 its weights must have (None: recorded, not checked)."""

    path: str
    location: str
    sha256: Optional[str] = None


@dataclass(frozen=True)
class JobConfig:
    spec: FineTuneJobSpec
    paths: Paths
    metadata: dict[str, Any] = field(default_factory=dict)
    start_from: Optional[StartFromConfig] = None

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
    raw_metadata = doc.get("metadata")
    metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
    return JobConfig(spec=spec, paths=paths, metadata=metadata, start_from=parse_start_from(spec, doc.get("startFrom")))


def parse_start_from(spec: FineTuneJobSpec, raw: Any) -> Optional[StartFromConfig]:
    """The job config's ``startFrom`` ({"path", "location", "sha256"}). A spec.startFrom the config does not
    resolve to a directory is refused: training from scratch instead would be a silent surprise."""
    if spec.start_from is None or spec.start_from.together_checkpoint is not None:
        if raw is not None:
            raise TrainerError(CONFIG_INVALID, "startFrom: the job config has one but spec.startFrom does not")
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or not raw["path"]:
        raise TrainerError(CONFIG_INVALID, "spec.startFrom: not resolved to a directory (startFrom.fineTuneJob is "
                           "resolved by the operator once that job has succeeded; locally use startFrom.pvc)")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise TrainerError(CONFIG_INVALID, "startFrom.sha256 must be 64 hex digits")
    return StartFromConfig(path=raw["path"], location=str(raw.get("location") or raw["path"]), sha256=sha)


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


ACTIVATION_VALUES = 30


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
    # activations kept for backward: ~30 values per token per hidden unit per layer (attention incl.),
    # in the compute dtype. Measured without checkpointing, 16 x 512 tokens, bf16, Liger on, on an H100:
    # Llama-3.2-1B LoRA 14.3 GiB peak (~48 bytes per token x hidden x layer beside the weights),
    # Llama-3.1-8B QLoRA 66.7 GiB (~60 bytes).
    activations = batch_size * seq_len * hidden_size * num_layers * ACTIVATION_VALUES * max(2, weight_bytes)
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


# ---------------------------------------------------------------- adapter layers

def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """adapter.layers as sorted absolute indices of a model with `num_layers` decoder layers (negative
    indices count from the top: -1 is the last). A layer the model lacks, or one named twice (e.g. 29
    and -1 of 30), is a TrainerError naming the field."""
    if num_layers <= 0:
        raise TrainerError(CONFIG_INVALID, "adapter.layers: the model's config does not say how many decoder "
                           "layers it has (no num_hidden_layers); remove adapter.layers")
    out: list[int] = []
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise TrainerError(CONFIG_INVALID, f"adapter.layers: the model has no layer {i}: it has {num_layers} "
                               f"decoder layers (0 to {num_layers - 1}, or -{num_layers} to -1)")
        j = i % num_layers
        if j in out:
            raise TrainerError(CONFIG_INVALID, f"adapter.layers: layer {j} is listed twice "
                               f"(as {j} and {j - num_layers})")
        out.append(j)
    return sorted(out)


# ---------------------------------------------------------------- steps

def steps_per_epoch(rows: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    per_step = max(1, batch_size * max(1, world_size))
    micro_batches = math.ceil(rows / per_step)
    return max(1, math.ceil(micro_batches / max(1, grad_accum)))


def total_steps(hp: Hyperparameters, rows: int, world_size: int = 1) -> int:
    if hp.max_steps:
        return int(hp.max_steps)
    return max(1, math.ceil(hp.epochs * steps_per_epoch(rows, hp.batch_size, hp.gradient_accumulation_steps, world_size)))


# ---------------------------------------------------------------- time budget (maxTrainSeconds)
#
# With a budget the LR schedule runs on the fraction of the budget spent, not of the steps: the
# schedule ends (cosine at 0) when the budget does, however fast the machine turns out to be. Training
# stops before a step that would overrun the budget, judged by the mean time of the steps so far.

BUDGET_SCHEDULES = {
    "linear": "linear", "polynomial": "linear",  # HF's polynomial defaults to power 1: linear
    "cosine": "cosine", "cosine_with_restarts": "cosine",  # one cycle by default: cosine
    "constant": "constant", "constant_with_warmup": "constant",
}


def budget_progress(elapsed: float, budget: float, step: int, max_steps: int) -> float:
    """Fraction of training done: of the time budget or of the steps, whichever is further."""
    by_time = elapsed / budget if budget > 0 else 0.0
    by_steps = step / max_steps if max_steps and max_steps > 0 else 0.0
    return min(1.0, max(0.0, by_time, by_steps))


def budget_lr_factor(scheduler: str, progress: float, warmup: float) -> float:
    """LR multiplier at `progress` (0..1) of the budget, warming up over the first `warmup` of it. The
    same shapes as transformers' step schedules, on time instead of steps."""
    p = min(1.0, max(0.0, float(progress)))
    shape = BUDGET_SCHEDULES.get(scheduler, "linear")
    w = min(1.0, max(0.0, float(warmup)))
    if shape == "constant" and scheduler == "constant":
        return 1.0
    if w > 0 and p < w:
        return p / w
    if shape == "constant":
        return 1.0
    rest = (p - w) / (1.0 - w) if w < 1 else 1.0
    if shape == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * rest)))
    return max(0.0, 1.0 - rest)


def budget_pace(run_seconds: float, run_steps: int) -> Optional[float]:
    """Mean seconds a step of this run (saves and validation included); None before the first step."""
    return run_seconds / run_steps if run_steps > 0 and run_seconds > 0 else None


def budget_should_stop(elapsed: float, budget: float, pace: Optional[float]) -> bool:
    """Stop now if the budget is spent or one more step at the mean pace would end past it."""
    if elapsed >= budget:
        return True
    return pace is not None and elapsed + pace > budget


def budget_expected_steps(step: int, elapsed: float, budget: float, pace: Optional[float], max_steps: int) -> Optional[int]:
    """The step the run will end at, for progress and ETA: what the budget leaves at the mean pace,
    capped by the step limit (epochs or maxSteps)."""
    cap = max_steps if max_steps and max_steps > 0 else None
    if pace is None:
        return cap
    fit = step + int(max(0.0, budget - elapsed) // pace)
    return min(fit, cap) if cap is not None else fit


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
        # with a time budget the trainer replaces the schedule by one on time (budget_lr_factor)
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
        # Trainer's rotation runs before callbacks.CheckpointMarker declares the new checkpoint complete:
        # a kill between the two could leave no complete checkpoint. The marker callback rotates instead.
        "save_total_limit": None,
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


# ---------------------------------------------------------------- speed decisions
#
# Each of these is decided by the trainer itself (the spec has no knob for most of them), from facts
# passed in: the device, the model's shape, a sample of tokenized lengths, what is installed. The
# start event reports the plan with the reason of each choice.

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                    "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")
LIGER_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "granite", "olmo2", "glm4",
})
MIN_BATCHING_GAIN = 0.10  # a batching scheme must save at least 10% of the estimated compute
GROUP_MEGABATCH = 50  # transformers' LengthGroupedSampler sorts megabatches of 50 batches
COMPILE_MIN_STEPS = 1000  # torch.compile costs about a minute and gains a few percent: long runs only
CHECKPOINT_MEMORY_FRACTION = 0.85


def attention_is_varlen(attn_implementation: Optional[str]) -> bool:
    """Does this attention run each sequence of a flattened (padding-free) row on its own? FlashAttention's
    varlen kernels do; sdpa and eager build a dense block-diagonal mask over the whole row instead."""
    return str(attn_implementation or "") in VARLEN_ATTENTION


def step_cost(
    batches: list[list[int]],
    flattened: bool,
    varlen: bool,
    token_cost: float,
    pair_cost: float,
) -> float:
    """Estimated compute of batches of sequence lengths: linear layers per token, attention per
    (query, key) pair. Padded: every row is as long as the longest. Flattened (padding-free): one row of
    all tokens; with a dense mask its attention spans the whole row, with varlen kernels each sequence."""
    total = 0.0
    for lengths in batches:
        if not lengths:
            continue
        if flattened:
            n = sum(lengths)
            pairs = sum(x * x for x in lengths) if varlen else n * n
            total += n * token_cost + pairs * pair_cost
        else:
            m = max(lengths)
            total += len(lengths) * (m * token_cost + m * m * pair_cost)
    return total


def chunks(lengths: list[int], size: int) -> list[list[int]]:
    size = max(1, size)
    return [lengths[i : i + size] for i in range(0, len(lengths), size)]


def length_grouped(lengths: list[int], batch_size: int) -> list[list[int]]:
    """What transformers' LengthGroupedSampler does to (already shuffled) lengths: sort each
    megabatch of 50 batches by length, longest first, and cut it into batches."""
    out: list[list[int]] = []
    for mega in chunks(lengths, GROUP_MEGABATCH * batch_size):
        out += chunks(sorted(mega, reverse=True), batch_size)
    return out


@dataclass(frozen=True)
class Batching:
    mode: str  # "padded" | "padding_free" | "group_by_length" | "packing"
    reason: str
    pad_fraction: float = 0.0  # share of padded positions with plain padded batches


def decide_batching(
    packing: bool,
    method: str,
    lengths: list[int],
    batch_size: int,
    hidden_size: int,
    num_layers: int,
    n_params: int,
    attn_implementation: Optional[str],
) -> Batching:
    """How to batch sequences of mixed lengths, from a sample of tokenized lengths (in random order).

    - `packing: true` in the spec wins (it changes what a step holds, so only the user asks for it).
    - padding-free (flatten the batch into one row, same examples per step, same loss) when the attention
      runs per sequence (FlashAttention varlen) and it saves compute; with sdpa/eager the dense mask over
      the flattened row costs attention quadratic in the whole batch, so it is only taken when the
      estimate still says it pays.
    - else group_by_length (batches of similar lengths) when padding wastes enough: same examples per
      epoch, only their grouping into batches changes.
    - else padded.
    Costs per token ~ 4 x parameters (forward + input gradients of the frozen weights), per attended
    pair ~ 12 x hidden x layers (QK^T and AV, forward and backward).
    """
    if packing:
        return Batching("packing", "hyperparameters.packing is set")
    if method != "sft":
        return Batching("padded", f"method {method} pads its pairs itself")
    lengths = [int(x) for x in lengths if int(x) > 0]
    if batch_size < 2 or len(lengths) < 2:
        return Batching("padded", "batch of one sequence: nothing to pad")
    token_cost = 4.0 * max(1, n_params)
    pair_cost = 12.0 * max(1, hidden_size) * max(1, num_layers)
    batches = chunks(lengths, batch_size)
    padded = step_cost(batches, False, False, token_cost, pair_cost)
    real = sum(lengths)
    positions = sum(len(b) * max(b) for b in batches)
    pad_fraction = round(1.0 - real / positions, 4) if positions else 0.0
    varlen = attention_is_varlen(attn_implementation)
    options = {
        "padding_free": step_cost(batches, True, varlen, token_cost, pair_cost),
        "group_by_length": step_cost(length_grouped(lengths, batch_size), False, False, token_cost, pair_cost),
    }
    best = min(options, key=lambda k: (options[k], k != "padding_free"))
    gain = 1.0 - options[best] / padded if padded else 0.0
    if gain < MIN_BATCHING_GAIN:
        return Batching("padded", f"{pad_fraction:.0%} padding; no scheme saves {MIN_BATCHING_GAIN:.0%}", pad_fraction)
    attention = "varlen attention" if varlen else f"{attn_implementation or 'dense'} attention"
    return Batching(best, f"{pad_fraction:.0%} padding; saves ~{gain:.0%} of compute ({attention})", pad_fraction)


def token_count_mode(batching_mode: str) -> str:
    """`include_num_input_tokens_seen`: a flattened row has no padding, and its pad id may equal the
    EOS token the rows end with, so every position counts; padded batches count the attention mask."""
    return "all" if batching_mode in ("padding_free", "packing") else "non_padding"


def decide_compact_lm_head(cuda: bool) -> bool:
    """TRL's fused LM head scores only the positions with a label on Triton devices, and every position
    elsewhere (to keep shapes static for compilers like Neuron's). Eager CPU has no such concern, and with
    completion-only loss most positions carry no label: score only those."""
    return not cuda


def decide_liger(setting: Optional[bool], cuda: bool, available: bool, model_type: str) -> tuple[bool, str]:
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) where they exist: CUDA, the package
    installed (it is optional), a model family it patches. An explicit setting wins when possible."""
    if setting is False:
        return False, "disabled"
    if not cuda:
        return False, "no CUDA"
    if not available:
        return False, "liger-kernel not installed"
    if model_type not in LIGER_MODEL_TYPES:
        return False, f"no Liger kernels for {model_type}"
    return True, f"fused kernels for {model_type}"


COMPILE_MIN_TORCH = (2, 15)


def version_tuple(version: str) -> tuple[int, int]:
    """'2.11.0+cu130' -> (2, 11); unparsable -> (0, 0)."""
    parts = []
    for piece in str(version).split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def decide_torch_compile(
    setting: Optional[bool],
    cuda: bool,
    adapter_type: AdapterType | str,
    total_steps: int,
    static_shapes: bool,
    torch_version: str = "0.0",
) -> tuple[bool, str]:
    """torch.compile pays on CUDA over long runs of static shapes (its minute of compilation against a few
    percent per step); not for 4-bit bases (bitsandbytes ops break the graph) nor varying shapes, and
    not before torch 2.15: earlier Dynamo passes Python floats to Triton kernels as fp64, so the graph
    breaks at TRL's fused LM head kernels (measured on an H100 with torch 2.11: 48.4k vs 49.3k tok/s
    uncompiled, 1B LoRA, after 30 s of compilation)."""
    if setting is not None:
        if setting and not cuda:
            return False, "no CUDA"
        return bool(setting), "set explicitly"
    if not cuda:
        return False, "no CUDA"
    if version_tuple(torch_version) < COMPILE_MIN_TORCH:
        return False, f"torch {torch_version} < 2.15 breaks the graph at the fused LM head"
    if AdapterType(adapter_type) == AdapterType.qlora:
        return False, "4-bit base"
    if not static_shapes:
        return False, "sequence lengths vary"
    if total_steps < COMPILE_MIN_STEPS:
        return False, f"{total_steps} steps < {COMPILE_MIN_STEPS}: compilation would not pay"
    return True, f"{total_steps} steps of static shapes"


def parse_switch(value: Optional[str]) -> Optional[bool]:
    """An environment override: '1'/'true'/'on' -> True, '0'/'false'/'off' -> False, else None (auto)."""
    v = (value or "").strip().lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    return None


# ---------------------------------------------------------------- shared prompt prefix

SHARED_PREFIX_MIN_TOKENS = 16
SHARED_PREFIX_MIN_SAVING = 0.10


def shared_prefix_length(rows: Iterable[tuple[Sequence[int], Sequence[int]]]) -> int:
    """How many leading tokens every row has in common and may be computed once per batch.

    The longest common prefix of the token rows, cut so that, in every row, no token up to and including
    the one right after the prefix carries a label (-100 is "no label"): the prediction of that token
    comes from the prefix's last position, which the shortened rows no longer hold. Every row keeps at
    least two tokens of its own. `rows`: (input_ids, labels) pairs, read once, in order; the reading
    stops at the first row that leaves no prefix. 0 when nothing qualifies."""
    prefix: Optional[list[int]] = None
    limit: Optional[int] = None
    for ids, labs in rows:
        ids = list(ids)
        first_label = next((i for i, x in enumerate(labs) if int(x) != -100), len(ids))
        row_limit = min(first_label - 1, len(ids) - 2)
        limit = row_limit if limit is None else min(limit, row_limit)
        if prefix is None:
            prefix = ids
        else:
            n, top = 0, min(len(prefix), len(ids))
            while n < top and prefix[n] == ids[n]:
                n += 1
            del prefix[n:]
        if not prefix or limit <= 0:
            return 0
    if prefix is None or limit is None:
        return 0
    return min(len(prefix), limit)


def shared_prefix_blocked(
    setting: Optional[bool], method: str, batching: str, gradient_checkpointing: bool, torch_compile: bool,
    batch_size: int,
) -> Optional[str]:
    """Why the shared prefix cannot be used whatever the rows hold (None: it may be), so the rows need
    not be read for it."""
    if setting is False:
        return "switched off (TUNEOP_SHARED_PREFIX=0)"
    if method != "sft":
        return f"method {method}"
    if batching in ("packing", "padding_free"):
        return f"{batching} batches have no per-row prefix"
    if gradient_checkpointing:
        return "gradient checkpointing recomputes layers"
    if torch_compile:
        return "torch.compile"
    if batch_size < 2:
        return "batch of one row"
    return None


def decide_shared_prefix(
    setting: Optional[bool],
    method: str,
    batching: str,
    gradient_checkpointing: bool,
    torch_compile: bool,
    prefix_tokens: int,
    mean_length: float,
    batch_size: int,
) -> tuple[bool, str]:
    """Whether to compute the rows' common prefix once per batch (its keys and values shared by every
    row) instead of once per row. It changes no value: the suffixes attend to the same keys and values
    at the same positions. What it saves is (batch - 1) x prefix tokens per batch.

    Not with packing or padding-free batches (one flattened row has no per-row prefix), nor with
    gradient checkpointing (re-running a layer would append its keys to the shared cache a second time),
    nor under torch.compile (a cache grown inside the graph is untested there), nor for DPO."""
    blocked = shared_prefix_blocked(setting, method, batching, gradient_checkpointing, torch_compile, batch_size)
    if blocked:
        return False, blocked
    if prefix_tokens <= 0:
        return False, "rows share no prompt prefix"
    saving = (batch_size - 1) * prefix_tokens / (batch_size * max(1.0, float(mean_length)))
    if setting is not None:
        return bool(setting), f"set explicitly ({prefix_tokens} shared tokens, ~{saving:.0%} of tokens)"
    if prefix_tokens < SHARED_PREFIX_MIN_TOKENS:
        return False, f"shared prefix of {prefix_tokens} tokens < {SHARED_PREFIX_MIN_TOKENS}"
    if saving < SHARED_PREFIX_MIN_SAVING:
        return False, f"{prefix_tokens} shared tokens save ~{saving:.0%} < {SHARED_PREFIX_MIN_SAVING:.0%}"
    return True, f"{prefix_tokens} shared tokens of {mean_length:.0f} on average: ~{saving:.0%} fewer tokens"


# ---------------------------------------------------------------- training fingerprint
#
# What a run trains is decided by the spec (minus the keys that only say where, when or how long it
# runs), the content of its train and validation data, and the base model named by baseModel. Runs
# with the same fingerprint may resume each other's checkpoints and reuse each other's adapter; a
# changed fingerprint trains afresh.

FINGERPRINT_VERSION = 1  # bumped when the meaning of the fingerprint changes
FINGERPRINT_IGNORED = (
    # where the data and the output live (data are hashed by content), how the pod runs, evaluation
    "storage",  # spec.storage: where s3:// data and output live
    "suspend", "evaluation", "activeDeadlineSeconds", "maxRetries", "image", "hfTokenSecretRef", "output",
    "terminationGracePeriodSeconds", "backend", "together", "modelVolume", "maxCostUSD", "tracking",
    "startFrom",  # where the starting adapter is: it counts by the sha256 of its weights (start_sha256)
)
FINGERPRINT_RESOURCES = ("gpus", "nodes")  # the world size changes the steps; the rest places the pods
FINGERPRINT_DATASET = ("format", "validationSplit")  # train/validation sources: hashed by content; test: evaluation


def fingerprint_fields(
    spec: dict[str, Any], data_sha256: dict[str, Optional[str]], start_sha256: Optional[str] = None,
) -> dict[str, Any]:
    """The part of a resolved spec (camelCase, as `FineTuneJobSpec.to_dict()` writes it) that changes what
    is trained, plus the sha256 of the train and validation files' contents and (spec.startFrom) of the
    starting adapter's weights."""
    kept = {k: v for k, v in spec.items() if k not in FINGERPRINT_IGNORED}
    resources = spec.get("resources") or {}
    kept["resources"] = {k: resources[k] for k in FINGERPRINT_RESOURCES if k in resources}
    dataset = spec.get("dataset") or {}
    kept["dataset"] = {k: dataset[k] for k in FINGERPRINT_DATASET if dataset.get(k) is not None}
    kept["data"] = {split: data_sha256.get(split) for split in ("train", "validation")}
    kept["fingerprintVersion"] = FINGERPRINT_VERSION
    if start_sha256 is not None:
        kept["startFrom"] = start_sha256
    return kept


def training_fingerprint(
    spec: dict[str, Any], data_sha256: dict[str, Optional[str]], start_sha256: Optional[str] = None,
) -> str:
    """A short hash (16 hex digits) of `fingerprint_fields`: the name of the run's checkpoint directory
    and the adapter manifest's `trainingFingerprint`."""

    text = json.dumps(fingerprint_fields(spec, data_sha256, start_sha256), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
