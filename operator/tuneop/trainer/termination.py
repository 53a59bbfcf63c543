"""SIGTERM (suspend, eviction, node drain): stop after the current step, write a complete checkpoint, exit 143.

The trainer runs as PID 1 of its container, where SIGTERM has no default action: without a handler it
would train on until the kubelet's SIGKILL. Here, a SIGTERM
- while training (a `deferred` section) only raises a flag; callbacks.StopOnSignal ends training after the
  current step and has it saved; main() then reports `{"event": "interrupted", ...}` and exits 143;
- anywhere else (loading, validation, the test evaluation) raises Interrupted at once;
- in every case starts a watchdog: if the process is still alive `watchdog_delay(grace)` seconds later, it
  leaves with os._exit(143) before the kubelet kills it (a checkpoint cut short then has no commit
  marker, so the previous complete one stays the resume point).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

GRACE_ENV = "TUNEOP_TERMINATION_GRACE_SECONDS"  # the pod's terminationGracePeriodSeconds (set by the operator)
DEFAULT_GRACE_SECONDS = 30.0  # Kubernetes' default
EXIT_CODE = 143  # 128 + SIGTERM: not a success, so the Job neither completes nor counts it as one


def grace_seconds(environ: Optional[dict[str, str]] = None) -> float:
    env = os.environ if environ is None else environ
    try:
        value = float(env.get(GRACE_ENV, "") or DEFAULT_GRACE_SECONDS)
    except ValueError:
        return DEFAULT_GRACE_SECONDS
    return value if value > 0 else DEFAULT_GRACE_SECONDS


def watchdog_delay(grace: float) -> float:
    """Seconds after the signal the watchdog waits before exiting: the grace period less a margin of 10 %
    of it, at least 5 s (the exit itself, the termination message); never under 1 s."""
    return max(1.0, float(grace) - max(5.0, 0.1 * float(grace)))


class Interrupted(BaseException):
    """Raised in the main thread on SIGTERM outside the training loop. A BaseException, so that code
    catching Exception (libraries, our error reporting) lets it through."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class Termination:
    def __init__(
        self,
        grace: float = DEFAULT_GRACE_SECONDS,
        exit: Callable[[int], None] = os._exit,
        on_timeout: Optional[Callable[[], None]] = None,
    ):
        self.grace = grace
        self.exit = exit
        self.on_timeout = on_timeout
        self.requested: Optional[str] = None  # the signal's name once one arrived
        self.deferred = False
        self.watchdog: Optional[threading.Thread] = None
        self._cancel = threading.Event()

    def install(self) -> Callable[[], None]:
        """Handle SIGTERM from now on (main thread only); returns a function restoring the previous handler."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.signal(signal.SIGTERM, self.handle)

        def restore() -> None:
            if self.requested is None:  # after a signal the watchdog still guards the interpreter's exit
                self._cancel.set()
            signal.signal(signal.SIGTERM, previous)

        return restore

    def handle(self, signum: int, _frame=None) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            where = "stopping after the current step" if self.deferred else "stopping"
            print(f"tuneop: {name} received: {where}; exiting at the latest in "
                  f"{watchdog_delay(self.grace):.0f}s", file=sys.stderr, flush=True)
            self.start_watchdog()
        if not self.deferred:
            raise Interrupted(name)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Inside, a signal only raises the flag (the training loop stops at the end of its step; the
        adapter swap completes)."""
        before = self.deferred
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = before

    def raise_if_requested(self) -> None:
        if self.requested is not None:
            raise Interrupted(self.requested)

    def start_watchdog(self) -> None:
        if self.watchdog is not None:
            return
        self.watchdog = threading.Thread(target=self._expire, args=(watchdog_delay(self.grace),),
                                         name="tuneop-sigterm-watchdog", daemon=True)
        self.watchdog.start()

    def _expire(self, delay: float) -> None:
        if self._cancel.wait(delay):
            return  # the run ended (main() restored the handler) before the deadline
        print(f"tuneop: still running {delay:.0f}s after {self.requested}: exiting with {EXIT_CODE} "
              "(the newest complete checkpoint stays the resume point)", file=sys.stderr, flush=True)
        if self.on_timeout is not None:
            try:
                self.on_timeout()
            except Exception:  # noqa: BLE001 - the exit must happen whatever the report does
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self.exit(EXIT_CODE)
