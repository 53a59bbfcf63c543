"""Opt-in e2e suite: skipped unless kubectl exists, a cluster answers and tuneop is installed
(scripts/e2e.sh sets all of that up with kind). See e2ekube.py for the environment variables."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from e2ekube import NS, get_json, kubectl


@pytest.fixture(scope="session", autouse=True)
def cluster() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not found")
    try:
        kubectl("version", "--request-timeout=5s", timeout=15)
    except (AssertionError, subprocess.TimeoutExpired):
        pytest.skip("no reachable Kubernetes cluster (scripts/e2e.sh creates one with kind)")
    if get_json("deployment", "tuneop", "-n", NS) is None:
        pytest.skip(f"tuneop is not installed in namespace {NS} (scripts/e2e.sh installs it)")
