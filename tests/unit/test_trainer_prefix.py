"""Shared prompt prefix (trainer/prefix.py, config.shared_prefix_length / decide_shared_prefix): rows that
all start with the same tokens are trained with that prefix run once per batch, and loss and gradients
stay those of the whole rows. Pure decisions first, then a tiny random Llama with LoRA on CPU."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tuneop.trainer import config as C

N = -100


# ---------------------------------------------------------------- how many tokens (pure)

def test_prefix_is_the_longest_common_start_before_any_label():
    ids = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 8, 7, 6], [1, 2, 3, 4, 5, 5]]
    labels = [[N] * 5 + [6, 7], [N] * 6 + [7, 6], [N] * 5 + [5]]
    assert C.shared_prefix_length(zip(ids, labels)) == 4


def test_reading_stops_at_the_first_row_without_the_prefix():
    read = []

    def rows():
        for pair in [([1, 2, 3, 4], [N] * 4), ([9, 2, 3, 4], [N] * 4), ([1, 2, 3, 4], [N] * 4)]:
            read.append(pair)
            yield pair

    assert C.shared_prefix_length(rows()) == 0 and len(read) == 2


def test_prefix_stops_one_token_before_the_first_label():
    # the token right after the prefix is predicted from the prefix's last position, which the
    # shortened rows no longer hold: it must carry no label
    ids = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]]
    labels = [[N, N, N, 4, 5, 6], [N] * 5 + [7]]
    assert C.shared_prefix_length(zip(ids, labels)) == 2


def test_prefix_leaves_every_row_two_tokens():
    ids = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]
    labels = [[N, N, N, N], [N] * 6]
    assert C.shared_prefix_length(zip(ids, labels)) == 2


@pytest.mark.parametrize("ids,labels", [
    ([[1, 2, 3], [2, 2, 3]], [[N, N, 3], [N, N, 3]]),  # different first token
    ([[1, 2, 3, 4]], [[1, 2, 3, 4]]),                   # loss on every token (train_on_inputs)
    ([], []),
])
def test_no_prefix(ids, labels):
    assert C.shared_prefix_length(zip(ids, labels)) == 0


def test_one_row_shares_everything_up_to_its_label():
    assert C.shared_prefix_length([([5, 6, 7, 8, 9], [N, N, N, N, 9])]) == 3


def decide(**kw):
    args = dict(setting=None, method="sft", batching="group_by_length", gradient_checkpointing=False,
                torch_compile=False, prefix_tokens=33, mean_length=99.0, batch_size=8)
    args.update(kw)
    return C.decide_shared_prefix(**args)


def test_decide_takes_a_long_shared_instruction():
    use, reason = decide()
    assert use and "33 shared tokens" in reason and "29%" in reason


@pytest.mark.parametrize("kw,why", [
    ({"method": "dpo"}, "method dpo"),
    ({"batching": "packing"}, "packing"),
    ({"batching": "padding_free"}, "padding_free"),
    ({"gradient_checkpointing": True}, "gradient checkpointing"),
    ({"torch_compile": True}, "torch.compile"),
    ({"batch_size": 1}, "batch of one"),
    ({"prefix_tokens": 0}, "no prompt prefix"),
    ({"prefix_tokens": 15}, "< 16"),
    ({"prefix_tokens": 20, "mean_length": 400.0}, "< 10%"),
])
def test_decide_refuses(kw, why):
    use, reason = decide(**kw)
    assert not use and why in reason


def test_decide_override_still_needs_a_prefix_and_a_fitting_batch():
    assert decide(setting=True, prefix_tokens=3)[0] is True
    assert decide(setting=False) == (False, "switched off (TUNEOP_SHARED_PREFIX=0)")
    assert decide(setting=True, prefix_tokens=0)[0] is False
    assert decide(setting=True, gradient_checkpointing=True)[0] is False


# ---------------------------------------------------------------- the model side (tiny Llama, CPU)

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from tuneop.trainer import prefix as PF  # noqa: E402

PREFIX = [11, 12, 13, 14, 15, 16]


def lora_llama(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    # LoRA only on the top layer, like the benchmark's top-layer adapters: the frozen layers below
    # still feed it, and the prefix's keys and values in the top layer depend on the adapter
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=["layers.2.self_attn.q_proj", "layers.2.self_attn.v_proj",
                                                            "layers.2.mlp.down_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft


def rows():
    """Prepared rows (TRL's input_ids + labels) of different lengths, all starting with PREFIX."""
    g = torch.Generator().manual_seed(3)
    out = []
    for own, answer in ((5, 2), (9, 3), (3, 1), (7, 2)):
        tail = torch.randint(20, 97, (own + answer,), generator=g).tolist()
        ids = PREFIX + tail
        out.append({"input_ids": ids, "labels": [N] * (len(PREFIX) + own) + tail[own:]})
    return out


def collator():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0)


