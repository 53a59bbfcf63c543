"""A tiny Llama + tokenizer built on the fly for the trainer's process tests.

Task: a word's label is decided by its first letter. The *base* model is pre-trained (full parameters,
a few seconds) on mapping A; the fine-tuning data uses mapping B (labels rotated), so a LoRA adapter
has to learn something the base visibly gets wrong.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = ["k", "m", "p", "t"]
LABELS = ["red", "green", "blue", "gold"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def make_words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = rng.choice(LETTERS) + "".join(rng.choice("aeiourlnsbdz") for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def label(word: str, mapping: str) -> str:
    i = LETTERS.index(word[0])
    return LABELS[i if mapping == "A" else (i + 1) % len(LABELS)]


def prompt(word: str) -> str:
    return f"Word: {word}\nLabel:"


def pc_rows(words: list[str], mapping: str) -> list[dict]:
    return [{"prompt": prompt(w), "completion": " " + label(w, mapping)} for w in words]


def msg_rows(words: list[str], mapping: str) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Label {w}"},
                {"role": "assistant", "content": label(w, mapping)},
            ]
        }
        for w in words
    ]


def pref_rows(words: list[str]) -> list[dict]:
    return [
        {"prompt": prompt(w), "chosen": " " + label(w, "B"), "rejected": " " + label(w, "A")}
        for w in words
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build(dest: Path, steps: int = 300, seed: int = 0, heads: int = 4) -> Path:
    """Write a pre-trained tiny Llama (model + tokenizer) to dest; returns dest.

    heads=2 gives head_dim 32, the smallest vLLM's CPU attention serves (4 heads: 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    words = make_words(200, seed=seed + 1)
    texts_raw = [prompt(w) + " " + label(w, "A") for w in words]
    convs = msg_rows(words, "A")
    tokenizer = build_tokenizer(
        texts_raw + [tokenizer_free_chat(c["messages"]) for c in convs] + [" " + x for x in LABELS]
    )
    texts_chat = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in convs]
    corpus = [t + tokenizer.eos_token for t in texts_raw] + texts_chat

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(corpus, 32)
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / "pretrain_loss.txt").write_text(f"{loss.item():.4f}\n")
    return dest


def tokenizer_free_chat(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
