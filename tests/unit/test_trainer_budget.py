"""hyperparameters.maxTrainSeconds: the pure decisions (config.py) and the TimeBudget callback driven with
a fake clock and TrainerState."""
from __future__ import annotations

import io
import json
import math
from types import SimpleNamespace

import pytest

from tuneop.api.finetunejob import Hyperparameters
from tuneop.trainer import config as C


def test_field_validation_names_the_field():
    assert Hyperparameters(max_train_seconds=600).max_train_seconds == 600
    assert Hyperparameters.model_validate({"maxTrainSeconds": 1200}).max_train_seconds == 1200
    with pytest.raises(ValueError, match="max_train_seconds|maxTrainSeconds"):
        Hyperparameters.model_validate({"maxTrainSeconds": 5})


def test_progress_is_time_or_steps_whichever_is_further():
    assert C.budget_progress(30, 120, 1, 100) == 0.25
    assert C.budget_progress(30, 120, 50, 100) == 0.5  # the step limit comes first
    assert C.budget_progress(500, 120, 1, 100) == 1.0
    assert C.budget_progress(0, 120, 0, 0) == 0.0


@pytest.mark.parametrize("sched,p,w,want", [
    ("cosine", 0.0, 0.1, 0.0),
    ("cosine", 0.05, 0.1, 0.5),  # half way through warmup
    ("cosine", 0.1, 0.1, 1.0),
    ("cosine", 0.55, 0.1, 0.5),  # half way through the decay
    ("cosine", 1.0, 0.1, 0.0),
    ("linear", 0.55, 0.1, 0.5),
    ("linear", 1.0, 0.0, 0.0),
    ("polynomial", 0.5, 0.0, 0.5),
    ("cosine_with_restarts", 0.5, 0.0, 0.5),
    ("constant", 0.0, 0.5, 1.0),  # like transformers: constant has no warmup
    ("constant_with_warmup", 0.25, 0.5, 0.5),
    ("constant_with_warmup", 0.9, 0.5, 1.0),
])
def test_lr_factor_shapes(sched, p, w, want):
    assert math.isclose(C.budget_lr_factor(sched, p, w), want, abs_tol=1e-9)


def test_cosine_over_the_budget_is_monotone_after_warmup():
    xs = [C.budget_lr_factor("cosine", i / 100, 0.05) for i in range(5, 101)]
    assert all(a >= b for a, b in zip(xs, xs[1:])) and xs[0] == 1.0 and xs[-1] == 0.0


def test_stop_before_a_step_would_overrun():
    assert not C.budget_should_stop(0, 60, None)
    assert not C.budget_should_stop(50, 60, 9.0)
    assert C.budget_should_stop(52, 60, 9.0)  # 52 + 9 > 60
    assert C.budget_should_stop(60, 60, None)


def test_expected_steps():
    assert C.budget_expected_steps(10, 20, 60, 2.0, 1000) == 30
    assert C.budget_expected_steps(10, 20, 60, 2.0, 25) == 25  # epochs end first
    assert C.budget_expected_steps(0, 0, 60, None, 500) == 500
    assert C.budget_expected_steps(0, 0, 60, None, 0) is None


# ------------------------------------------------------------------ the callback

pytest.importorskip("transformers")
from tuneop.trainer.callbacks import BUDGET_FILE, CheckpointMarker, EventCallback, TimeBudget, spent_before  # noqa: E402
from tuneop.trainer.events import Emitter  # noqa: E402


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def state(step, max_steps=1000, main=True):
    return SimpleNamespace(global_step=step, max_steps=max_steps, num_input_tokens_seen=step * 100,
                           is_world_process_zero=main, epoch=step / max_steps)


def control():
    return SimpleNamespace(should_training_stop=False, should_log=False, should_save=False)


def run_steps(cb, clock, seconds_per_step, until, max_steps=1000, start=0):
    """Drive steps until the callback stops training; returns (last step, lr factors seen)."""
    args = SimpleNamespace(output_dir="/nowhere")
    cb.on_train_begin(args, state(start, max_steps), control())
    lrs, step = [], start
    while step < until:
        lrs.append(cb.lr_factor())
        clock.t += seconds_per_step
        step += 1
        c = control()
        cb.on_step_end(args, state(step, max_steps), c)
        if c.should_training_stop:
            assert c.should_log and c.should_save  # the last loss and a checkpoint at the budget's end
            break
    return step, lrs


