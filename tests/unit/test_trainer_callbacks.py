"""The Trainer callback's events, driven with a fake TrainerState."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from tuneop.trainer.callbacks import EventCallback, eta_seconds, progress_bar_wanted  # noqa: E402
from tuneop.trainer.events import Emitter  # noqa: E402


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def state(step=0, max_steps=10, tokens=0, main=True, epoch=0.0):
    return SimpleNamespace(global_step=step, max_steps=max_steps, num_input_tokens_seen=tokens,
                           is_world_process_zero=main, epoch=epoch)


def events(buf):
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_event_sequence(tmp_path):
    buf, clock = io.StringIO(), Clock()
    cb = EventCallback(Emitter(stream=buf, output_dir=str(tmp_path)), {"model": "m", "resumed_from": None}, clock=clock)
    args = SimpleNamespace(output_dir=str(tmp_path / "checkpoints"))
    cb.on_train_begin(args, state(step=0), None)
    cb.on_step_begin(args, state(step=0), None)
    clock.t += 8  # 8 s inside steps, 2 s elsewhere (evaluation, saving): tokens/s counts the steps only
    cb.on_step_end(args, state(step=5), None)
    clock.t += 2
    cb.on_log(args, state(step=5, tokens=1000, epoch=0.5), None, logs={"loss": 1.5, "learning_rate": 1e-4})
    cb.on_evaluate(args, state(step=5), None, metrics={"eval_loss": 1.2, "eval_runtime": 3})
    cb.on_save(args, state(step=5), None)
    cb.on_log(args, state(step=10), None, logs={"train_loss": 1.0, "train_runtime": 20.0})
    ev = events(buf)
    assert [e["event"] for e in ev] == ["start", "progress", "eval", "checkpoint"]
    assert ev[0] == {"event": "start", "model": "m", "resumed_from": None, "total_steps": 10, "step": 0}
    p = ev[1]
    assert p == {"event": "progress", "step": 5, "total_steps": 10, "epoch": 0.5, "loss": 1.5,
                 "learning_rate": 1e-4, "tokens_per_second": 125.0, "eta_seconds": 10,
                 "tokens_seen": 1000, "train_seconds": 8.0}
    assert ev[2] == {"event": "eval", "step": 5, "eval_loss": 1.2}
    assert ev[3] == {"event": "checkpoint", "step": 5, "path": str(tmp_path / "checkpoints" / "checkpoint-5")}
    assert json.loads((tmp_path / "progress.json").read_text()) == p
    assert cb.train_metrics["train_loss"] == 1.0 and cb.last_eval_step == 5


def test_resumed_eta_counts_only_this_session():
    buf, clock = io.StringIO(), Clock()
    cb = EventCallback(Emitter(stream=buf), {}, clock=clock)
    args = SimpleNamespace(output_dir="/o")
    cb.on_train_begin(args, state(step=50, max_steps=100, tokens=5000), None)
    cb.on_step_begin(args, state(step=50), None)
    clock.t += 5
    cb.on_step_end(args, state(step=60), None)
    cb.on_log(args, state(step=60, max_steps=100, tokens=6000), None, logs={"loss": 1.0, "learning_rate": 0.1})
    p = events(buf)[-1]
    assert p["eta_seconds"] == 20 and p["tokens_per_second"] == 200.0


def test_other_ranks_are_silent():
    buf = io.StringIO()
    cb = EventCallback(Emitter(stream=buf), {})
    args = SimpleNamespace(output_dir="/o")
    cb.on_train_begin(args, state(main=False), None)
    cb.on_log(args, state(step=1, main=False), None, logs={"loss": 1.0})
    cb.on_save(args, state(step=1, main=False), None)
    assert buf.getvalue() == ""


def test_helpers():
    assert eta_seconds(0, 10, 5) is None and eta_seconds(10, 20, 5) == 10
    assert progress_bar_wanted({"TUNEOP_PROGRESS": "1"}, io.StringIO())
    assert not progress_bar_wanted({"TUNEOP_PROGRESS": "0"}, io.StringIO())
    assert not progress_bar_wanted({}, io.StringIO())

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_bar_wanted({}, Tty())
