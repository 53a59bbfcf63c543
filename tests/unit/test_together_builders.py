"""backends/together/builders.py: the upload and download Jobs of backend together."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tuneop.backends import registered as backends
from tuneop.backends.together import builders as tb
from tuneop.finetunejob import builders as b


def ftj(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "backend": "together",
        "baseModel": "Qwen/Qwen2.5-7B-Instruct",
        "dataset": {
            "train": {"pvc": {"claimName": "datasets", "path": "news/train.jsonl"}},
            "validation": {"configMap": {"name": "news-val", "key": "val.jsonl"}},
            "test": {"pvc": {"claimName": "tests", "path": "t.jsonl"}},
        },
        "output": {"pvc": {"claimName": "adapters", "path": "news"}},
        "together": {"apiKeySecretRef": {"name": "together", "key": "api-key"}},
    }
    base.update(spec)
    return {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "news", "namespace": "team-a", "uid": "uid-1", "generation": 2}, "spec": base}


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_upload_job_mounts_data_read_only_and_gets_the_key_by_reference() -> None:
    job = tb.build_upload_job(ftj(), image="trainer:1", base_url="http://together.internal")
    assert job["metadata"]["name"] == "news-upload"
    c = container(job)
    assert c["command"] == ["python", "-m", "tuneop.backends.together.pod", "upload", "--config", "/etc/tuneop/job.json"]
    assert c["image"] == "trainer:1"
    env = {e["name"]: e for e in c["env"]}
    assert env["TOGETHER_API_KEY"] == {"name": "TOGETHER_API_KEY",
                                       "valueFrom": {"secretKeyRef": {"name": "together", "key": "api-key"}}}
    assert env["TOGETHER_BASE_URL"]["value"] == "http://together.internal"
    assert env["TUNEOP_TERMINATION_LOG"]["value"] == "/dev/termination-log"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert set(mounts) == {"/etc/tuneop", "/mnt/pvc/datasets", "/mnt/configmap/news-val"}
    assert all(m["readOnly"] for m in mounts.values())
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"] == b._pod_security_context()
    assert c["securityContext"] == b._container_security_context()
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    assert job["metadata"]["ownerReferences"][0]["name"] == "news"
    assert job["metadata"]["labels"]["tuneop.dev/finetunejob"] == "news"


def test_download_job_writes_only_the_output_volume() -> None:
    job = tb.build_download_job(ftj(), job_id="ft-123", image="trainer:1")
    c = container(job)
    assert c["command"] == ["python", "-m", "tuneop.backends.together.pod", "download", "--config",
                            "/etc/tuneop/job.json", "--job-id", "ft-123"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert set(mounts) == {"/etc/tuneop", "/mnt/pvc/adapters"}
    assert mounts["/mnt/pvc/adapters"].get("readOnly") is not True
    assert "TOGETHER_BASE_URL" not in {e["name"] for e in c["env"]}
    assert tb.build_download_job(ftj(), job_id="ft-1", suspend=True)["spec"]["suspend"] is True
    with pytest.raises(ValueError):
        tb.build_download_job(ftj(), job_id="ft-1; rm -rf /")


def test_render_of_a_together_job_is_config_and_upload() -> None:
    kinds = [(m["kind"], m["metadata"]["name"]) for m in backends.children(ftj(), image=b.DEFAULT_IMAGE)]
    assert kinds == [("ConfigMap", "news-config"), ("Job", "news-upload")]
    text = json.dumps(backends.children(ftj(), image=b.DEFAULT_IMAGE))
    assert "secretKeyRef" in text  # the key itself is never in a manifest, only its reference
