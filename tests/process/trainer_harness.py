"""Helpers to run `python -m tuneop.trainer` as a real subprocess and read its contract:
JSON events on stdout, the termination message, the exit code."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


def make_config(
    path: Path,
    model: Path | str,
    train: Path | str,
    output: Path,
    test: Optional[Path | str] = None,
    validation: Optional[Path | str] = None,
    **spec: Any,
) -> Path:
    """Write a resolved job config (as jobconfig.resolve would) to path; returns path."""
    hyper = {"maxSteps": 30, "learningRate": 5e-3, "batchSize": 8, "maxSeqLength": 64, "warmupRatio": 0.05}
    hyper.update(spec.pop("hyperparameters", {}))
    body: dict[str, Any] = {
        "baseModel": str(model),
        "dataset": {"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": hyper,
        "output": {"pvc": {"claimName": "out", "path": "job"}},
        "evaluation": {"maxNewTokens": 4},
    }
    if test is not None:
        body["dataset"]["test"] = {"pvc": {"claimName": "data", "path": "test.jsonl"}}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    doc = {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": body,
        "paths": {
            "model": str(model),
            "train": str(train),
            "validation": str(validation) if validation else None,
            "test": str(test) if test else None,
            "output": str(output),
        },
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


@dataclass
class Run:
    rc: int
    events: list[dict[str, Any]]
    stdout: str
    stderr: str
    termination: Optional[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of(kind)
        assert found, f"no {kind!r} event; rc={self.rc}\nstdout:\n{self.stdout}\nstderr tail:\n{self.stderr[-3000:]}"
        return found[-1]


def trainer_env(termination: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TUNEOP_TERMINATION_LOG": str(termination),
            "TUNEOP_PROGRESS": "0",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def parse_events(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line must be one JSON object with an 'event' (the contract)."""
    events = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"stdout line is not JSON: {line!r}") from None
        assert isinstance(obj, dict) and "event" in obj, line
        events.append(obj)
    return events


def run_trainer(
    config: Path,
    *extra_args: str,
    cmd: Optional[list[str]] = None,
    timeout: float = 240,
    env: Optional[dict[str, str]] = None,
) -> Run:
    termination = config.with_suffix(".termination")
    if termination.exists():
        termination.unlink()
    argv = cmd or [sys.executable, "-m", "tuneop.trainer"]
    proc = subprocess.Popen(
        [*argv, "--config", str(config), *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=trainer_env(termination, **(env or {})),
        cwd=str(config.parent),
        start_new_session=True,  # so a hung run (and torchrun's workers) can be killed as a group
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"trainer timed out after {timeout}s\nstdout:\n{stdout}\nstderr:\n{stderr[-3000:]}") from None
    term = json.loads(termination.read_text()) if termination.exists() and termination.read_text() else None
    return Run(proc.returncode, parse_events(stdout), stdout, stderr, term)
