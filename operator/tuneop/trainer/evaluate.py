"""Exact-match evaluation on the test split: greedy generation, base model vs adapter."""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

METRIC = "exact_match"
Prompt = Any  # a string (raw text) or a list of chat messages


def examples(rows: list[dict[str, Any]], fmt: Optional[str]) -> list[tuple[Prompt, str]]:
    """Test rows -> (prompt, expected answer) pairs. Rows that cannot be scored are skipped."""
    out: list[tuple[Prompt, str]] = []
    for row in rows:
        if "messages" in row:
            msgs = row["messages"]
            idx = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=-1)
            if idx <= 0:
                continue
            out.append((msgs[:idx], str(msgs[idx].get("content") or "")))
        elif "prompt" in row and ("completion" in row or "chosen" in row):
            prompt = row["prompt"]
            target = row["completion"] if "completion" in row else row["chosen"]
            if isinstance(target, list):  # conversational completion: the assistant message(s)
                target = "".join(str(m.get("content") or "") for m in target if m.get("role") == "assistant")
            out.append((prompt, str(target)))
    return out


def cut_at(text: str, markers: Sequence[str]) -> str:
    end = len(text)
    for m in markers:
        if m:
            i = text.find(m)
            if i != -1:
                end = min(end, i)
    return text[:end]


def exact_match(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


def score(predictions: Sequence[str], targets: Sequence[str]) -> Optional[float]:
    if not targets:
        return None
    hits = sum(exact_match(p, t) for p, t in zip(predictions, targets))
    return round(hits / len(targets), 4)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Tokenize a prompt exactly as TRL did for training: chat template for conversational prompts
    (with the generation prompt), the raw text otherwise."""
    if isinstance(prompt, list):
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, stop_ids: list[int],
             batch_size: int = 16, progress: bool = False, desc: str = "generating",
             on_progress: Optional[Callable[[int], None]] = None) -> list[str]:
    """Greedy answers to `prompts`; on_progress(rows done) after each batch; progress: a tqdm bar."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    markers = [m for m in ("<|im_end|>", tokenizer.eos_token) if m]
    results: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, leave=False)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, seq in enumerate(chunk):  # left padding: generation continues right after the prompt
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=stop_ids or None,
                pad_token_id=pad_id,
                use_cache=True,
            )
        for row in out[:, width:].tolist():
            cut = len(row)
            for j, t in enumerate(row):
                if t in stop_ids:
                    cut = j
                    break
            text = tokenizer.decode(row[:cut], skip_special_tokens=True)
            results.append(cut_at(text, markers))
        if bar is not None:
            bar.update(len(chunk))
        if on_progress is not None:
            on_progress(len(results))
    if bar is not None:
        bar.close()
    return results


def run(model, tokenizer, pairs: list[tuple[Prompt, str]], max_new_tokens: int, stop_ids: list[int],
        progress: bool = False, desc: str = "evaluating",
        on_progress: Optional[Callable[[int], None]] = None) -> Optional[float]:
    """Exact match of the greedy answers; on_progress(rows scored) as generate() goes."""
    if not pairs:
        return None
    prompts = [p for p, _ in pairs]
    targets = [t for _, t in pairs]
    padding_side = tokenizer.padding_side
    generation_config = getattr(model, "generation_config", None)
    saved = None
    if generation_config is not None:
        saved = (generation_config.temperature, generation_config.top_p, generation_config.top_k)
        generation_config.temperature, generation_config.top_p, generation_config.top_k = None, None, None
    try:
        predictions = generate(model, tokenizer, prompts, max_new_tokens, stop_ids, progress=progress, desc=desc,
                               on_progress=on_progress)
    finally:
        tokenizer.padding_side = padding_side
        if generation_config is not None and saved is not None:
            generation_config.temperature, generation_config.top_p, generation_config.top_k = saved
    return score(predictions, targets)


def result(samples: int, base: Optional[float], adapter: Optional[float]) -> dict[str, Any]:
    return {"metric": METRIC, "samples": samples, "base": base, "adapter": adapter}
