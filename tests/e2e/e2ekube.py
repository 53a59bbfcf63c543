"""Helpers of the opt-in e2e suite against a real cluster with tuneop installed (scripts/e2e.sh sets it up).

Runs only with ``pytest -m e2e`` (deselected by default) and skips cleanly unless kubectl exists,
a cluster answers and the operator Deployment is there. Env: TUNEOP_E2E_NAMESPACE (the operator's
namespace, tuneop-system), TUNEOP_E2E_CONTEXT (a kubectl context; default: the current one),
TUNEOP_E2E_TRAINER_IMAGE and TUNEOP_E2E_VLLM_IMAGE (the trainer-cpu and vllm-cpu images: train the quickstart
and serve its adapter; scripts/e2e.sh sets them).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Callable, Optional

NS = os.environ.get("TUNEOP_E2E_NAMESPACE", "tuneop-system")
TENANT = "team-a"


def kubectl(*args: str, input: Optional[str] = None, check: bool = True, timeout: float = 60) -> str:
    cmd = ["kubectl"]
    if os.environ.get("TUNEOP_E2E_CONTEXT"):
        cmd += ["--context", os.environ["TUNEOP_E2E_CONTEXT"]]
    p = subprocess.run(cmd + list(args), input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def get_json(*args: str) -> Optional[dict[str, Any]]:
    out = kubectl("get", *args, "-o", "json", "--ignore-not-found", check=False)
    return json.loads(out) if out.strip() else None


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")
