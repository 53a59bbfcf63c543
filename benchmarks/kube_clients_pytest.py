"""pytest plugin: run tuneop's operator tests with tuneop.kube.KubeClient swapped for a
library-backed client of benchmarks/kube_clients.py (the handlers must behave the same):

    BENCH_KUBE_CLIENT=lightkube PYTHONPATH=benchmarks .venv/bin/python -m pytest -p kube_clients_pytest \
        tests/integration/test_finetunejob_operator.py tests/integration/test_adapterdeployment_operator.py
"""
from __future__ import annotations

import os
from typing import Any


def pytest_configure(config: Any) -> None:
    name = os.environ.get("BENCH_KUBE_CLIENT")
    if name:
        import kube_clients

        kube_clients.install(name)


def pytest_report_header(config: Any) -> str:
    from tuneop import kube

    return f"tuneop.kube.KubeClient: {kube.KubeClient.__module__}.{kube.KubeClient.__name__}"
