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


def test_steps_for_budget():
    assert q.steps_for_budget(20, 6.0) == 200
    assert q.steps_for_budget(10, 7.0) == 85
    assert q.steps_for_budget(0.01, 60.0) == 1
    with pytest.raises(ValueError):
        q.steps_for_budget(1, 0)


def test_news_text_drops_the_instruction():
    prompt = 'Classify the topic.\nReturn just...\n\nTitle: "A"\nDescription: "B"\nAnswer:'
    text = q.news_text(prompt)
    assert "Classify" not in text and "Answer" not in text and '"A"' in text and '"B"' in text


def test_probe_s_per_step_uses_time_inside_steps():
    m = {"steps": 10, "tokens_seen": 8000, "tokens_per_second": 250.0, "train_runtime": 45.0}
    assert q.probe_s_per_step(m) == pytest.approx(3.2)
    assert q.probe_s_per_step({"steps": 10, "train_runtime": 45.0}) == pytest.approx(4.5)
