"""Shared fixtures for the process tests: a tiny pre-trained Llama built on the fly and datasets
for its word-labelling task. Helpers to run the trainer live in trainer_harness.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tinymodel  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama pre-trained (full parameters, a few seconds) on mapping A of the word task."""
    import torch

    torch.set_num_threads(1)
    return tinymodel.build(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    train_words = tinymodel.make_words(48, seed=5)
    test_words = tinymodel.make_words(24, seed=7)
    return {
        "pc_train": tinymodel.write_jsonl(d / "pc_train.jsonl", tinymodel.pc_rows(train_words, "B")),
        "pc_test": tinymodel.write_jsonl(d / "pc_test.jsonl", tinymodel.pc_rows(test_words, "B")),
        "msg_train": tinymodel.write_jsonl(d / "msg_train.jsonl", tinymodel.msg_rows(train_words, "B")),
        "msg_test": tinymodel.write_jsonl(d / "msg_test.jsonl", tinymodel.msg_rows(test_words, "B")),
        "pref_train": tinymodel.write_jsonl(d / "pref_train.jsonl", tinymodel.pref_rows(train_words)),
        "pref_test": tinymodel.write_jsonl(d / "pref_test.jsonl", tinymodel.pref_rows(test_words)),
    }


@pytest.fixture(scope="session")
def servable_model(tmp_path_factory) -> Path:
    """The same tiny Llama with 2 attention heads (head_dim 32): vLLM's CPU attention serves no
    smaller head. A plain HF directory with tokenizer and chat template."""
    import torch

    torch.set_num_threads(1)
    return tinymodel.build(tmp_path_factory.mktemp("tiny-llama-servable") / "model", heads=2)
