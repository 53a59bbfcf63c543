"""How progress is shown to a person: a tqdm bar on a terminal, plain lines elsewhere (files, CI logs,
pod logs), where a bar's carriage-return redraws would pile up. Also the `evaluating` events of the test
evaluation. Light: no torch, no transformers (`tuneop run` imports it)."""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Callable, Optional

PROGRESS_ENV = "TUNEOP_PROGRESS"
MODES = ("bar", "lines", "off")
LINE_FRACTION = 0.1  # a plain line every 10 % of the work ...
LINE_SECONDS = 30.0  # ... or every 30 s, whichever comes first
EVAL_EVENT_SECONDS = 5.0  # `evaluating` events at most this often (plus the first and the last of a stage)


def progress_mode(environ: Optional[dict[str, str]] = None, stream: Any = None) -> str:
    """TUNEOP_PROGRESS -> "bar" | "lines" | "off". 0/false/no/off: nothing; bar or lines: that form;
    unset or 1/true/yes/auto: a bar when `stream` (stderr) is a terminal, plain lines otherwise."""
    env = os.environ if environ is None else environ
    flag = (env.get(PROGRESS_ENV) or "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return "off"
    if flag in ("bar", "lines"):
        return flag
    target = stream if stream is not None else sys.stderr
    try:
        return "bar" if target.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


def format_duration(seconds: Optional[float]) -> str:
    """1m20s, 45s, 2h03m; '?' when unknown."""
    if seconds is None:
        return "?"
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_line(event: dict[str, Any]) -> Optional[str]:
    """A progress or evaluating event -> one plain line:
    "training: step 12/30 loss 0.41 eta 1m20s", "evaluating adapter: 16/24 eta 3s"."""
    kind = event.get("event")
    if kind == "progress":
        line = f"training: step {event.get('step')}/{event.get('total_steps') or '?'}"
        if isinstance(event.get("loss"), (int, float)):
            line += f" loss {event['loss']:.4g}"
        return line + f" eta {format_duration(event.get('eta_seconds'))}"
    if kind == "evaluating":
        return (f"evaluating {event.get('stage')}: {event.get('done')}/{event.get('total')}"
                f" eta {format_duration(event.get('eta_seconds'))}")
    return None


def line_due(done: int, total: Optional[int], last_done: Optional[int], now: float, last_time: Optional[float],
             fraction: float = LINE_FRACTION, seconds: float = LINE_SECONDS) -> bool:
    """Print a line now? The first one, the last one (done == total), each time another `fraction` of the
    total is done, and otherwise after `seconds` without a line."""
    if last_done is None or last_time is None:
        return True
    if done <= last_done:
        return False
    if total and done >= total:
        return True
    if total and int(done / (total * fraction)) > int(last_done / (total * fraction)):
        return True
    return now - last_time >= seconds


class LinePrinter:
    """Emitter echo in "lines" mode: turns progress and evaluating events into throttled plain lines."""

    def __init__(self, stream: Optional[IO[str]] = None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.clock = clock
        self.last: dict[str, tuple[int, float]] = {}  # per series (training, evaluating <stage>)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            series, done, total = "training", event.get("step"), event.get("total_steps")
        elif kind == "evaluating":
            series, done, total = f"evaluating {event.get('stage')}", event.get("done"), event.get("total")
        else:
            return
        if not isinstance(done, int):
            return
        now = self.clock()
        last_done, last_time = self.last.get(series, (None, None))
        if not line_due(done, total if isinstance(total, int) else None, last_done, now, last_time):
            return
        self.last[series] = (done, now)
        stream = self.stream if self.stream is not None else sys.stderr
        print(format_line(event), file=stream, flush=True)


def eval_eta(done: int, total: int, elapsed: float) -> Optional[int]:
    if done <= 0 or elapsed <= 0:
        return None
    return int(round(elapsed / done * max(0, total - done)))


class EvalProgress:
    """`{"event": "evaluating", "stage", "done", "total", "eta_seconds"}` for one stage of the test
    evaluation: at its start, then at most every EVAL_EVENT_SECONDS, and at its end."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], stage: str, total: int,
                 clock: Callable[[], float] = time.monotonic, interval: float = EVAL_EVENT_SECONDS):
        self.emit = emit
        self.stage = stage
        self.total = int(total)
        self.clock = clock
        self.interval = interval
        self.t0 = clock()
        self.last_emit = self.t0
        self.done = 0
        self._send(0)

    def _send(self, done: int) -> None:
        self.emit({"event": "evaluating", "stage": self.stage, "done": done, "total": self.total,
                   "eta_seconds": eval_eta(done, self.total, self.clock() - self.t0)})

    def __call__(self, done: int) -> None:
        """`done` rows of the stage scored so far."""
        self.done = done
        now = self.clock()
        if done >= self.total or now - self.last_emit >= self.interval:
            self.last_emit = now
            self._send(done)
