"""The trainer's own speed decisions (trainer/config.py): batching of mixed lengths, checkpointing,
Liger, torch.compile, the compact LM head. Pure functions: facts in, decision out."""
from __future__ import annotations

import random

import pytest

from tuneop.trainer import config as C

SMOL = dict(hidden_size=576, num_layers=30, n_params=135_000_000)  # SmolLM2-135M


def ag_news_like(n=512, seed=0):
    """Lengths like the ag_news prompt/completion rows (61..312 tokens, median ~96)."""
    rng = random.Random(seed)
    return [max(61, min(312, int(rng.lognormvariate(4.55, 0.22)))) for _ in range(n)]


def test_packing_setting_wins():
    b = C.decide_batching(True, "sft", ag_news_like(), 16, attn_implementation="sdpa", **SMOL)
    assert b.mode == "packing"


def test_dpo_and_batch_of_one_stay_padded():
    assert C.decide_batching(False, "dpo", ag_news_like(), 16, attn_implementation="sdpa", **SMOL).mode == "padded"
    assert C.decide_batching(False, "sft", ag_news_like(), 1, attn_implementation="sdpa", **SMOL).mode == "padded"
    assert C.decide_batching(False, "sft", [], 16, attn_implementation="sdpa", **SMOL).mode == "padded"


def test_equal_lengths_stay_padded():
    b = C.decide_batching(False, "sft", [512] * 256, 16, attn_implementation="sdpa", **SMOL)
    assert b.mode == "padded" and b.pad_fraction == 0.0


def test_mixed_lengths_with_dense_attention_group_by_length():
    """sdpa on a flattened row attends over the whole batch: grouping by length is cheaper."""
    b = C.decide_batching(False, "sft", ag_news_like(), 16, attn_implementation="sdpa", **SMOL)
    assert b.mode == "group_by_length"
    assert 0.15 < b.pad_fraction < 0.6
    assert "padding" in b.reason


def test_mixed_lengths_with_varlen_attention_go_padding_free():
    b = C.decide_batching(False, "sft", ag_news_like(), 16, attn_implementation="flash_attention_2", **SMOL)
    assert b.mode == "padding_free"
    assert C.attention_is_varlen("flash_attention_2") and not C.attention_is_varlen("sdpa")


def test_step_cost_model():
    # padded: 2 rows of the longest (10): 2*(10 t + 100 p); flattened dense: 15 t + 225 p; varlen: 15 t + 125 p
    assert C.step_cost([[10, 5]], False, False, 1.0, 1.0) == 220
    assert C.step_cost([[10, 5]], True, False, 1.0, 1.0) == 240
    assert C.step_cost([[10, 5]], True, True, 1.0, 1.0) == 140


def test_length_grouped_batches_are_sorted_within_megabatches():
    lengths = list(range(1, 101))
    random.Random(1).shuffle(lengths)
    batches = C.length_grouped(lengths, 4)
    assert sorted(x for b in batches for x in b) == list(range(1, 101))
    assert all(b == sorted(b, reverse=True) for b in batches)


def test_token_count_mode():
    assert C.token_count_mode("padding_free") == "all"
    assert C.token_count_mode("packing") == "all"
    assert C.token_count_mode("padded") == "non_padding"
    assert C.token_count_mode("group_by_length") == "non_padding"


def test_compact_lm_head_on_cpu_only():
    assert C.decide_compact_lm_head(cuda=False) is True
    assert C.decide_compact_lm_head(cuda=True) is False


@pytest.mark.parametrize(
    "setting, cuda, available, model_type, expected",
    [
        (None, True, True, "llama", True),
        (True, True, True, "qwen2", True),
        (False, True, True, "llama", False),
        (None, False, True, "llama", False),  # CPU: Triton kernels
        (None, True, False, "llama", False),  # optional package not installed
        (None, True, True, "gpt2", False),  # no kernels for this family
    ],
)
def test_liger(setting, cuda, available, model_type, expected):
    on, reason = C.decide_liger(setting, cuda, available, model_type)
    assert on is expected and reason


def test_torch_compile_only_where_it_pays():
    new = "2.15.0"
    assert C.decide_torch_compile(None, True, "lora", 5000, True, new) == (True, "5000 steps of static shapes")
    assert C.decide_torch_compile(None, True, "lora", 5000, True, "2.11.0+cu130")[0] is False  # graph breaks
    assert C.decide_torch_compile(None, True, "lora", 100, True, new)[0] is False  # too short to pay back
    assert C.decide_torch_compile(None, True, "qlora", 5000, True, new)[0] is False  # 4-bit base
    assert C.decide_torch_compile(None, True, "lora", 5000, False, new)[0] is False  # varying shapes
    assert C.decide_torch_compile(None, False, "lora", 5000, True, new)[0] is False  # CPU
    assert C.decide_torch_compile(True, True, "lora", 10, False)[0] is True  # explicit
    assert C.decide_torch_compile(True, False, "lora", 10, True)[0] is False  # explicit, but no CUDA


def test_parse_switch():
    assert C.parse_switch("1") is True and C.parse_switch("off") is False
    assert C.parse_switch(None) is None and C.parse_switch("auto") is None


H100 = 85_000_000_000  # total_memory of an "80 GB" H100
H200 = 150_000_000_000


def llama(n_params, hidden, layers, adapter, weight_bytes=2):
    return C.estimate_training_bytes(n_params=n_params, hidden_size=hidden, num_layers=layers, batch_size=16,
                                     seq_len=512, adapter_type=adapter, weight_bytes=weight_bytes)


def test_checkpointing_only_when_memory_needs_it():
    one_b = llama(1_240_000_000, 2048, 16, "lora")
    eight_b_q = llama(8_030_000_000, 4096, 32, "qlora")
    eight_b = llama(8_030_000_000, 4096, 32, "lora")
    # 1B LoRA (~17 GB) and 8B QLoRA (~67 GB) fit an H100 without checkpointing; 8B bf16 LoRA does not
    assert not C.decide_gradient_checkpointing(None, True, one_b, H100)
    assert not C.decide_gradient_checkpointing(None, True, eight_b_q, H100)
    assert C.decide_gradient_checkpointing(None, True, eight_b, H100)
    assert not C.decide_gradient_checkpointing(None, True, eight_b, H200)
    # a 16 GB card needs it for the 1B at this batch
    assert C.decide_gradient_checkpointing(None, True, one_b, 16 * 10**9)
    # calibration (H100, bf16, 16 x 512, no checkpointing): 1B LoRA 14.3 GiB, 8B QLoRA 66.7 GiB
    assert 14.3 * 2**30 < one_b < 1.4 * 14.3 * 2**30
    assert 0.95 * 66.7 * 2**30 < eight_b_q < 1.1 * 66.7 * 2**30


def test_version_tuple():
    assert C.version_tuple("2.11.0+cu130") == (2, 11)
    assert C.version_tuple("2.15.0.dev20260101") == (2, 15)
    assert C.version_tuple("junk") == (0, 0)
