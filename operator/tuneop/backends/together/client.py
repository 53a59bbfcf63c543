"""backend: together — what a FineTuneJob does with the Together AI fine-tuning API.

Pure parts (dict in, dict out; unit-tested without any network):

``map_model(base_model) -> str | None``
    Default Together model name for a few well-known Hugging Face ids (:data:`TOGETHER_MODELS`).
    ``together.model`` in the spec always wins (:func:`together_model`).
``unsupported(spec) -> list[str]``
    What Together cannot do with this spec, one message per problem naming the field, for a
    ``Validated=False`` condition (reason ``UnsupportedByBackend``). Empty list: fine.
``ignored(spec) -> list[str]``
    Settings that have no effect with Together (resources, precision, test split...): worth a
    ``Normal`` event, not a failure.
``create_params(spec, *, training_file, validation_file, suffix, dataset_format=None) -> dict``
    Keyword arguments for ``client.fine_tuning.create(...)`` (SDK 3.1.1).
``estimate_params(params) -> dict``
    The create params as ``POST /v1/fine-tunes/estimate-price`` takes them (Together's own price
    estimate, in USD; ``total_price`` of a job is in nanodollars).
``check_limits(params, limits) -> list[str]``
    The request against ``GET /v1/fine-tunes/models/limits`` (a dict), messages naming our fields.
``unique_suffix(namespace, name, uid, generation, prefix=None) -> str``
    Deterministic suffix (<= 40 chars, ``[a-z0-9-]``) put on the Together job, so a restarted
    operator finds the job it created: ``find_existing(jobs, suffix) -> dict | None``.
``status_view(ft) -> dict``
    A FinetuneResponse (wire dict) -> our status fields (phase, reason, message, progress,
    tokenCount, costUSD, modelOutputName, download/terminal flags). Never raises: a field of the
    wrong type is left out and named in ``problems``.
``readable_job(reply) -> dict | None``
    The reply of a create (or a list entry) when it is a job we can use (an object with an id).
``retry_delay(retry_after, default) -> float``
    The next poll/requeue delay: Together's ``Retry-After`` clamped to
    [:data:`RETRY_AFTER_MIN`, :data:`RETRY_AFTER_MAX`] seconds, else ``default``.
``normalize_base_url(url) -> (url, warning)``
    ``TOGETHER_BASE_URL`` is the host root (the SDK's paths carry ``/v1``): a trailing ``/v1`` is
    stripped, with a warning to log.
``event_to_k8s(event) -> (type, reason, message)`` and ``new_events(events, cursor)``
    Mirroring Together's job events as Kubernetes Events, once each.
``download_checkpoint(spec)``
    ``"adapter"`` for LoRA jobs, ``"model_output_path"`` for full fine-tuning.

Thin client: :class:`TogetherClient` wraps ``together.Together`` (sync; call it from
``asyncio.to_thread`` in kopf handlers). Every request is counted through ``on_request(method,
code)`` (see ``tuneop.metrics.TogetherRequestMetrics``). Errors come out as :class:`TogetherUserError` (fix the spec,
data or Secret: not retried) or :class:`TogetherTransientError` (429/5xx/network: retry later,
``retry_after`` seconds when known). The API key never appears in their text, in ``repr`` or in
logs.

Creating a job is the one non-idempotent call: the SDK would retry ``POST /v1/fine-tunes`` with no
idempotency key, so :meth:`TogetherClient.create_or_adopt` lists jobs first (adopting one carrying
our suffix), creates with retries disabled, and after an ambiguous failure (connection dropped,
timeout, 5xx, or a 200 whose body is empty, truncated or not a job object) lists again and adopts
the job if it exists; otherwise it raises :class:`TogetherTransientError` and the next attempt
starts by listing again.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import functools
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from ...api.finetunejob import AdapterType, FineTuneJobSpec, LrScheduler, Method

log = logging.getLogger(__name__)

__all__ = [
    "TOGETHER_MODELS",
    "TERMINAL_STATES",
    "TogetherBackendError",
    "TogetherUserError",
    "TogetherTransientError",
    "TogetherClient",
    "map_model",
    "together_model",
    "unsupported",
    "ignored",
    "create_params",
    "check_limits",
    "unique_suffix",
    "find_existing",
    "status_view",
    "event_to_k8s",
    "new_events",
    "download_checkpoint",
    "redact",
    "readable_job",
    "retry_delay",
    "normalize_base_url",
    "RETRY_AFTER_MIN",
    "RETRY_AFTER_MAX",
    "parse_retry_after",
    "describe_reply",
]

# Hugging Face id (lower case) -> Together fine-tuning model name. Modest on purpose: Together's
# catalogue changes; anything else needs `together.model` in the spec.
TOGETHER_MODELS: dict[str, str] = {
    "meta-llama/llama-3.1-8b-instruct": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference",
    "meta-llama/meta-llama-3.1-8b-instruct": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference",
    "meta-llama/llama-3.1-8b": "meta-llama/Meta-Llama-3.1-8B-Reference",
    "meta-llama/llama-3.1-70b-instruct": "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference",
    "meta-llama/llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "meta-llama/llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "meta-llama/llama-3.3-70b-instruct": "meta-llama/Llama-3.3-70B-Instruct-Reference",
    "qwen/qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen/qwen2.5-14b-instruct": "Qwen/Qwen2.5-14B-Instruct",
    "qwen/qwen2.5-72b-instruct": "Qwen/Qwen2.5-72B-Instruct",
    "qwen/qwen3-8b": "Qwen/Qwen3-8B",
    "mistralai/mistral-7b-instruct-v0.2": "mistralai/Mistral-7B-Instruct-v0.2",
}

TERMINAL_STATES = ("completed", "cancelled", "error", "user_error")
SUFFIX_MAX = 40
_HASH_LEN = 10
_EVENT_MESSAGE_LIMIT = 1024
# Bounds of an honoured Retry-After (seconds): not hammering Together, not waiting for ever.
RETRY_AFTER_MIN = 5.0
RETRY_AFTER_MAX = 600.0
_PREVIEW = 60

# ------------------------------------------------------------------------------------- errors


class TogetherBackendError(Exception):
    """A Together call failed. ``reason`` is CamelCase for a condition/termination message;
    ``status_code`` the HTTP status (None: no response). The message never holds the API key."""

    user_error = False

    def __init__(self, reason: str, message: str, status_code: Optional[int] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after


class TogetherUserError(TogetherBackendError):
    """Fix the spec, the data or the Secret: retrying will not help (kopf.PermanentError)."""

    user_error = True


class TogetherTransientError(TogetherBackendError):
    """Rate limited, Together unavailable, network trouble: retry later (kopf.TemporaryError)."""


def redact(text: str, *secrets: Optional[str]) -> str:
    """``text`` with every secret replaced by ``***`` (belt and braces for error messages)."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


