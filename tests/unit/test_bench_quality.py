"""Pure helpers of benchmarks/quality.py (answer normalisation, the step budget)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
q = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(q)


@pytest.mark.parametrize("prediction,label,ok", [
    (" Sci/Tech", " Sci/Tech", True),
    ("Sports.", " Sports", True),
    (" business\nThe", " Business", True),
    (" World news", " World", True),
    ("The topic is World", " World", False),
    ("", " World", False),
    ("Sci", " Sci/Tech", False),
])
def test_is_correct(prediction, label, ok):
    assert q.is_correct(prediction, label) is ok


def test_accuracy_and_strict():
    preds = [" World", "Sports.", " Business", "x"]
    labels = [" World", " Sports", " Business", " Sci/Tech"]
    assert q.accuracy(preds, labels) == 0.75
    assert q.strict_accuracy(preds, labels) == 0.5


def test_news_text_drops_the_instruction():
    prompt = 'Classify the topic.\nReturn just...\n\nTitle: "A"\nDescription: "B"\nAnswer:'
    text = q.news_text(prompt)
    assert "Classify" not in text and "Answer" not in text and '"A"' in text and '"B"' in text


def test_compare_errors_finds_the_rows_every_run_gets_wrong():
    labels = [" World", " Sports", " Business", " Sci/Tech"]
    runs = {"a": [" World", " World", " Business\n", " Business"],
            "b": [" World", " World", " Sci/Tech", " Business"],
            "c": [" Sports", " World", " Business", " Business"]}
    out = q.compare_errors(runs, labels)
    assert out["errors"] == {"a": 2, "b": 3, "c": 3}
    assert out["wrong_in_all"] == [1, 3] and out["wrong_in_any"] == 4
    assert out["confusions_in_all"] == [["Sports", "World", 1], ["Sci/Tech", "Business", 1]]
    assert out["majority_vote_accuracy"] == 0.5  # rows 0 and 2 by 2 votes to 1
