"""Trainer events: JSON lines, progress.json, termination message size and location."""
from __future__ import annotations

import io
import json
import math

from tuneop.trainer import events as E


def test_emitter_writes_lines_and_progress(tmp_path):
    buf = io.StringIO()
    em = E.Emitter(stream=buf, output_dir=str(tmp_path))
    em.emit({"event": "start", "total_steps": 3})
    em.emit({"event": "progress", "step": 1, "loss": float("nan")})
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines == [{"event": "start", "total_steps": 3}, {"event": "progress", "step": 1, "loss": None}]
    assert json.loads((tmp_path / "progress.json").read_text()) == lines[1]
    assert oct((tmp_path / "progress.json").stat().st_mode & 0o777) == oct(0o644)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_disabled_emitter_is_silent(tmp_path):
    buf = io.StringIO()
    em = E.Emitter(stream=buf, output_dir=str(tmp_path), enabled=False,
                   environ={E.TERMINATION_ENV: str(tmp_path / "term")})
    em.emit({"event": "progress", "step": 1})
    em.terminate({"event": "done"})
    assert buf.getvalue() == "" and not (tmp_path / "term").exists() and not (tmp_path / "progress.json").exists()


def test_terminate_writes_termination_log(tmp_path):
    buf = io.StringIO()
    term = tmp_path / "term"
    em = E.Emitter(stream=buf, environ={E.TERMINATION_ENV: str(term)})
    em.terminate({"event": "error", "reason": "DatasetInvalid", "message": "line 3: invalid JSON"})
    assert json.loads(term.read_text())["reason"] == "DatasetInvalid"
    assert json.loads(buf.getvalue()) == json.loads(term.read_text())


def test_termination_path(tmp_path):
    assert E.termination_log_path({E.TERMINATION_ENV: "/x/y"}) == "/x/y"


def test_fit_termination_stays_under_4k():
    big = {
        "event": "done",
        "adapter": {"path": "/o/adapter", "sha256": "a" * 64},
        "metrics": {f"m{i}": i for i in range(500)} | {"train_loss": 0.5},
        "evaluation": {"metric": "exact_match", "samples": 3, "base": 0.1, "adapter": 0.9},
    }
    text = E.fit_termination(big)
    assert len(text.encode()) <= 4096
    out = json.loads(text)
    assert out["adapter"]["sha256"] == "a" * 64 and out["metrics"] == {"train_loss": 0.5}
    assert out["evaluation"]["adapter"] == 0.9
    err = E.fit_termination({"event": "error", "reason": "TrainingError", "message": "x" * 10000})
    assert len(err.encode()) <= 4096 and json.loads(err)["reason"] == "TrainingError"


def test_clean_and_shorten():
    assert E.clean({"a": (1, math.inf), 2: {"b": float("nan")}}) == {"a": [1, None], "2": {"b": None}}
    assert len(E.shorten("y" * 5000)) == E.MESSAGE_LIMIT
    assert E.shorten("a   b\tc") == "a b c"