# -------------------------------------------------------------------------------- pure: spec


def map_model(base_model: str) -> Optional[str]:
    """Default Together model for a Hugging Face id (case-insensitive), or None. A name that is
    already a Together model name of the table maps to itself."""
    key = (base_model or "").strip().lower()
    if key in TOGETHER_MODELS:
        return TOGETHER_MODELS[key]
    for value in TOGETHER_MODELS.values():
        if value.lower() == key:
            return value
    return None


def together_model(spec: FineTuneJobSpec) -> Optional[str]:
    """``together.model`` if set, else :func:`map_model` of ``baseModel``."""
    if spec.together is not None and spec.together.model:
        return spec.together.model
    return map_model(spec.base_model)


def _is_local_model(base_model: str) -> bool:
    return base_model.startswith(("/", "./", "../", "pkg://")) or base_model.lower().endswith(".gguf")


def unsupported(spec: FineTuneJobSpec) -> list[str]:
    """Messages (naming the field) for what backend together cannot do with ``spec``."""
    out: list[str] = []
    if spec.together is None:
        out.append("together: backend together requires the together block (apiKeySecretRef)")
    if spec.adapter.type == AdapterType.qlora:
        out.append("adapter.type: qlora is not offered by Together; use lora or full")
    if spec.adapter.layers:
        out.append("adapter.layers: Together adapts every layer; remove adapter.layers")
    if spec.tracking is not None:
        out.append("tracking: experiment tracking needs the training to run here (backend kubernetes); remove tracking")
    from_checkpoint = bool(spec.together and spec.together.from_checkpoint) or bool(
        spec.start_from and (spec.start_from.together_checkpoint or spec.start_from.fine_tune_job))
    if not from_checkpoint and together_model(spec) is None:
        if _is_local_model(spec.base_model):
            out.append(
                f"baseModel: {spec.base_model!r} is a local model; Together trains its own hosted "
                "models: set together.model"
            )
        elif spec.model_volume is not None:
            out.append("modelVolume: Together cannot read a model from a volume; set together.model")
        else:
            out.append(
                f"baseModel: no known Together model for {spec.base_model!r}; set together.model "
                "to the Together model name"
            )
    if spec.output.s3 is not None:
        out.append("output.s3: the Together backend writes the adapter to output.pvc only; remove output.s3")
    for split in ("train", "validation", "test"):
        src = getattr(spec.dataset, split)
        if src is not None and (src.url or "").lower().startswith("s3://"):
            out.append(f"dataset.{split}.url: the Together backend reads no s3:// data; use pvc, url (https) or configMap")
    hp = spec.hyperparameters
    if hp.max_steps is not None:
        out.append("hyperparameters.maxSteps: Together trains whole epochs; remove maxSteps and set epochs")
    if hp.max_train_seconds is not None:
        out.append(
            "hyperparameters.maxTrainSeconds: Together trains whole epochs; remove maxTrainSeconds and set epochs"
        )
    if float(hp.epochs) != int(hp.epochs):
        out.append(f"hyperparameters.epochs: Together needs a whole number of epochs, got {hp.epochs:g}")
    if hp.lr_scheduler in (LrScheduler.cosine_with_restarts, LrScheduler.polynomial):
        out.append(
            f"hyperparameters.lrScheduler: {hp.lr_scheduler.value} is not offered by Together; "
            "use linear, cosine, constant or constant_with_warmup"
        )
    if spec.together is not None and spec.together.n_evals and not (
        spec.dataset.validation is not None or spec.dataset.validation_split
    ):
        out.append("together.nEvals: evaluations need dataset.validation or dataset.validationSplit")
    return out


def ignored(spec: FineTuneJobSpec) -> list[str]:
    """Settings that have no effect with backend together (for an informational event)."""
    out: list[str] = []
    r = spec.resources
    if r.nodes != 1 or r.gpus != 1 or r.cpu or r.memory or r.node_selector or r.tolerations:
        out.append("resources: Together chooses the hardware; resources only size the upload/download pods")
    if spec.hyperparameters.precision.value != "auto":
        out.append("hyperparameters.precision: chosen by Together")
    if spec.hyperparameters.gradient_checkpointing is not None:
        out.append("hyperparameters.gradientCheckpointing: chosen by Together")
    if spec.method == Method.dpo and spec.hyperparameters.train_on_inputs:
        out.append("hyperparameters.trainOnInputs: only applies to sft")
    if spec.dataset.test is not None and spec.evaluation.enabled:
        out.append("dataset.test: not evaluated with backend together")
    if spec.image:
        out.append("image: only used by the upload/download pods")
    if spec.termination_grace_period_seconds is not None:
        out.append("terminationGracePeriodSeconds: no training pod runs here; Together's job is cancelled instead")
    return out


