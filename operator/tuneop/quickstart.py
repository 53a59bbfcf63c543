"""The offline quickstart's dataset: customer messages -> an exact JSON routing record.

A task where fine-tuning visibly helps a small instruct model: it must pick one of five intents
and copy the order number (or null) into one exact JSON shape. Generated deterministically from
templates, so the committed files under examples/quickstart/ can be re-made and checked
(`tuneop quickstart-data DIR`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

INSTRUCTION = (
    'Reply with JSON only: {"intent": ..., "order": <order number or null>}. '
    "Intents: refund, exchange, track_order, cancel_order, change_address."
)

PRODUCTS = [
    "blue running shoes", "coffee grinder", "wool scarf", "phone case", "desk lamp",
    "yoga mat", "bluetooth speaker", "kitchen scale", "backpack", "winter jacket",
    "water bottle", "gaming mouse", "throw pillow", "electric kettle", "sunglasses",
    "board game", "toaster", "hiking boots", "notebook set", "air fryer",
]
GREETINGS = ["", "Hi, ", "Hello, ", "Hey there. ", "Good morning! ", "Hi team, ", "Dear support, "]
SIGNOFFS = ["", " Thanks.", " Thank you!", " Cheers.", " Please help.", " Regards, Sam.", " Thanks in advance."]
CITIES = ["Lyon", "Denver", "Osaka", "Leeds", "Porto", "Austin", "Gdansk", "Perth", "Quebec", "Malmo"]

TEMPLATES: dict[str, list[str]] = {
    "refund": [
        "my {product} arrived broken ({ref}) and I want my money back.",
        "please refund {ref}, the {product} stopped working after two days.",
        "I returned the {product} last week, when will I get my refund for {ref}?",
        "I was charged twice for {ref}. I need a refund for the extra charge.",
        "the {product} is not what I ordered. Can I just get a refund? It was {ref}.",
        "I'd like a refund for the {product}, it's not as described.",
    ],
    "exchange": [
        "the {product} in {ref} is the wrong size, can I swap it for a larger one?",
        "can I exchange the {product} from {ref} for a different color?",
        "I got the {product} but I'd prefer the other model. Exchange possible? {ref}",
        "{ref}: the {product} is fine but too small, I want to exchange it.",
        "could you replace the {product} with the next size up?",
    ],
    "track_order": [
        "where is my {product}? It's {ref} and still not here.",
        "can you tell me when {ref} will arrive?",
        "the tracking for {ref} hasn't updated in a week. Where is my {product}?",
        "I ordered a {product} ({ref}), has it shipped yet?",
        "my package hasn't arrived, any update on the {product}?",
    ],
    "cancel_order": [
        "please cancel {ref}, I ordered the {product} by mistake.",
        "I changed my mind about the {product}. Cancel {ref} before it ships please.",
        "can I still cancel {ref}? I found the {product} cheaper elsewhere.",
        "cancel my order for the {product} please, I don't need it anymore.",
        "{ref} was placed twice, please cancel one of them.",
    ],
    "change_address": [
        "I moved to {city}. Can you send {ref} to my new address?",
        "please update the delivery address for {ref}, the {product} should go to my office in {city}.",
        "wrong address on {ref}! Ship the {product} to {city} instead.",
        "can I change where my {product} is delivered? I'm in {city} now.",
        "I need {ref} delivered to my parents' place in {city}.",
    ],
}
INTENTS = list(TEMPLATES)
REF_FORMATS = ["order #{n}", "order {n}", "order number {n}", "#{n}", "order no. {n}", "order ID {n}"]
SPLITS = {"train": 240, "val": 24, "test": 60}


def _message(rng: random.Random, intent: str) -> tuple[str, str | None]:
    template = rng.choice(TEMPLATES[intent])
    order = None
    ref = ""
    if "{ref}" in template:
        order = str(rng.randint(10000, 99999)) if rng.random() < 0.5 else (
            rng.choice("ABCDEFGHKLMNPRSTUVWXYZ") + str(rng.randint(1000, 99999))
        )
        ref = rng.choice(REF_FORMATS).format(n=order)
    body = template.format(product=rng.choice(PRODUCTS), ref=ref, city=rng.choice(CITIES))
    greeting = rng.choice(GREETINGS)
    text = greeting + (body[0].upper() + body[1:] if not greeting else body) + rng.choice(SIGNOFFS)
    return text, order


def make_row(rng: random.Random) -> dict[str, Any]:
    intent = rng.choice(INTENTS)
    text, order = _message(rng, intent)
    answer = json.dumps({"intent": intent, "order": order})
    return {
        "prompt": [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": text},
        ],
        "completion": [{"role": "assistant", "content": answer}],
    }


def generate(seed: int = 7) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    out: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for split, n in SPLITS.items():
        rows: list[dict[str, Any]] = []
        while len(rows) < n:
            row = make_row(rng)
            key = row["prompt"][1]["content"]
            if key in seen:  # no test message also appears in train
                continue
            seen.add(key)
            rows.append(row)
        out[split] = rows
    return out


def write(directory: Path, seed: int = 7) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate(seed).items():
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths[split] = path
    return paths
