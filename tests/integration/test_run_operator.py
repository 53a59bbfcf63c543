"""`run_operator()`, the entry point of `tuneop operator`, against kmock."""
from __future__ import annotations

import socket
import threading
import urllib.request

from kmockenv import FTJ_PATH, NS, KMockThread, wait_for
from tuneop.handlers import run_operator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_operator_clusterwide_serves_metrics(api: KMockThread) -> None:
    # Cluster-wide (no namespaces): kmock cannot list Namespaces, which kopf's namespace scanning
    # of run_operator([...]) needs; CRD scanning works.
    api.create(f"/api/v1/namespaces/{NS}/persistentvolumeclaims",
               {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters"}})
    api.create(f"/api/v1/namespaces/{NS}/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "data"},
               "data": {"t.jsonl": '{"text": "hello"}\n{"text": "world"}\n'}})
    api.create(FTJ_PATH, {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "entry", "generation": 1},
        "spec": {"baseModel": "m", "dataset": {"train": {"configMap": {"name": "data", "key": "t.jsonl"}}},
                 "output": {"pvc": {"claimName": "adapters", "path": "entry"}}, "resources": {"gpus": 0}},
    })
    port = free_port()
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_operator(None, port, "registry.example/trainer:9", metrics_addr="127.0.0.1",
                         stop_flag=stop, ready_flag=ready)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        job = wait_for(lambda: api.get(f"/apis/batch/v1/namespaces/{NS}/jobs/entry-train"), 15, "training Job")
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:9"
        text = wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode(),
                        what="metrics")
        assert 'tuneop_finetunejobs{phase="Running"}' in text
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert errors == []