def _lr_scheduler(s: LrScheduler) -> dict[str, Any]:
    # constant == linear decay to min_lr_ratio 1.0 (warmup still applies).
    if s == LrScheduler.cosine:
        return {"lr_scheduler_type": "cosine", "min_lr_ratio": 0.0}
    if s in (LrScheduler.constant, LrScheduler.constant_with_warmup):
        return {"lr_scheduler_type": "linear", "min_lr_ratio": 1.0}
    return {"lr_scheduler_type": "linear", "min_lr_ratio": 0.0}


def _target_modules(spec: FineTuneJobSpec) -> str:
    if spec.together is not None and spec.together.lora_trainable_modules:
        return spec.together.lora_trainable_modules
    mods = list(spec.adapter.target_modules) or ["all-linear"]
    return "all-linear" if "all-linear" in mods else ",".join(mods)


def create_params(
    spec: FineTuneJobSpec,
    *,
    training_file: str,
    validation_file: Optional[str],
    suffix: str,
    dataset_format: Optional[str] = None,
    from_checkpoint: Optional[str] = None,
) -> dict[str, Any]:
    """Keyword arguments for ``client.fine_tuning.create(**params)`` (SDK 3.1.1).
    ``from_checkpoint``: status.startedFrom's Together job id or checkpoint (spec.startFrom, or
    together.fromCheckpoint) when the reducer pinned one; else together.fromCheckpoint.

    Mapping: epochs->n_epochs, learningRate->learning_rate, batchSize->batch_size,
    gradientAccumulationSteps->gradient_accumulation_steps (when > 1), lrScheduler->
    lr_scheduler_type (+min_lr_ratio: constant = linear to 1.0), warmupRatio, weightDecay,
    maxSeqLength->max_seq_length, packing, seed->random_seed, adapter lora r/alpha/dropout/
    targetModules (or ``together.loraTrainableModules``) or full (lora=False), method sft
    (train_on_inputs; ``"auto"`` for text datasets, where there is nothing to mask) or dpo
    (dpo_beta), together.nCheckpoints/nEvals/fromCheckpoint. With fromCheckpoint the model is left
    out (the SDK takes one or the other).
    """
    hp = spec.hyperparameters
    tg = spec.together
    params: dict[str, Any] = {
        "training_file": training_file,
        "validation_file": validation_file or "",
        "n_epochs": int(hp.epochs),
        "learning_rate": float(hp.learning_rate),
        "batch_size": int(hp.batch_size),
        "warmup_ratio": float(hp.warmup_ratio),
        "weight_decay": float(hp.weight_decay),
        "max_seq_length": int(hp.max_seq_length),
        "packing": bool(hp.packing),
        "random_seed": int(hp.seed),
        "suffix": suffix,
        "training_method": spec.method.value,
    }
    params.update(_lr_scheduler(hp.lr_scheduler))
    if hp.gradient_accumulation_steps > 1:
        params["gradient_accumulation_steps"] = int(hp.gradient_accumulation_steps)
    checkpoint = from_checkpoint or (tg.from_checkpoint if tg is not None else None)
    if checkpoint:
        params["from_checkpoint"] = checkpoint
    else:
        params["model"] = together_model(spec)
    if spec.adapter.type == AdapterType.full:
        params["lora"] = False
    else:
        params.update(
            lora=True,
            lora_r=int(spec.adapter.r),
            lora_alpha=int(spec.adapter.alpha),
            lora_dropout=float(spec.adapter.dropout),
            lora_trainable_modules=_target_modules(spec),
        )
    if spec.method == Method.dpo:
        params["dpo_beta"] = float(hp.dpo_beta)
    else:
        params["train_on_inputs"] = "auto" if dataset_format == "text" else bool(hp.train_on_inputs)
    if tg is not None and tg.n_checkpoints is not None:
        params["n_checkpoints"] = int(tg.n_checkpoints)
    if tg is not None and tg.n_evals is not None:
        params["n_evals"] = int(tg.n_evals)
    elif validation_file:
        params["n_evals"] = 1
    return params


def estimate_params(params: dict[str, Any]) -> dict[str, Any]:
    """:func:`create_params` as ``fine_tuning.estimate_price(**...)`` takes them (SDK 3.1.1,
    ``FineTuningEstimatePriceParams``): training/validation file, model or fromCheckpoint, epochs,
    evaluations, the training method and type objects the SDK's own ``create`` sends."""
    out: dict[str, Any] = {
        "training_file": params["training_file"],
        "n_epochs": int(params.get("n_epochs") or 1),
        "n_evals": int(params.get("n_evals") or 0),
    }
    if params.get("validation_file"):
        out["validation_file"] = params["validation_file"]
    if params.get("from_checkpoint"):
        out["from_checkpoint"] = params["from_checkpoint"]
    else:
        out["model"] = params.get("model") or ""
    if params.get("training_method") == Method.dpo.value:
        out["training_method"] = {"method": "dpo", "dpo_beta": float(params.get("dpo_beta", 0.1))}
    else:
        out["training_method"] = {"method": "sft", "train_on_inputs": params.get("train_on_inputs", "auto")}
    if params.get("lora") is False:
        out["training_type"] = {"type": "Full"}
    else:
        lora: dict[str, Any] = {"type": "Lora", "lora_r": int(params["lora_r"]), "lora_alpha": int(params["lora_alpha"])}
        if params.get("lora_dropout") is not None:
            lora["lora_dropout"] = float(params["lora_dropout"])
        if params.get("lora_trainable_modules"):
            lora["lora_trainable_modules"] = params["lora_trainable_modules"]
        out["training_type"] = lora
    return out