def lora_grads(peft) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in peft.named_parameters() if p.requires_grad])


def test_shared_prefix_gives_the_loss_and_gradients_of_the_whole_rows():
    from datasets import Dataset

    peft = lora_llama()
    base = peft.get_base_model()
    data = rows()
    whole = collator()(data)
    assert C.shared_prefix_length(PF.iter_rows(Dataset.from_list(data), batch_size=3)) == len(PREFIX)

    peft.train()
    out = peft(**whole, fused_lm_head=True)
    out.loss.backward()
    g_whole = lora_grads(peft)
    peft.zero_grad()

    PF.SharedPrefix(base, PREFIX)  # wraps base.forward
    short = PF.PrefixCollator(collator(), len(PREFIX))([
        {"input_ids": r["input_ids"][len(PREFIX):], "labels": r["labels"][len(PREFIX):]} for r in data])
    assert short["input_ids"].shape[1] == whole["input_ids"].shape[1] - len(PREFIX)
    # the mask covers prefix + row: the Trainer's token count is that of the whole rows
    assert torch.equal(short["attention_mask"], whole["attention_mask"])
    out2 = peft(**short, fused_lm_head=True)
    out2.loss.backward()
    g_shared = lora_grads(peft)

    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert torch.equal(out2.label_mask.sum(), out.label_mask.sum())
    assert (g_shared - g_whole).norm() / g_whole.norm() < 1e-5
    assert g_whole.abs().sum() > 0


def test_generation_and_plain_forwards_are_untouched():
    peft = lora_llama().eval()
    base = peft.get_base_model()
    ids = torch.tensor([PREFIX + [30, 31, 32]])
    with torch.no_grad():
        before = peft(input_ids=ids).logits
        PF.SharedPrefix(base, PREFIX)
        after = peft(input_ids=ids).logits
        gen = peft.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(before, after)
    assert gen.shape == (1, ids.shape[1] + 3)


def test_a_batch_without_the_prefix_mask_is_an_error_not_a_wrong_loss():
    peft = lora_llama()
    PF.SharedPrefix(peft.get_base_model(), PREFIX)
    batch = collator()([{"input_ids": r["input_ids"][6:], "labels": r["labels"][6:]} for r in rows()])
    with pytest.raises(RuntimeError, match="prefix-covering attention mask"):
        peft(**batch, fused_lm_head=True)


def fake_trainer(peft, data):
    from datasets import Dataset

    return SimpleNamespace(model=peft, train_dataset=Dataset.from_list(data),
                           eval_dataset=Dataset.from_list(data[:2]), data_collator=collator())


def test_apply_shortens_the_rows_and_checks_one_batch():
    peft = lora_llama()
    trainer = fake_trainer(peft, rows())
    shared, account = PF.apply(trainer, "fp32", PREFIX, verify_rows=4)
    assert shared is not None and "relative difference" in account
    assert trainer.train_dataset[0]["input_ids"] == rows()[0]["input_ids"][len(PREFIX):]
    assert trainer.eval_dataset[1]["labels"] == rows()[1]["labels"][len(PREFIX):]
    assert isinstance(trainer.data_collator, PF.PrefixCollator)
    assert trainer.data_collator.pad_token_id == 0  # the inner collator's settings show through
    import pickle

    again = pickle.loads(pickle.dumps(trainer.data_collator))  # dataloader workers get a copy
    assert again.tokens == len(PREFIX) and again.pad_token_id == 0


def test_apply_puts_everything_back_when_the_check_fails():
    """Wrong prefix ids (not what the rows start with) make the shared and whole losses differ: the
    trainer keeps its whole rows, its collator and the model's own forward."""
    peft = lora_llama()
    base = peft.get_base_model()
    trainer = fake_trainer(peft, rows())
    before = (trainer.train_dataset, trainer.eval_dataset, trainer.data_collator, base.forward)
    shared, account = PF.apply(trainer, "fp32", [40, 41, 42, 43, 44, 45], verify_rows=4)
    assert shared is None and account.startswith("not applied: ValueError: first-batch loss")
    assert (trainer.train_dataset, trainer.eval_dataset, trainer.data_collator) == before[:3]
    assert base.forward == before[3]
    out = peft(**collator()(rows()), fused_lm_head=True)
    assert torch.isfinite(out.loss)
