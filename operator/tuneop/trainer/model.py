"""Loading the base model and tokenizer; LoRA/QLoRA set-up; the training chat template."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import sys
import warnings
from typing import Any, Optional

from ..api.finetunejob import AdapterSpec, AdapterType
from . import config as C
from .errors import CONFIG_INVALID, TRAINING_ERROR, UNSUPPORTED_HARDWARE, TrainerError
from .paths import ModelSource

# ChatML with {% generation %} markers, installed when the tokenizer's own template lacks them
# (assistant-only loss needs them) or when the tokenizer has no template at all.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def nvidia_device_present() -> bool:
    """Cheap check without importing torch: does this container see an NVIDIA GPU at all?"""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/proc/driver/nvidia/gpus")


def check_qlora_hardware(adapter_type: AdapterType, gguf: bool) -> None:
    """QLoRA needs CUDA + bitsandbytes. Fails before any model is loaded: bitsandbytes on CPU silently
    corrupts gradients after an eval-mode forward, so CPU QLoRA is refused outright."""
    if AdapterType(adapter_type) != AdapterType.qlora:
        return
    message = (
        "adapter.type qlora needs a CUDA GPU (4-bit NF4 via bitsandbytes); this pod has none. "
        "Use adapter.type lora on CPU, or request GPUs (resources.gpus)."
    )
    if not nvidia_device_present():
        raise TrainerError(UNSUPPORTED_HARDWARE, message)
    import torch

    if not torch.cuda.is_available():
        raise TrainerError(UNSUPPORTED_HARDWARE, message)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainerError(
            UNSUPPORTED_HARDWARE, "adapter.type qlora needs the bitsandbytes package in the trainer image"
        ) from None
    if gguf:
        raise TrainerError(CONFIG_INVALID, "adapter.type qlora cannot start from a .gguf base; use lora")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise TrainerError(CONFIG_INVALID, f"cannot load the tokenizer of {source.original}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(source: ModelSource, dtype_name: str, adapter_type: AdapterType, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype_name)}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if AdapterType(adapter_type) == AdapterType.qlora:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise TrainerError(CONFIG_INVALID, f"cannot load base model {source.original}: {e}") from None
    if source.gguf_file:
        strip_gguf_quantizer(model)
    return model


def strip_gguf_quantizer(model) -> None:
    """GGUF weights are dequantized on load, but the model still claims to be quantized, which makes
    the Trainer refuse to train it. It is a plain model now: say so."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    config = model.config
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None


def has_generation_markers(template: Any) -> bool:
    if isinstance(template, dict):
        template = template.get("default", "")
    return isinstance(template, str) and "{% generation %}" in template.replace("{%-", "{%").replace(
        "-%}", "%}"
    ).replace("{%generation%}", "{% generation %}")


def is_conversational(rows: list[dict[str, Any]]) -> bool:
    """Rows TRL renders with the chat template: messages, or prompts given as message lists."""
    if not rows:
        return False
    row = rows[0]
    return "messages" in row or isinstance(row.get("prompt"), list)


def ensure_chat_template(tokenizer, conversational: bool, assistant_only: bool) -> Optional[str]:
    """Make the tokenizer's chat template usable for training conversational rows.

    Returns a short note of what was changed (None when nothing). The template set here is saved
    with the adapter's tokenizer files, so inference formats prompts the same way as training."""
    if not conversational:
        return None
    template = tokenizer.chat_template
    if template and (not assistant_only or has_generation_markers(template)):
        return None
    if template and assistant_only:
        try:
            from trl.chat_template_utils import get_training_chat_template

            patched = get_training_chat_template(tokenizer)
        except Exception:  # noqa: BLE001 - unknown template: fall back to ours
            patched = None
        if patched:
            tokenizer.chat_template = patched
            return "patched chat template with {% generation %} markers (TRL training template)"
    tokenizer.chat_template = CHATML_TEMPLATE
    return "installed a ChatML chat template with {% generation %} markers"


def end_of_turn_ids(tokenizer) -> list[int]:
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in vocab and vocab[marker] not in ids:
            ids.append(int(vocab[marker]))
    return ids