def check_limits(params: dict[str, Any], limits: dict[str, Any]) -> list[str]:
    """Compare create params with the model's limits (``GET /v1/fine-tunes/models/limits``).
    Messages name our spec fields; empty list when the request fits."""
    out: list[str] = []
    model = limits.get("model_name") or params.get("model") or "the model"
    dpo = params.get("training_method") == "dpo"
    lora = params.get("lora") is not False
    block = limits.get("lora_training") if lora else limits.get("full_training")
    if not lora and not block:
        out.append(f"adapter.type: full fine-tuning is not supported for {model} on Together")
    bs = params.get("batch_size")
    if isinstance(block, dict) and isinstance(bs, int):
        hi = block.get("max_batch_size_dpo" if dpo else "max_batch_size")
        lo = block.get("min_batch_size")
        if hi is not None and bs > hi:
            out.append(f"hyperparameters.batchSize: {bs} is above Together's maximum {hi} for {model}")
        if lo is not None and bs < lo:
            out.append(f"hyperparameters.batchSize: {bs} is below Together's minimum {lo} for {model}")
    if lora and isinstance(block, dict) and block.get("max_rank") and params.get("lora_r", 0) > block["max_rank"]:
        out.append(f"adapter.r: {params['lora_r']} is above Together's maximum rank {block['max_rank']} for {model}")
    msl = params.get("max_seq_length")
    if msl is not None:
        lo = limits.get("min_max_seq_length")
        hi = limits.get("max_seq_length_dpo" if dpo else "max_seq_length_sft")
        if lo is not None and msl < lo:
            out.append(f"hyperparameters.maxSeqLength: {msl} is below Together's minimum {lo} for {model}")
        if hi is not None and msl > hi:
            out.append(f"hyperparameters.maxSeqLength: {msl} is above Together's maximum {hi} for {model}")
    lr = params.get("learning_rate")
    if lr is not None:
        if limits.get("max_learning_rate") is not None and lr > limits["max_learning_rate"]:
            out.append(f"hyperparameters.learningRate: {lr:g} is above Together's maximum {limits['max_learning_rate']:g}")
        if limits.get("min_learning_rate") is not None and lr < limits["min_learning_rate"]:
            out.append(f"hyperparameters.learningRate: {lr:g} is below Together's minimum {limits['min_learning_rate']:g}")
    ep = params.get("n_epochs")
    if ep is not None and limits.get("max_num_epochs") is not None and ep > limits["max_num_epochs"]:
        out.append(f"hyperparameters.epochs: {ep} is above Together's maximum {limits['max_num_epochs']}")
    for key, field, lkey in (("n_checkpoints", "together.nCheckpoints", "max_num_checkpoints"),
                             ("n_evals", "together.nEvals", "max_num_evals")):
        v = params.get(key)
        if v is not None and limits.get(lkey) is not None and v > limits[lkey]:
            out.append(f"{field}: {v} is above Together's maximum {limits[lkey]}")
    return out


# The ``checkpoint`` values of Together's download endpoint.
DownloadCheckpoint = Literal["merged", "adapter", "model_output_path"]


def download_checkpoint(spec: FineTuneJobSpec) -> DownloadCheckpoint:
    """What to download when the job completed: the LoRA adapter, or the full weights."""
    return "model_output_path" if spec.adapter.type == AdapterType.full else "adapter"


# ------------------------------------------------------------------------------ pure: suffix


def unique_suffix(namespace: str, name: str, uid: str, generation: int | str,
                  prefix: Optional[str] = None) -> str:
    """``<prefix or name>-<10 hex>``, lower case ``[a-z0-9-]``, at most 40 characters, the same for
    the same (namespace, name, uid, generation): the hash identifies the attempt, so an operator
    restart (or a retried create) finds its job with :func:`find_existing` instead of making a
    second one. ``prefix`` is ``together.suffix`` when the user set one. To create a fresh job on
    purpose for the same generation (e.g. retrying after Together's own ``error``), pass
    ``generation`` as ``"<generation>-<attempt>"``: otherwise the failed job would be adopted."""
    digest = hashlib.sha256(f"{namespace}/{name}/{uid}/{generation}".encode()).hexdigest()[:_HASH_LEN]
    base = re.sub(r"[^a-z0-9]+", "-", (prefix or name or "").lower()).strip("-")
    base = base[: SUFFIX_MAX - _HASH_LEN - 1].strip("-") or "tuneop"
    return f"{base}-{digest}"


def _job_suffix_matches(job: dict[str, Any], suffix: str) -> bool:
    if job.get("suffix") == suffix:
        return True
    name = job.get("model_output_name") or job.get("output_name") or ""
    last = str(name).rsplit("/", 1)[-1]
    return bool(suffix) and (last.endswith("-" + suffix) or f"-{suffix}-" in last or last == suffix)


def find_existing(jobs: list[dict[str, Any]], suffix: str) -> Optional[dict[str, Any]]:
    """The newest job (by created_at) whose suffix or model_output_name carries ``suffix``."""
    matches = [j for j in jobs if isinstance(j, dict) and _job_suffix_matches(j, suffix)]
    if not matches:
        return None
    return max(matches, key=lambda j: str(j.get("created_at") or ""))


# -------------------------------------------------------------------------- pure: status view


_PHASES = {
    "pending": ("Pending", "TogetherPending", "waiting for Together"),
    "queued": ("Pending", "TogetherQueued", "queued at Together"),
    "running": ("Running", "TogetherRunning", "training at Together"),
    "compressing": ("Running", "TogetherCompressing", "Together is compressing the model"),
    "uploading": ("Running", "TogetherUploading", "Together is uploading the model"),
    "cancel_requested": ("Running", "TogetherCancelRequested", "cancellation requested"),
    "completed": ("Running", "Downloading", "completed at Together; downloading the adapter"),
    "cancelled": ("Failed", "TogetherCancelled", "the Together job was cancelled"),
    "error": ("Failed", "TogetherError", "the Together job failed"),
    "user_error": ("Failed", "TogetherUserError", "Together rejected the job"),
}


def _last_event_with(events: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool]) -> Optional[dict]:
    for ev in reversed(events):
        if isinstance(ev, dict) and pred(ev):
            return ev
    return None


def _preview(value: Any) -> str:
    text = repr(" ".join(value.split()) if isinstance(value, str) else value)
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 3] + "..."


