"""How progress is shown: a bar on a terminal, plain lines elsewhere; the evaluating events."""
from __future__ import annotations

import io

from tuneop.trainer import progress as PR
from tuneop.trainer.events import Emitter


class Tty(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_mode():
    assert PR.progress_mode({}, Tty()) == "bar"
    assert PR.progress_mode({}, io.StringIO()) == "lines"  # a file, a pipe, a CI log: no \r redraws
    assert PR.progress_mode({"TUNEOP_PROGRESS": "1"}, io.StringIO()) == "lines"  # "show progress", form by output
    assert PR.progress_mode({"TUNEOP_PROGRESS": "1"}, Tty()) == "bar"
    for off in ("0", "false", "no", "off"):
        assert PR.progress_mode({"TUNEOP_PROGRESS": off}, Tty()) == "off"
    assert PR.progress_mode({"TUNEOP_PROGRESS": "bar"}, io.StringIO()) == "bar"
    assert PR.progress_mode({"TUNEOP_PROGRESS": "lines"}, Tty()) == "lines"
    assert PR.progress_mode({}, object()) == "lines"  # no isatty


def test_line_format():
    assert PR.format_line({"event": "progress", "step": 12, "total_steps": 30, "loss": 0.41234,
                           "eta_seconds": 80}) == "training: step 12/30 loss 0.4123 eta 1m20s"
    assert PR.format_line({"event": "progress", "step": 1, "total_steps": None, "loss": None,
                           "eta_seconds": None}) == "training: step 1/? eta ?"
    assert PR.format_line({"event": "evaluating", "stage": "adapter", "done": 16, "total": 24,
                           "eta_seconds": 3}) == "evaluating adapter: 16/24 eta 3s"
    assert PR.format_line({"event": "checkpoint"}) is None
    assert PR.format_duration(7325) == "2h02m" and PR.format_duration(59.6) == "1m00s"


def test_line_due_every_tenth_or_thirty_seconds():
    assert PR.line_due(1, 100, None, 0.0, None)  # the first
    assert not PR.line_due(5, 100, 1, 1.0, 0.0)
    assert PR.line_due(10, 100, 5, 2.0, 1.0)  # crossed 10 %
    assert not PR.line_due(15, 100, 10, 3.0, 2.0)
    assert PR.line_due(15, 100, 10, 32.0, 2.0)  # 30 s without a line
    assert PR.line_due(100, 100, 95, 33.0, 32.5)  # the last
    assert not PR.line_due(10, 100, 10, 99.0, 0.0)  # nothing new
    assert PR.line_due(7, None, 3, 40.0, 5.0) and not PR.line_due(7, None, 3, 10.0, 5.0)


def test_line_printer_through_the_emitter():
    err, out, clock = io.StringIO(), io.StringIO(), Clock()
    emitter = Emitter(stream=out, echo=PR.LinePrinter(err, clock=clock))
    for step in range(1, 31):
        clock.t += 0.5
        emitter.emit({"event": "progress", "step": step, "total_steps": 30, "loss": 1.0 / step, "eta_seconds": 30 - step})
    emitter.emit({"event": "checkpoint", "step": 30, "path": "/x"})
    lines = err.getvalue().splitlines()
    assert [int(line.split()[2].split("/")[0]) for line in lines] == [1, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert lines[-1] == "training: step 30/30 loss 0.03333 eta 0s"
    assert "\r" not in err.getvalue()
    assert len(out.getvalue().splitlines()) == 31  # the events themselves are untouched


def test_eval_progress_events():
    sent, clock = [], Clock()
    progress = PR.EvalProgress(sent.append, "base", 64, clock=clock, interval=5)
    assert sent == [{"event": "evaluating", "stage": "base", "done": 0, "total": 64, "eta_seconds": None}]
    clock.t = 2.0
    progress(16)  # 2 s after the start: not yet
    clock.t = 6.0
    progress(32)
    clock.t = 8.0
    progress(48)
    clock.t = 9.0
    progress(64)  # the end of the stage: always
    assert [(e["done"], e["eta_seconds"]) for e in sent] == [(0, None), (32, 6), (64, 0)]
