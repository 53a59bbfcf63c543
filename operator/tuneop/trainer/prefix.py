"""Shared prompt prefix: a prefix every training row begins with is computed once per batch.

Datasets built from one instruction ("Classify the topic of this news article. ...") or one system
prompt start every row with the same tokens. A causal model gives those tokens the same keys and values
in every row, so the trainer runs them once per batch (with gradients, so LoRA layers above the frozen
ones still learn from them), repeats their keys and values for each row, and runs each row's own tokens
on top, at the same positions. Loss and gradients are the same as for the whole rows (checked on the
first batch before training); the saving is (batch - 1) x prefix tokens per batch.

How it is wired, around TRL's SFTTrainer (whose prepared rows are `input_ids` + `labels`):
- the prepared datasets lose the prefix (`strip`);
- the collator gives each batch an attention mask over prefix + row (`PrefixCollator`), so the
  Trainer's token count still counts every row's prefix and the model's mask covers the cache;
- the model's fused-LM-head forward (the one TRL's `compute_loss` calls) first runs the prefix into a
  cache and passes it on (`SharedPrefix`). Generation, which does not ask for the fused head, is untouched.
Decisions (whether, and how many tokens) are pure functions in config.py.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Optional

from . import model as M

# loss of the shortened rows against the whole rows, relative: fp32 sums in a different order; bf16/fp16
# round the repeated keys and values differently
VERIFY_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}


def strip(dataset, tokens: int):
    """The prepared rows without their first `tokens` tokens (input_ids and labels)."""
    if dataset is None or tokens <= 0:
        return dataset

    def cut(example):
        out = {"input_ids": example["input_ids"][tokens:]}
        if "labels" in example:
            out["labels"] = example["labels"][tokens:]
        return out

    return dataset.map(cut, desc=None)


def iter_rows(dataset, batch_size: int = 1024):
    """(input_ids, labels) of each prepared row, read in batches (a large dataset is never held in Python
    lists at once); the input ids stand in for labels where TRL leaves labels to the collator."""
    columns = dataset.column_names or []
    wanted = ["input_ids"] + (["labels"] if "labels" in columns else [])
    for batch in dataset.select_columns(wanted).iter(batch_size=batch_size):
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        yield from zip(ids, labels)


class PrefixCollator:
    """Batches of shortened rows whose attention mask also covers the shared prefix in front of them."""

    def __init__(self, inner, tokens: int):
        self.inner = inner
        self.tokens = int(tokens)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.inner(examples)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        ones = torch.ones((mask.shape[0], self.tokens), dtype=mask.dtype)
        batch["attention_mask"] = torch.cat([ones, mask], dim=1)
        return batch

    def __getattr__(self, name: str) -> Any:  # the inner collator's settings (pad id, padding-free flag)
        if name == "inner":  # not set yet (unpickling in a dataloader worker): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


class SharedPrefix:
    """The fused-LM-head forward of `model` (a PreTrainedModel that TRL patched) with the prefix run once
    per call into a key/value cache shared by the batch's rows. `enabled` switches it off and on (the
    verification compares both)."""

    def __init__(self, model, prefix_ids: list[int]):
        self.model = model
        self.prefix_ids = list(prefix_ids)
        self.enabled = True
        inner = model.forward
        shared = self

        @functools.wraps(inner)
        def forward(self_model, *args, fused_lm_head=False, **kwargs):
            if not fused_lm_head or not shared.enabled:
                return inner(*args, fused_lm_head=fused_lm_head, **kwargs)
            kwargs["past_key_values"] = shared.cache(kwargs)
            return inner(*args, fused_lm_head=True, **kwargs)

        model.forward = types.MethodType(forward, model)

    @property
    def tokens(self) -> int:
        return len(self.prefix_ids)

    def cache(self, kwargs: dict[str, Any]):
        """The prefix's keys and values, once per layer, repeated for each row of the batch."""
        import torch
        from transformers.cache_utils import DynamicCache

        input_ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if input_ids is None or mask is None or mask.shape[1] != input_ids.shape[1] + self.tokens:
            raise RuntimeError(
                "shared prefix: a batch without the prefix-covering attention mask "
                f"(input {tuple(input_ids.shape) if input_ids is not None else None}, "
                f"mask {tuple(mask.shape) if mask is not None else None}, prefix {self.tokens})"
            )
        if kwargs.get("past_key_values") is not None:
            raise RuntimeError("shared prefix: the batch already has a key/value cache")
        prefix = torch.tensor([self.prefix_ids], dtype=input_ids.dtype, device=input_ids.device)
        cache = DynamicCache(config=self.model.config)
        self.model.base_model(input_ids=prefix, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(int(input_ids.shape[0]))
        return cache


def verify(shared: SharedPrefix, collator: PrefixCollator, whole: list[dict[str, Any]], short: list[dict[str, Any]],
           precision: str) -> tuple[bool, str]:
    """The loss of a batch of whole rows (as prepared, collated as before) against that of the same rows
    shortened and run on the shared prefix; without gradients and in eval mode (no dropout). Returns
    (agrees, a short account)."""
    import torch

    model = shared.model
    device = next(model.parameters()).device

    def on_device(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}

    whole_batch = on_device(collator.inner(whole))
    short_batch = on_device(collator(short))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shared.enabled = True
            a = float(model(**short_batch, use_cache=False, fused_lm_head=True).loss)
            shared.enabled = False
            b = float(model(**whole_batch, use_cache=False, fused_lm_head=True).loss)
    finally:
        shared.enabled = True
        model.train(was_training)
    tolerance = VERIFY_TOLERANCE.get(precision, 2e-2)
    diff = abs(a - b) / max(1.0, abs(b))
    account = f"first-batch loss {a:.6g} vs {b:.6g} on whole rows (relative difference {diff:.1e}, tolerance {tolerance:.0e})"
    return diff <= tolerance, account


def apply(trainer, precision: str, prefix_ids: list[int], verify_rows: int) -> tuple[Optional[SharedPrefix], str]:
    """Shorten the trainer's prepared datasets, wrap its collator and its model's forward, and check one
    batch against the whole rows. On any failure everything is put back and training runs on whole rows.
    Returns (the SharedPrefix or None, what happened)."""

    base = M.unwrap(trainer.model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    tokens = len(prefix_ids)
    originals = (trainer.train_dataset, trainer.eval_dataset, trainer.data_collator, base.forward)
    try:
        trainer.train_dataset = strip(trainer.train_dataset, tokens)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = strip(trainer.eval_dataset, tokens)
        collator = PrefixCollator(trainer.data_collator, tokens)
        trainer.data_collator = collator
        shared = SharedPrefix(base, prefix_ids)
        n = min(verify_rows, len(trainer.train_dataset))
        whole = [originals[0][i] for i in range(n)]
        short = [trainer.train_dataset[i] for i in range(n)]
        ok, account = verify(shared, collator, whole, short, precision)
        if not ok:
            raise ValueError(account)
        return shared, account
    except Exception as e:  # noqa: BLE001 - an optimisation: train on whole rows instead
        trainer.train_dataset, trainer.eval_dataset, trainer.data_collator, _ = originals
        base.forward = originals[3]
        return None, f"not applied: {type(e).__name__}: {e}"[:300]