def linear_module_names(model) -> list[str]:
    """What 'all-linear' means for `model`, as PEFT reads it: the last name part of every linear
    layer but the output head (PEFT refuses the string 'all-linear' together with layers_to_transform)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and module is not head
        and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
    }
    return sorted(names)


def num_decoder_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def lora_config(adapter: AdapterSpec, model=None):
    """PEFT's LoraConfig for `adapter`; `model` is needed only for adapter.layers (its depth, and
    what 'all-linear' names in it)."""
    from peft import LoraConfig

    targets: Any = list(adapter.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    layers = None
    if adapter.layers:
        if model is None:
            raise TypeError("lora_config: adapter.layers needs the model")
        layers = C.resolve_layers(adapter.layers, num_decoder_layers(model))
        if targets == "all-linear":
            targets = linear_module_names(model)
        elif "all-linear" in targets:
            targets = sorted(set(linear_module_names(model)) | (set(targets) - {"all-linear"}))
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_qlora(model, gradient_checkpointing: bool):
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
    )


@contextlib.contextmanager
def merged_for_inference(model, adapter_type: AdapterType):
    """LoRA weights merged into the base while generating (unmerged LoRA layers double the number
    of matmuls, which shows on CPU); unmerged again afterwards. Not for QLoRA's 4-bit base."""
    merge = AdapterType(adapter_type) == AdapterType.lora and hasattr(model, "merge_adapter")
    if merge:
        model.merge_adapter()
    try:
        yield model
    finally:
        if merge:
            model.unmerge_adapter()


def unwrap(model):
    """The model inside DDP/accelerate wrappers."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def quiet_libraries() -> None:
    """Library logging and warnings go to stderr, at warning level; no hub progress bars."""

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.disable_progress_bar()
        ds_logging.set_verbosity_warning()
    except Exception:  # noqa: BLE001
        pass
    warnings.filterwarnings("ignore", category=ResourceWarning)
    # PEFT looks for the base model's config.json beside baseModel to see whether the vocabulary
    # changed; for pkg:// and .gguf sources there is none, and the vocabulary never changes here.
    warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)


def raise_training_error(e: BaseException) -> TrainerError:
    return TrainerError(TRAINING_ERROR, f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- speed helpers

LENGTH_SAMPLE = 512


def sample_lengths(tokenizer, rows: list[dict[str, Any]], fmt: str, n: int = LENGTH_SAMPLE, seed: int = 0) -> list[int]:
    """Token lengths of a seeded random sample of rows (in random order, like the training sampler's),
    as TRL will tokenize them closely enough for a cost estimate (plus one for the EOS it appends)."""

    if not rows:
        return []
    picked = list(rows)
    if len(picked) > n:
        picked = random.Random(seed).sample(picked, n)
    else:
        random.Random(seed).shuffle(picked)
    out: list[int] = []
    for row in picked:
        try:
            if fmt == "messages" or isinstance(row.get("prompt"), list):
                messages = row.get("messages") or (list(row.get("prompt") or []) + list(row.get("completion") or []))
                ids = tokenizer.apply_chat_template(messages, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                out.append(len(ids))
            elif fmt == "prompt-completion":
                out.append(len(tokenizer(str(row["prompt"]) + str(row["completion"]))["input_ids"]) + 1)
            elif fmt == "text":
                out.append(len(tokenizer(str(row["text"]))["input_ids"]) + 1)
        except Exception:  # noqa: BLE001 - an estimate only: a row TRL reads differently is skipped
            continue
    return out


def truncate_prepared(dataset, max_length: int):
    """TRL's own truncation (keep the start) of a prepared dataset, for padding-free batches without
    packing, where TRL leaves max_length to the caller; drops rows left without any label."""
    if dataset is None or "input_ids" not in (dataset.column_names or []):
        return dataset

    def cut(example):
        out = {"input_ids": example["input_ids"][:max_length]}
        if "labels" in example:
            out["labels"] = example["labels"][:max_length]
        return out

    if all(len(x) <= max_length for x in dataset["input_ids"]):
        return dataset
    dataset = dataset.map(cut)
    if "labels" in dataset.column_names:
        dataset = dataset.filter(lambda example: any(label != -100 for label in example["labels"]))
    return dataset


def compact_fused_lm_head() -> bool:
    """Make TRL's fused LM head score only labelled positions off Triton devices too (see
    config.decide_compact_lm_head). Returns whether the hook was found (a TRL without it: no-op)."""
    try:
        import trl.trainer.utils as tu
    except ImportError:
        return False
    original = getattr(tu, "_use_triton", None)
    if original is None or getattr(original, "_tuneop_compact", False):
        return original is not None

    def use_compact(device) -> bool:
        return getattr(device, "type", None) == "cpu" or original(device)

    use_compact._tuneop_compact = True  # type: ignore[attr-defined]
    tu._use_triton = use_compact
    return True


def liger_available() -> bool:
    try:
        from transformers.utils import is_liger_kernel_available

        return bool(is_liger_kernel_available())
    except Exception:  # noqa: BLE001
        return False


def apply_liger(model, reason: str) -> tuple[bool, str]:
    """Liger's layer kernels (RMSNorm, RoPE, SwiGLU) patched into this model instance; not its fused
    linear cross-entropy, which would replace the forward that TRL's fused LM head patches."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
        return True, reason
    except Exception as e:  # noqa: BLE001 - the kernels are an optimisation: train without them
        print(f"tuneop: Liger kernels not applied: {type(e).__name__}: {e}", file=sys.stderr)
        return False, f"not applied: {type(e).__name__}"
