"""The speed paths keep the loss what it was: the compact fused LM head on CPU, padding-free rows
(one flattened row, sdpa with the block-diagonal mask transformers derives from position_ids), and
truncation of prepared datasets. A tiny random Llama, CPU, seconds."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from tuneop.trainer import model as M  # noqa: E402


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


def completion_labels(ids, prompt_len):
    labels = ids.clone()
    labels[:prompt_len] = -100
    return labels


def batch_examples():
    g = torch.Generator().manual_seed(1)
    lengths, prompts = [9, 5, 12], [6, 3, 10]
    seqs = [torch.randint(3, 97, (n,), generator=g) for n in lengths]
    return seqs, [completion_labels(s, p) for s, p in zip(seqs, prompts)]


def padded_loss(model, seqs, labels):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = s, lb, 1
    return model(input_ids=ids, attention_mask=mask, labels=lab, fused_lm_head=True)


def test_compact_lm_head_on_cpu_gives_the_same_loss_and_gradients():
    import trl.trainer.utils as tu
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_llama()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    seqs, labels = batch_examples()
    original = tu._use_triton
    try:
        full = padded_loss(model, seqs, labels)
        full.loss.backward()
        g_full = model.model.embed_tokens.weight.grad.clone()
        model.zero_grad()
        assert M.compact_fused_lm_head() is True
        assert M.compact_fused_lm_head() is True  # idempotent
        assert tu._use_triton(torch.device("cpu")) is True
        compact = padded_loss(model, seqs, labels)
        compact.loss.backward()
        g_compact = model.model.embed_tokens.weight.grad.clone()
    finally:
        tu._use_triton = original
    torch.testing.assert_close(compact.loss, full.loss)
    torch.testing.assert_close(compact.log_probs, full.log_probs)
    torch.testing.assert_close(g_compact, g_full)


def test_padding_free_row_gives_the_padded_loss():
    """What TRL's padding-free collator builds (one row, position_ids restarting per sequence, the first
    label of each sequence masked) scores the same completion tokens as padded batches."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_llama()
    add_fused_lm_head(model, outputs=("log_probs",))
    seqs, labels = batch_examples()
    padded = padded_loss(model, seqs, labels)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": s.tolist(), "labels": lb.tolist()} for s, lb in zip(seqs, labels)])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(len(s) for s in seqs))
    flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 fused_lm_head=True)
    assert int(flat.label_mask.sum()) == int(padded.label_mask.sum())
    torch.testing.assert_close(flat.loss, padded.loss, rtol=1e-4, atol=1e-5)


def test_truncate_prepared_keeps_the_start_and_drops_unlabelled_rows():
    from datasets import Dataset

    ds = Dataset.from_list([
        {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, -100, 5, 6]},  # completion cut off
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [7, 8, 9, 10], "labels": [-100, -100, 9, 10]},
    ])
    out = M.truncate_prepared(ds, 3)
    assert out["input_ids"] == [[1, 2, 3], [7, 8, 9]]
    assert out["labels"] == [[-100, 2, 3], [-100, -100, 9]]
    assert M.truncate_prepared(ds, 10) is ds  # nothing to cut: unchanged


def test_sample_lengths_prompt_completion():
    class Tok:
        def __call__(self, text):
            return {"input_ids": text.split()}

    rows = [{"prompt": "a b c", "completion": " d"}, {"prompt": "a", "completion": " b"}]
    assert sorted(M.sample_lengths(Tok(), rows, "prompt-completion")) == [3, 5]  # + EOS
    assert M.sample_lengths(Tok(), [], "prompt-completion") == []
