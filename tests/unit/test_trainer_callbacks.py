"""The Trainer callback's events, driven with a fake TrainerState."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from tuneop.trainer import paths as P  # noqa: E402
from tuneop.trainer.callbacks import (
    CheckpointMarker,
    EventCallback,
    StopOnSignal,
    eta_seconds,
    spent_before,
    stop_requested,
)
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


def control():
    return SimpleNamespace(should_save=False, should_training_stop=False, should_evaluate=True, should_log=False)


def test_stop_on_signal_saves_and_stops_after_the_current_step():
    term = SimpleNamespace(requested=None)
    cb = StopOnSignal(term, sync=None)
    args = SimpleNamespace(output_dir="/o")
    c = cb.on_step_end(args, state(step=3), control())
    assert not c.should_save and not c.should_training_stop and c.should_evaluate and cb.stopped_at is None
    term.requested = "SIGTERM"
    c = cb.on_step_end(args, state(step=4), control())
    assert c.should_save and c.should_training_stop and not c.should_evaluate and c.should_log
    assert cb.stopped_at == 4


def test_stop_on_signal_follows_the_agreed_flag_of_all_ranks():
    seen = []

    def sync(values):  # another rank got the signal: the maximum over the ranks is 1
        seen.append(values)
        return [1.0]

    cb = StopOnSignal(SimpleNamespace(requested=None), sync=sync)
    c = cb.on_step_end(SimpleNamespace(output_dir="/o"), state(step=7), control())
    assert seen == [[0.0]] and c.should_training_stop and c.should_save and cb.stopped_at == 7
    # and a rank that got it stops only when the agreement says so (a broadcast of rank 0's flag)
    assert stop_requested(True, lambda v: [0.0]) is False
    assert stop_requested(True, None) is True and stop_requested(False, None) is False


def test_checkpoint_marker_commits_then_rotates(tmp_path):
    root = tmp_path / "checkpoints"
    run = root / "fp1"
    args = SimpleNamespace(output_dir=str(run))
    budget = SimpleNamespace(elapsed=12.3456, budget=60.0)
    cb = CheckpointMarker("fp1", budget=budget, keep=2)
    for step in (10, 20, 30):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        cb.on_save(args, state(step=step), None)
    marker = json.loads((run / "checkpoint-30" / P.CHECKPOINT_MARKER).read_text())
    assert marker == {"fingerprint": "fp1", "step": 30, "elapsed_seconds": 12.346, "budget_seconds": 60.0}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-20", "checkpoint-30"]  # the oldest rotated out
    assert cb.last == (30, str(run / "checkpoint-30"))
    assert spent_before(str(run / "checkpoint-30")) == 12.346
    # other ranks write nothing
    (run / "checkpoint-40").mkdir()
    cb.on_save(args, state(step=40, main=False), None)
    assert not (run / "checkpoint-40" / P.CHECKPOINT_MARKER).exists()
    # without a budget the marker records none
    CheckpointMarker("fp1").on_save(args, state(step=40), None)
    assert json.loads((run / "checkpoint-40" / P.CHECKPOINT_MARKER).read_text())["elapsed_seconds"] is None
    assert spent_before(str(run / "checkpoint-40")) == 0.0