def test_budget_stops_within_the_budget_and_the_schedule_ends_with_it():
    clock = Clock()
    cb = TimeBudget(60, "cosine", 0.1, clock=clock)
    step, lrs = run_steps(cb, clock, 7.0, until=1000)
    assert cb.stopped and step == 8  # 8 x 7 s = 56 s; a 9th step would end at 63 s
    assert clock.t - 1000.0 <= 60
    assert lrs[0] == 0.0 and max(lrs) > 0.9 and lrs[-1] < 0.2  # warmup, peak, decayed near the end
    assert cb.expected_steps == 8


def test_step_limit_first_is_not_a_budget_stop():
    clock = Clock()
    cb = TimeBudget(600, "linear", 0.0, clock=clock)
    step, _ = run_steps(cb, clock, 1.0, until=20, max_steps=20)
    assert step == 20 and not cb.stopped
    assert cb.progress == 1.0  # by steps: the schedule ended with the epochs


def test_resume_counts_the_budget_spent_before(tmp_path):
    ckpt = tmp_path / "fp" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    clock = Clock()
    first = TimeBudget(100, "cosine", 0.0, clock=clock)
    args = SimpleNamespace(output_dir=str(tmp_path / "fp"))
    run_steps(first, clock, 10.0, until=5)
    CheckpointMarker("fp", budget=first).on_save(args, state(5), control())  # the budget spent is in the marker
    assert json.loads((ckpt / "tuneop-checkpoint.json").read_text())["elapsed_seconds"] == 50.0
    assert spent_before(str(ckpt)) == 50.0
    assert spent_before(str(tmp_path / "missing")) == 0.0 and spent_before(None) == 0.0
    legacy = tmp_path / "checkpoint-7"  # an older trainer's checkpoint: tuneop-budget.json
    legacy.mkdir()
    (legacy / BUDGET_FILE).write_text(json.dumps({"elapsed_seconds": 30.5, "budget_seconds": 100}))
    assert spent_before(str(legacy)) == 30.5

    clock2 = Clock()
    resumed = TimeBudget(100, "cosine", 0.0, spent=spent_before(str(ckpt)), clock=clock2)
    step, lrs = run_steps(resumed, clock2, 10.0, until=1000, start=5)
    assert resumed.stopped and step == 10  # 50 s before + 5 x 10 s
    assert math.isclose(lrs[0], 0.5, abs_tol=1e-9)  # continues the cosine at half the budget


def test_ranks_follow_rank_zero():
    """Under DDP the broadcast decides: a rank whose own clock says go on stops with rank 0."""
    clock = Clock()
    cb = TimeBudget(1000, "cosine", 0.0, clock=clock, sync=lambda values: [990.0, 1.0])
    c = control()
    cb.on_train_begin(SimpleNamespace(output_dir="/x"), state(0), c)
    clock.t += 1
    cb.on_step_end(SimpleNamespace(output_dir="/x"), state(1), c)
    assert c.should_training_stop and cb.elapsed == 990.0 and math.isclose(cb.progress, 0.99)


def test_progress_events_show_the_step_the_budget_ends_at(tmp_path):
    clock = Clock()
    budget = TimeBudget(100, "cosine", 0.0, clock=clock)
    buf = io.StringIO()
    ev = EventCallback(Emitter(stream=buf, output_dir=str(tmp_path)), {}, clock=clock, budget=budget)
    args = SimpleNamespace(output_dir=str(tmp_path))
    for cb in (budget, ev):
        cb.on_train_begin(args, state(0), control())
    for step in (1, 2):
        ev.on_step_begin(args, state(step - 1), control())
        clock.t += 10
        for cb in (budget, ev):
            cb.on_step_end(args, state(step), control())
    ev.on_log(args, state(2), control(), logs={"loss": 1.0, "learning_rate": 1e-4})
    progress = [json.loads(x) for x in buf.getvalue().splitlines()][-1]
    assert progress["total_steps"] == 10 and progress["eta_seconds"] == 80
