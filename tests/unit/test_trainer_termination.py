"""SIGTERM handling: the watchdog's deadline, the flag while training, Interrupted elsewhere."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from tuneop.trainer import termination as T


def test_grace_and_watchdog_delay():
    assert T.grace_seconds({}) == 30.0
    assert T.grace_seconds({T.GRACE_ENV: "300"}) == 300.0
    assert T.grace_seconds({T.GRACE_ENV: "soon"}) == 30.0 and T.grace_seconds({T.GRACE_ENV: "0"}) == 30.0
    assert T.watchdog_delay(30) == 25.0  # a margin of 5 s ...
    assert T.watchdog_delay(300) == 270.0  # ... or 10 % of the grace period
    assert T.watchdog_delay(3) == 1.0


def test_signal_outside_training_raises_and_inside_only_flags():
    exits = []
    term = T.Termination(grace=30, exit=exits.append)
    with term.deferring():
        term.handle(signal.SIGTERM)  # while training: the flag only
        assert term.requested == "SIGTERM" and term.deferred
    assert not term.deferred
    with pytest.raises(T.Interrupted) as e:
        term.raise_if_requested()
    assert e.value.signal_name == "SIGTERM"
    with pytest.raises(T.Interrupted):
        term.handle(signal.SIGTERM)  # while loading or evaluating: at once
    assert not isinstance(T.Interrupted("SIGTERM"), Exception)  # passes through `except Exception`
    term._cancel.set()
    assert exits == []


def test_watchdog_exits_143_after_the_delay():
    done = threading.Event()
    exits, reports = [], []

    def fake_exit(code):
        exits.append(code)
        done.set()

    term = T.Termination(grace=0.5, exit=fake_exit, on_timeout=lambda: reports.append(term.requested))
    with term.deferring():
        term.handle(signal.SIGTERM)
    assert done.wait(5)
    assert exits == [143] and reports == ["SIGTERM"]


def test_installed_handler_and_restore():
    term = T.Termination(grace=30, exit=lambda code: None)
    before = signal.getsignal(signal.SIGTERM)
    restore = term.install()
    try:
        with term.deferring():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs in the main thread between bytecodes
                if term.requested:
                    break
        assert term.requested == "SIGTERM"
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == before
    term._cancel.set()