def describe_reply(reply: Any) -> str:
    """A few words on a reply that is not what was expected (for messages, never the whole body)."""
    if reply is None or (isinstance(reply, (str, bytes)) and not reply.strip()):
        return "an empty body"
    if isinstance(reply, str):
        return f"text {_preview(reply)}"
    if isinstance(reply, list):
        return f"a JSON list of {len(reply)} item(s)"
    if isinstance(reply, dict):
        return f"a JSON object without a job id (keys {_preview(sorted(str(k) for k in reply)[:6])})"
    return f"{type(reply).__name__} {_preview(reply)}"


def readable_job(reply: Any) -> Optional[dict[str, Any]]:
    """``reply`` when it is a job object we can use (a dict whose ``id`` is a non-empty string)."""
    if isinstance(reply, dict) and isinstance(reply.get("id"), str) and reply["id"].strip():
        return reply
    return None


def _number(value: Any, field: str, problems: list[str], *, integer: bool = False) -> Optional[float]:
    """A JSON number (not a bool, not NaN/inf) or None; anything else is a problem naming ``field``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        problems.append(f"Together reply field {field!r} is not a number: {_preview(value)}")
        return None
    return int(value) if integer else float(value)


def _text(value: Any, field: str, problems: list[str]) -> Optional[str]:
    value = getattr(value, "value", value)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.append(f"Together reply field {field!r} is not a string: {_preview(value)}")
        return None
    return value


def _failure_event(events: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Together's own word on a failed or cancelled job: the last error-like event, else the last
    event with a message."""
    ev = _last_event_with(events, lambda e: e.get("type") in ("job_error", "billing_limit", "job_stopped")
                          or e.get("level") in ("error", "legacy_ierror"))
    return ev or _last_event_with(events, lambda e: bool(e.get("message")))


def status_view(ft: Any) -> dict[str, Any]:
    """A FinetuneResponse as a wire dict (``model.to_dict()``) -> our status fields::

        {"jobId", "togetherStatus", "phase", "reason", "message", "terminal", "download",
         "progress": {"step", "totalSteps", "epoch", "etaSeconds"} | None,
         "tokenCount", "costUSD", "modelOutputName", "togetherMessage", "problems": [str]}

    ``phase`` is a FineTuneJob phase: pending/queued -> Pending; running, compressing, uploading,
    cancel_requested -> Running; completed -> Running with ``download: True`` (the adapter is not in
    our output yet: the handler starts the download pod and sets Succeeded when it is done);
    cancelled -> Failed/TogetherCancelled (the handler shows Suspended instead when it cancelled
    because of ``spec.suspend``); error -> Failed/TogetherError; user_error ->
    Failed/TogetherUserError; any other status -> Running/TogetherUnknownStatus (not terminal: polled
    on). For failures and cancellations the message ends with Together's own (``togetherMessage``:
    the last job_error event, else its last event). ``costUSD`` is ``total_price`` (nanodollars) / 1e9.

    Never raises. A field of the wrong type (``step: "ten"``) is left out (None: the caller keeps
    what it had) and named in ``problems`` ("Together reply field 'step' is not a number: 'ten'");
    a reply that is not an object at all gives ``togetherStatus``/``phase`` None.
    """
    problems: list[str] = []
    view: dict[str, Any] = {
        "jobId": None, "togetherStatus": None, "phase": None, "reason": None, "message": None,
        "terminal": False, "download": False, "progress": None, "tokenCount": None, "costUSD": None,
        "modelOutputName": None, "togetherMessage": None, "problems": problems,
    }
    if not isinstance(ft, dict):
        problems.append(f"Together reply is not a JSON object: {describe_reply(ft)}")
        return view
    status = _text(ft.get("status"), "status", problems)
    if status is None and not any("'status'" in p for p in problems):
        problems.append("Together reply field 'status' is missing")
    raw_events = ft.get("events")
    if raw_events is not None and not isinstance(raw_events, list):
        problems.append(f"Together reply field 'events' is not a list: {_preview(raw_events)}")
        raw_events = None
    events = [e for e in (raw_events or []) if isinstance(e, dict)]
    if status is not None:
        phase, reason, message = _PHASES.get(
            status, ("Running", "TogetherUnknownStatus",
                     f"Together reports status {status!r}, unknown to tuneop; still polling"))
        if status in ("error", "user_error", "cancelled"):
            ev = _failure_event(events)
            if ev and ev.get("message"):
                view["togetherMessage"] = " ".join(str(ev["message"]).split())[:_EVENT_MESSAGE_LIMIT]
                message = f"{message}: {view['togetherMessage']}"
        elif status == "queued":
            depth = _number(ft.get("queue_depth"), "queue_depth", problems, integer=True)
            if depth is not None:
                message = f"{message} (queue depth {depth})"
        view.update(togetherStatus=status, phase=phase, reason=reason, message=message,
                    terminal=status in TERMINAL_STATES, download=status == "completed")

    progress: dict[str, Any] = {}
    step_ev = _last_event_with(events, lambda e: e.get("step") is not None)
    epochs = _number(ft.get("epochs_completed"), "epochs_completed", problems)
    if step_ev is not None:
        step = _number(step_ev.get("step"), "step", problems, integer=True)
        total = _number(step_ev.get("total_steps"), "total_steps", problems, integer=True)
        if step is not None:
            progress["step"] = step
        if total:
            progress["totalSteps"] = total
    elif ft.get("epochs_completed") is not None:
        progress["step"] = 0
    if epochs is not None:
        progress["epoch"] = epochs
    prog = ft.get("progress")
    if prog is not None and not isinstance(prog, dict):
        problems.append(f"Together reply field 'progress' is not an object: {_preview(prog)}")
    elif isinstance(prog, dict) and prog.get("estimate_available") and prog.get("seconds_remaining") is not None:
        eta = _number(prog["seconds_remaining"], "seconds_remaining", problems, integer=True)
        if eta is not None:
            if step_ev is None:
                progress.setdefault("step", 0)
            progress["etaSeconds"] = eta
    if status == "completed" and progress.get("totalSteps"):
        progress["step"] = progress["totalSteps"]
        progress.pop("etaSeconds", None)
    view["progress"] = progress or None

    price = _number(ft.get("total_price"), "total_price", problems)
    view.update(
        jobId=_text(ft.get("id"), "id", problems),
        tokenCount=_number(ft.get("token_count"), "token_count", problems, integer=True),
        costUSD=price / 1e9 if price is not None else None,
        modelOutputName=_text(ft.get("model_output_name") or ft.get("output_name"), "model_output_name", problems),
    )
    view["problems"] = list(dict.fromkeys(problems))
    return view


