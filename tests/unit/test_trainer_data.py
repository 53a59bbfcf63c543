"""Dataset handling in the trainer: hold-out split, method/format checks, evaluation pairs."""
from __future__ import annotations

import json

import pytest

from tuneop.trainer import data as D
from tuneop.trainer import evaluate as E
from tuneop.trainer.config import parse_config
from tuneop.trainer.errors import TrainerError


def test_holdout_split_is_seeded_and_partitions():
    rows = [{"i": i} for i in range(100)]
    a_train, a_val = D.holdout_split(rows, 0.1, seed=1)
    b_train, b_val = D.holdout_split(rows, 0.1, seed=1)
    assert a_val == b_val and len(a_val) == 10 and len(a_train) == 90
    assert sorted(r["i"] for r in a_train + a_val) == list(range(100))
    assert D.holdout_split(rows, 0.1, seed=2)[1] != a_val
    assert D.holdout_split(rows[:3], 0.01, seed=0)[1] and len(D.holdout_split(rows[:2], 0.5, 0)[0]) == 1
    assert D.holdout_split(rows[:1], 0.5, 0) == (rows[:1], [])


def test_method_format():
    D.check_method_format("sft", "messages")
    D.check_method_format("dpo", "preference")
    for method, fmt in (("dpo", "messages"), ("sft", "preference")):
        with pytest.raises(TrainerError) as e:
            D.check_method_format(method, fmt)
        assert e.value.reason == "DatasetInvalid"


def cfg_for(tmp_path, train_rows, **spec):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r + "\n" for r in train_rows))
    body = {"baseModel": "m", "dataset": {"train": {"pvc": {"claimName": "d", "path": "t"}}},
            "output": {"pvc": {"claimName": "o"}}}
    body.update(spec)
    return parse_config({"spec": body, "paths": {"model": "m", "train": str(train), "output": str(tmp_path / "o")}})


def test_validate_and_load(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)]
    cfg = cfg_for(tmp_path, rows, dataset={"train": {"pvc": {"claimName": "d", "path": "t"}}, "validationSplit": 0.2})
    report = D.validate(cfg, D.local_paths(cfg))
    assert report["format"] == "prompt-completion"
    assert (report["trainRows"], report["validationRows"], report["testRows"]) == (8, 2, 0)
    splits = D.load(cfg, D.local_paths(cfg))
    assert len(splits.train) == 8 and len(splits.validation) == 2
    assert D.trl_rows([{"prompt": "a", "completion": "b", "x": 1}], "prompt-completion") == [
        {"prompt": "a", "completion": "b"}]


def test_validate_reports_line_numbers(tmp_path):
    cfg = cfg_for(tmp_path, [{"text": "ok"}, "{broken", {"text": ""}])
    with pytest.raises(TrainerError) as e:
        D.validate(cfg, D.local_paths(cfg))
    assert e.value.reason == "DatasetInvalid"
    assert "line 2" in e.value.message and "line 3" in e.value.message
    assert e.value.details["errors"]
    with pytest.raises(TrainerError) as e:
        D.load(cfg, D.local_paths(cfg))
    assert "line 2" in e.value.message


def test_dpo_needs_preference_rows(tmp_path):
    cfg = cfg_for(tmp_path, [{"prompt": "a", "completion": "b"}], method="dpo")
    with pytest.raises(TrainerError) as e:
        D.validate(cfg, D.local_paths(cfg))
    assert "preference" in e.value.message


def test_eval_examples():
    rows = [
        {"prompt": "Q", "completion": " A"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
        {"prompt": [{"role": "user", "content": "u"}], "completion": [{"role": "assistant", "content": "c"}]},
        {"prompt": "P", "chosen": "yes", "rejected": "no"},
        {"text": "unscorable"},
    ]
    pairs = E.examples(rows, None)
    assert pairs[0] == ("Q", " A")
    assert pairs[1][0][-1] == {"role": "user", "content": "u2"} and pairs[1][1] == "a2" and len(pairs[1][0]) == 4
    assert pairs[2] == ([{"role": "user", "content": "u"}], "c")
    assert pairs[3] == ("P", "yes")
    assert len(pairs) == 4


def test_exact_match_scoring():
    assert E.exact_match(" red\n", "red") and not E.exact_match("red green", "red")
    assert E.score(["red", "blue", " gold "], ["red", "red", "gold"]) == round(2 / 3, 4)
    assert E.score([], []) is None
    assert E.cut_at("red<|im_end|>\nmore", ["<|im_end|>", "</s>"]) == "red"
    assert E.result(3, 0.0, 1.0) == {"metric": "exact_match", "samples": 3, "base": 0.0, "adapter": 1.0}