def retry_delay(retry_after: Optional[float], default: float) -> float:
    """Seconds until the next poll/requeue: Together's ``Retry-After`` clamped to
    [RETRY_AFTER_MIN, RETRY_AFTER_MAX] (5 s .. 10 min), ``default`` when there is none (or it is
    not a number)."""
    if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) or retry_after != retry_after:
        return float(default)
    return float(min(max(float(retry_after), RETRY_AFTER_MIN), RETRY_AFTER_MAX))


def normalize_base_url(url: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``(url, warning)``. TOGETHER_BASE_URL is the host root (``https://api.together.xyz``): the
    SDK's paths already start with ``/v1``, so a trailing ``/v1`` would make every call a 404. It
    is stripped, and ``warning`` says so (None when the URL was fine)."""
    if not url or not url.strip():
        return None, None
    clean = url.strip().rstrip("/")
    fixed = clean
    while fixed.lower().endswith("/v1"):
        fixed = fixed[:-3].rstrip("/")
    if fixed == clean:
        return clean, None
    return fixed, (f"TOGETHER_BASE_URL {clean!r} ends in /v1; it is the host root (the SDK adds /v1): "
                   f"using {fixed!r}")


_WARNING_TYPES = {"job_error", "warning", "billing_limit", "job_stopped", "job_restarted", "cancel_requested"}
_WARNING_LEVELS = {"warning", "error", "legacy_iwarning", "legacy_ierror"}


def event_to_k8s(event: dict[str, Any]) -> tuple[str, str, str]:
    """A Together job event -> (``Normal``|``Warning``, CamelCase reason from its type, message).
    ``checkpoint_save`` -> ``("Normal", "CheckpointSave", "step 10/30: ...")``."""
    etype = str(getattr(event.get("type"), "value", event.get("type")) or "event")
    level = str(getattr(event.get("level"), "value", event.get("level")) or "")
    kind = "Warning" if etype in _WARNING_TYPES or level in _WARNING_LEVELS else "Normal"
    reason = "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", etype) if p) or "Event"
    message = " ".join(str(event.get("message") or "").split())
    if event.get("step") is not None:
        step = f"step {event['step']}" + (f"/{event['total_steps']}" if event.get("total_steps") else "")
        message = f"{step}: {message}" if message else step
    if not message:
        message = etype.replace("_", " ")
    if len(message) > _EVENT_MESSAGE_LIMIT:
        message = message[: _EVENT_MESSAGE_LIMIT - 3] + "..."
    return kind, reason, message


def new_events(events: list[dict[str, Any]], cursor: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events not mirrored yet. Together's event list of a job only grows, so the cursor is the
    number of events already seen (store it in status); a shorter list than the cursor (should not
    happen) yields nothing and keeps the cursor."""
    cursor = max(0, int(cursor or 0))
    if len(events) <= cursor:
        return [], cursor
    return list(events[cursor:]), len(events)


# ------------------------------------------------------------------------------- the client

_BASE_URL_WARNED: set[str] = set()  # normalize_base_url's warning: logged once per process


def _to_dict(obj: Any) -> Any:
    if obj is None or isinstance(obj, (dict, list, str, int, float, bool)):
        return obj
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_dict(mode="json", warnings=False)
    return obj.model_dump(mode="json", by_alias=True)  # pragma: no cover


class TogetherClient:
    """A small, key-safe wrapper of ``together.Together`` for the backend's calls.

    ``on_request(method, code)`` is called for every HTTP request (``code`` a status code string,
    or ``"error"`` when no response came back), e.g. ``TogetherRequestMetrics.record``.
    ``sleep`` is used between file validation polls (tests pass a no-op).
    """

    def __init__(
        self,
        api_key: str,
        base_url: Optional[str] = None,
        *,
        on_request: Optional[Callable[[str, str], None]] = None,
        max_retries: int = 2,
        timeout: float = 60.0,
        sleep: Optional[Callable[[float], None]] = None,
    ):
        import httpx
        import together

        if not api_key:
            raise TogetherUserError("TogetherAuth", "no Together API key (the Secret's key is empty)")
        self._key = api_key
        self.base_url, warning = normalize_base_url(base_url or os.environ.get("TOGETHER_BASE_URL"))
        if warning and warning not in _BASE_URL_WARNED:
            _BASE_URL_WARNED.add(warning)
            log.warning(warning)
        self._on_request = on_request
        self._sleep = sleep or time.sleep
        counter = self._count

        class _Counting(httpx.BaseTransport):
            def __init__(self) -> None:
                self._inner = httpx.HTTPTransport()

            def handle_request(self, request: httpx.Request) -> httpx.Response:
                try:
                    response = self._inner.handle_request(request)
                except Exception:
                    counter(request.method, "error")
                    raise
                counter(request.method, str(response.status_code))
                return response

            def close(self) -> None:
                self._inner.close()

        http_client = together.DefaultHttpxClient(transport=_Counting())
        kwargs: dict[str, Any] = dict(api_key=api_key, max_retries=max_retries, timeout=timeout,
                                      http_client=http_client)
        if self.base_url:
            kwargs["base_url"] = self.base_url
        try:
            self._sdk = together.Together(**kwargs)
        except together.TogetherError as e:  # pragma: no cover - only without a key
            raise TogetherUserError("TogetherAuth", self._safe(str(e))) from None

    def __repr__(self) -> str:
        return f"TogetherClient(base_url={self.base_url!r})"

    def _count(self, method: str, code: str) -> None:
        if self._on_request is not None:
            try:
                self._on_request(method, code)
            except Exception:  # noqa: BLE001 - metrics never break a call
                log.exception("on_request callback failed")

    def _safe(self, text: str) -> str:
        return redact(str(text), self._key)

    def close(self) -> None:
        self._sdk.close()

    def __enter__(self) -> "TogetherClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- error translation

    def _translate(self, e: BaseException, what: str) -> TogetherBackendError:
        import together

        if isinstance(e, TogetherBackendError):
            return e
        if isinstance(e, json.JSONDecodeError):
            # An answer came back but cannot be read (empty, truncated, not JSON): not the user's fault.
            return TogetherTransientError("TogetherUnavailable", self._safe(
                f"{what}: unreadable reply from Together ({describe_reply(e.doc)}: {e.msg})"), 200)
        if isinstance(e, together.APIResponseValidationError):
            return TogetherTransientError("TogetherUnavailable", self._safe(
                f"{what}: unreadable reply from Together: {str(e)[:300]}"), 200)
        if isinstance(e, together.APIConnectionError):  # includes APITimeoutError
            kind = "timed out" if isinstance(e, together.APITimeoutError) else "connection failed"
            return TogetherTransientError("TogetherUnavailable", f"{what}: {kind}")
        if isinstance(e, together.APIStatusError):
            code = e.status_code
            detail = _error_detail(e.body) or ""
            text = self._safe(f"{what}: HTTP {code}" + (f": {detail}" if detail else ""))
            if code == 429:
                return TogetherTransientError("TogetherRateLimited", text, code, _retry_after(e))
            if code in (408, 409) or code >= 500:
                return TogetherTransientError("TogetherUnavailable", text, code, _retry_after(e))
            if code in (401, 403):
                return TogetherUserError("TogetherAuth", text, code)
            return TogetherUserError("TogetherRejected", text, code)
        if isinstance(e, ValueError):  # the SDK's own parameter checks, before any request
            return TogetherUserError("TogetherRejected", self._safe(f"{what}: {e}"))
        return TogetherTransientError("TogetherError", self._safe(f"{what}: {type(e).__name__}: {e}"))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, what) from None

    # -- fine-tunes

    def model_limits(self, model: str) -> dict[str, Any]:
        return _to_dict(self._call("model limits", lambda: self._sdk.fine_tuning.model_limits(model_name=model)))

    def _data(self, what: str, reply: Any, *, required: bool = True) -> list[Any]:
        """The ``data`` list of a list reply; TogetherTransientError when the reply has none (we
        cannot tell what exists, so nothing may be created on its strength). ``required=False``: a
        missing or null ``data`` is an empty list."""
        reply = _to_dict(reply)
        data = reply.get("data") if isinstance(reply, dict) else None
        if isinstance(reply, dict) and data is None and not required:
            return []
        if not isinstance(data, list):
            shown = describe_reply(reply) if not isinstance(reply, dict) else f"'data' is {_preview(data)}"
            raise TogetherTransientError("TogetherUnavailable", self._safe(f"{what}: unreadable reply from Together: {shown}"))
        return data

    def list_jobs(self) -> list[dict[str, Any]]:
        res = self._call("list fine-tunes", lambda: self._sdk.fine_tuning.list())
        return [j for j in self._data("list fine-tunes", res) if isinstance(j, dict)]

    def find(self, suffix: str) -> Optional[dict[str, Any]]:
        return find_existing(self.list_jobs(), suffix)

    def retrieve(self, ft_id: str) -> dict[str, Any]:
        """The job as a wire dict (its fields unchecked: see :func:`status_view`).
        TogetherTransientError when the reply is not a JSON object at all (HTML, a list...)."""
        job = _to_dict(self._call(f"retrieve {ft_id}", lambda: self._sdk.fine_tuning.retrieve(ft_id)))
        if not isinstance(job, dict):
            raise TogetherTransientError(
                "TogetherUnavailable", self._safe(f"retrieve {ft_id}: Together reply is not a JSON object: "
                                                  f"{describe_reply(job)}"), 200)
        return job

    def estimate_price(self, params: dict[str, Any]) -> dict[str, Any]:
        """Together's price estimate (``POST /v1/fine-tunes/estimate-price``; ``params`` from
        :func:`estimate_params`) as a wire dict: ``estimated_total_price`` in USD, or
        ``estimation_available: false`` with ``unavailable_reason``."""
        reply = _to_dict(self._call("estimate price", lambda: self._sdk.fine_tuning.estimate_price(**params)))
        if not isinstance(reply, dict):
            raise TogetherTransientError("TogetherUnavailable", self._safe(
                f"estimate price: Together reply is not a JSON object: {describe_reply(reply)}"), 200)
        return reply

    def cancel(self, ft_id: str) -> dict[str, Any]:
        return _to_dict(self._call(f"cancel {ft_id}", lambda: self._sdk.fine_tuning.cancel(ft_id)))

    def list_events(self, ft_id: str, cursor: int = 0) -> tuple[list[dict[str, Any]], int]:
        """(events after ``cursor``, new cursor); see :func:`new_events`."""
        res = self._call(f"events of {ft_id}", lambda: self._sdk.fine_tuning.list_events(ft_id))
        return new_events(list(self._data(f"events of {ft_id}", res, required=False)), cursor)

    def create_or_adopt(self, params: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the fine-tune described by ``params`` (from :func:`create_params`) unless one with
        ``params["suffix"]`` exists. Returns ``(job dict, adopted)``. Raises TogetherUserError
        (limits, 4xx) or TogetherTransientError (nothing known to be created; call again later)."""
        import together
        from together.types.finetune_model_limits import FinetuneModelLimits

        suffix = params["suffix"]
        adoptable = readable_job(self.find(suffix))
        if adoptable is not None:
            return adoptable, True
        model = params.get("model") or str(params.get("from_checkpoint") or "").split(":")[0]
        limits_obj = self._call("model limits", lambda: self._sdk.fine_tuning.model_limits(model_name=model))
        limits = _to_dict(limits_obj)
        problems = check_limits(params, limits)
        if problems:
            raise TogetherUserError("TogetherLimits", self._safe("; ".join(problems)))
        if not isinstance(limits_obj, FinetuneModelLimits):  # pragma: no cover
            limits_obj = FinetuneModelLimits.model_construct(**limits)
        once = self._sdk.with_options(max_retries=0)
        try:
            reply = _to_dict(once.fine_tuning.create(**params, model_limits=limits_obj))
        except Exception as e:  # noqa: BLE001
            err = self._translate(e, "create fine-tune")
            ambiguous = isinstance(e, (together.APIConnectionError, json.JSONDecodeError,
                                       together.APIResponseValidationError)) or (
                isinstance(e, together.APIStatusError) and (e.status_code >= 500 or e.status_code == 408)
            )
            if not ambiguous:
                raise err from None
        else:
            job = readable_job(reply)
            if job is not None:
                return job, False
            # A 2xx Together processed, with a body we cannot read: as ambiguous as a 500.
            err = TogetherTransientError("TogetherUnavailable", self._safe(
                f"create fine-tune: unreadable reply from Together ({describe_reply(reply)})"), 200)
        # The POST may have created the job even though we got no (good) answer: look for it.
        try:
            adoptable = readable_job(self.find(suffix))
        except TogetherBackendError:
            adoptable = None
        if adoptable is not None:
            log.info("adopted Together job %s after a failed create", adoptable.get("id"))
            return adoptable, True
        raise err

    # -- files

    def upload_file(self, path: str, *, poll_seconds: float = 2.0, max_polls: int = 60) -> dict[str, Any]:
        """Upload a ``.jsonl`` file for fine-tuning; returns the FileResponse dict once Together's
        validation report says valid. TogetherUserError (reason ``TogetherFileInvalid``) with
        Together's message when it does not."""

        from together.lib import UploadManager
        from together.lib.resources.files import FileAlreadyExistsError

        def upload() -> Any:
            try:
                return UploadManager(self._sdk).upload("/v1/files", Path(path), "fine-tune")
            except FileAlreadyExistsError as e:
                return self._sdk.files.retrieve(e.file_id)

        info = _to_dict(self._call(f"upload {os.path.basename(path)}", upload))
        for _ in range(max_polls):
            status = str(info.get("processing_status") or "").upper()
            report = info.get("validation_report")
            if isinstance(report, dict) or status in ("COMPLETED", "FAILED", "INVALID_FORMAT") or not status:
                break
            self._sleep(poll_seconds)
            fid = info["id"]
            info = _to_dict(self._call(f"file {fid}", functools.partial(self._sdk.files.retrieve, fid)))
        report = info.get("validation_report") or {}
        status = str(info.get("processing_status") or "").upper()
        if (isinstance(report, dict) and report.get("valid") is False) or status in ("FAILED", "INVALID_FORMAT"):
            detail = (report or {}).get("error") or status.lower() or "invalid"
            raise TogetherUserError(
                "TogetherFileInvalid", self._safe(f"Together rejected {os.path.basename(path)}: {detail}")
            )
        return info

    # -- download

    def download(self, ft_id: str, dest: str, *, checkpoint: DownloadCheckpoint = "adapter",
                 max_bytes: int = 64 << 30, limit_source: str = "", attempts: int = 4) -> int:
        """Stream ``GET /v1/finetune/download?ft_id=..&checkpoint=..`` into ``dest`` (written as
        ``dest + ".part"`` then renamed); a broken stream resumes with ``Range: bytes=N-``.
        Returns the size. TogetherUserError (ArchiveInvalid) as soon as more than ``max_bytes``
        arrived; ``limit_source`` (where the limit comes from) goes into its message."""
        part = dest + ".part"
        written = 0
        last: Optional[TogetherBackendError] = None
        try:
            with open(part, "wb") as out:
                for _ in range(max(1, attempts)):
                    headers = {"Range": f"bytes={written}-"} if written else None
                    try:
                        with self._sdk.fine_tuning.with_streaming_response.content(
                            ft_id=ft_id, checkpoint=checkpoint, extra_headers=headers
                        ) as resp:
                            if written and resp.status_code != 206:  # Range ignored: start over
                                out.seek(0)
                                out.truncate()
                                written = 0
                            for chunk in resp.iter_bytes():
                                written += len(chunk)
                                if written > max_bytes:
                                    raise TogetherUserError("ArchiveInvalid", (
                                        f"download of {ft_id} exceeds the limit of {max_bytes} bytes"
                                        + (f" ({limit_source})" if limit_source else "")))
                                out.write(chunk)
                        last = None
                        break
                    except TogetherUserError:
                        raise
                    except Exception as e:  # noqa: BLE001
                        last = self._translate(e, f"download {ft_id}")
                        if last.user_error:
                            break
                        out.flush()
                        written = out.tell()
            if last is not None:
                raise last
        except BaseException:
            try:
                os.unlink(part)
            except OSError:
                pass
            raise
        os.replace(part, dest)
        return written


def _error_detail(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("type") or "")[:500]
        if isinstance(err, str):
            return err[:500]
        if body.get("message"):
            return str(body["message"])[:500]
        return ""
    if isinstance(body, str):
        return body[:500]
    return ""


def parse_retry_after(value: Optional[str], now: Optional[dt.datetime] = None) -> Optional[float]:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date (None: absent or
    unreadable). Unclamped: :func:`retry_delay` bounds it."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = (when - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()
    if seconds != seconds or abs(seconds) == float("inf"):
        return None
    return max(0.0, seconds)


def _retry_after(e: Any) -> Optional[float]:
    try:
        return parse_retry_after(e.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None
