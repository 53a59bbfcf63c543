"""finetunejob/builders.py: FineTuneJob dict in, manifests out."""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tuneop.finetunejob import builders as b


def ftj(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": "Qwen/Qwen3-8B",
        "dataset": {
            "train": {"pvc": {"claimName": "datasets", "path": "news/train.jsonl"}},
            "test": {"configMap": {"name": "news-test", "key": "test.jsonl"}},
        },
        "output": {"pvc": {"claimName": "adapters", "path": "news"}},
    }
    base.update(spec)
    return {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "news", "namespace": "team-a", "uid": "uid-1", "generation": 3},
        "spec": base,
    }


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


# ---------------------------------------------------------------------------------- common


@pytest.mark.parametrize("builder,component", [
    (b.build_config_map, "config"),
    (b.build_validation_job, "validate"),
    (b.build_training_job, "train"),
])
def test_every_child_is_labelled_and_owned(builder: Any, component: str) -> None:
    obj = builder(ftj())
    meta = obj["metadata"]
    assert meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "tuneop",
        "app.kubernetes.io/name": "tuneop",
        "app.kubernetes.io/component": component,
        "tuneop.dev/finetunejob": "news",
        "tuneop.dev/generation": "3",
    }
    assert meta["ownerReferences"] == [{
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "name": "news", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True,
    }]
    assert meta["annotations"][b.SPEC_HASH_ANNOTATION] == b.spec_hash(b.parse_spec(ftj()["spec"]))


def test_builders_are_pure() -> None:
    body = ftj()
    before = copy.deepcopy(body)
    assert b.build_training_job(body) == b.build_training_job(body)
    assert body == before


def test_spec_hash_ignores_suspend_only() -> None:
    spec = ftj()["spec"]
    h = b.spec_hash(b.parse_spec(spec))
    assert b.spec_hash(b.parse_spec({**spec, "suspend": True})) == h
    assert b.spec_hash(b.parse_spec({**spec, "baseModel": "other"})) != h
    # defaults filled or not: same spec, same hash
    assert b.spec_hash(b.parse_spec({**spec, "method": "sft"})) == h


# ---------------------------------------------------------------------------------- config


def test_config_map_holds_the_resolved_job_config() -> None:
    cm = b.build_config_map(ftj())
    assert cm["metadata"]["name"] == "news-config"
    config = json.loads(cm["data"]["job.json"])
    assert config["metadata"] == {"name": "news", "namespace": "team-a", "uid": "uid-1", "generation": 3}
    assert config["paths"] == {
        "model": "Qwen/Qwen3-8B",
        "train": "/mnt/pvc/datasets/news/train.jsonl",
        "validation": None,
        "test": "/mnt/configmap/news-test/test.jsonl",
        "output": "/mnt/pvc/adapters/news",
    }
    assert config["spec"]["baseModel"] == "Qwen/Qwen3-8B"


# ---------------------------------------------------------------------------------- validation Job


def test_validation_job_is_cpu_only_read_only_and_small() -> None:
    job = b.build_validation_job(ftj(resources={"gpus": 4, "nodeSelector": {"gpu": "h100"}}), image="img:1")
    assert job["metadata"]["name"] == "news-validate"
    c = container(job)
    assert c["image"] == "img:1"
    assert c["command"] == [
        "python", "-m", "tuneop.trainer", "--config", "/etc/tuneop/job.json", "--validate-only"
    ]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert c["resources"]["limits"]["memory"] == "2Gi"
    assert all(m["readOnly"] for m in c["volumeMounts"])
    assert set(mounts(c)) == {"/etc/tuneop", "/mnt/pvc/datasets", "/mnt/pvc/adapters", "/mnt/configmap/news-test"}
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["containerName"] == "validate"


def test_needs_validation_job_only_for_pvc_or_url_datasets() -> None:
    spec = b.parse_spec
    assert b.needs_validation_job(spec(ftj()["spec"]))
    cm_only = ftj(dataset={"train": {"configMap": {"name": "d", "key": "t.jsonl"}}})["spec"]
    assert not b.needs_validation_job(spec(cm_only))
    url = ftj(dataset={"train": {"url": "https://example.com/t.jsonl"}})["spec"]
    assert b.needs_validation_job(spec(url))


# ---------------------------------------------------------------------------------- training Job


def test_single_gpu_training_job() -> None:
    body = ftj(
        resources={"gpus": 1, "cpu": "8", "memory": "64Gi", "shmSize": "16Gi",
                   "nodeSelector": {"gpu": "h100"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        maxRetries=5, activeDeadlineSeconds=3600,
    )
    job = b.build_training_job(body, image="default:img")
    assert job["metadata"]["name"] == "news-train"
    spec = job["spec"]
    assert spec["backoffLimit"] == 5
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["suspend"] is False
    assert "completionMode" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
    }
    assert rules[1]["action"] == "Ignore"
    # a trainer that stopped on SIGTERM with its checkpoint written is not a failure: the next pod resumes
    assert rules[2] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]},
    }
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False  # the trainer never calls the API server
    assert pod["terminationGracePeriodSeconds"] == 300
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "subdomain" not in pod
    c = container(job)
    assert c["name"] == "trainer"
    assert c["image"] == "default:img"
    assert c["command"] == ["python", "-m", "tuneop.trainer", "--config", "/etc/tuneop/job.json"]
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 1},
    }
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    e = env(c)
    assert e["TUNEOP_TERMINATION_LOG"] == "/dev/termination-log"
    assert e["HF_HOME"] == "/mnt/pvc/adapters/news/.hf-home"
    assert e["TUNEOP_TERMINATION_GRACE_SECONDS"] == "300"
    assert "HF_TOKEN" not in e
    m = mounts(c)
    assert m["/mnt/pvc/adapters"]["readOnly"] is False
    assert m["/mnt/pvc/datasets"]["readOnly"] is True
    assert m["/mnt/configmap/news-test"]["readOnly"] is True
    assert m["/etc/tuneop"]["readOnly"] is True
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    assert vols["config"]["configMap"]["name"] == "news-config"
    assert m["/dev/shm"]["name"] == "dshm"


def test_grace_period_is_a_setting_the_trainer_knows() -> None:
    job = b.build_training_job(ftj(terminationGracePeriodSeconds=1800))
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 1800
    assert env(container(job))["TUNEOP_TERMINATION_GRACE_SECONDS"] == "1800"
    # unset: not in the spec hash, so objects written before the field keep theirs
    assert "terminationGracePeriodSeconds" not in b.parse_spec(ftj()["spec"]).to_dict()
    with pytest.raises(Exception, match="terminationGracePeriodSeconds|termination_grace_period_seconds"):
        b.parse_spec(ftj(terminationGracePeriodSeconds=5)["spec"])


def test_spec_image_wins_over_the_default() -> None:
    job = b.build_training_job(ftj(image="my/trainer:2"), image="default:img")
    assert container(job)["image"] == "my/trainer:2"


def test_each_distinct_pvc_is_mounted_once() -> None:
    body = ftj(
        dataset={
            "train": {"pvc": {"claimName": "shared", "path": "train.jsonl"}},
            "validation": {"pvc": {"claimName": "shared", "path": "val.jsonl"}},
        },
        output={"pvc": {"claimName": "shared", "path": "out"}},
        modelVolume={"claimName": "models", "path": "qwen"},
        baseModel="Qwen3-8B",
    )
    job = b.build_training_job(body)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == ["shared", "models"]
    m = mounts(container(job))
    assert m["/mnt/pvc/shared"]["readOnly"] is False  # it is the output claim
    assert m["/mnt/pvc/models"]["readOnly"] is True
    config = json.loads(b.build_config_map(body)["data"]["job.json"])
    assert config["paths"]["model"] == "/mnt/pvc/models/qwen/Qwen3-8B"


def test_no_gpu_limit_when_gpus_is_zero_and_no_shm_size() -> None:
    job = b.build_training_job(ftj(resources={"gpus": 0, "shmSize": None}))
    c = container(job)
    assert "resources" not in c
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory"}


def test_custom_gpu_resource_name() -> None:
    job = b.build_training_job(ftj(resources={"gpus": 2, "gpuResourceName": "amd.com/gpu"}))
    assert container(job)["resources"]["limits"] == {"amd.com/gpu": 2}


def test_hf_token_only_as_secret_key_ref() -> None:
    body = ftj(hfTokenSecretRef={"name": "hf", "key": "token"})
    for job in (b.build_training_job(body), b.build_validation_job(body)):
        e = env(container(job))
        assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "hf_" not in json.dumps(b.build_config_map(body)["data"])


def test_suspend_is_mirrored() -> None:
    assert b.build_training_job(ftj(suspend=True))["spec"]["suspend"] is True


def test_multi_gpu_single_node_uses_torchrun_standalone() -> None:
    job = b.build_training_job(ftj(resources={"gpus": 4}))
    assert container(job)["command"] == [
        "torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "4",
        "-m", "tuneop.trainer", "--config", "/etc/tuneop/job.json",
    ]
    assert "completionMode" not in job["spec"]
    assert b.build_headless_service(ftj(resources={"gpus": 4})) is None


def test_multi_node_is_an_indexed_job_with_a_headless_service() -> None:
    body = ftj(resources={"gpus": 8, "nodes": 3})
    job = b.build_training_job(body)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "news-train"
    c = container(job)
    assert c["command"] == [
        "torchrun", "--nnodes", "3", "--nproc-per-node", "8",
        "--node-rank", "$(JOB_COMPLETION_INDEX)",
        "--rdzv-backend", "static",
        "--master-addr", "news-train-0.news-train", "--master-port", "29500",
        "-m", "tuneop.trainer", "--config", "/etc/tuneop/job.json",
    ]
    # $(JOB_COMPLETION_INDEX) expands only from env defined in the container.
    assert c["env"][0]["name"] == "JOB_COMPLETION_INDEX"
    assert c["ports"] == [{"name": "rdzv", "containerPort": 29500}]
    svc = b.build_headless_service(body)
    assert svc is not None
    assert svc["metadata"]["name"] == "news-train"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    # The Service selects exactly the training pods of this job.
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["metadata"]["ownerReferences"][0]["name"] == "news"


def test_build_children_order() -> None:
    names = [(o["kind"], o["metadata"]["name"]) for o in b.build_children(ftj(resources={"nodes": 2}))]
    assert names == [
        ("ConfigMap", "news-config"), ("Job", "news-validate"), ("Service", "news-train"), ("Job", "news-train")
    ]


def test_adapter_location() -> None:
    assert b.adapter_location(b.parse_spec(ftj()["spec"])) == "pvc://adapters/news/adapter"
    root = ftj(output={"pvc": {"claimName": "adapters"}})["spec"]
    assert b.adapter_location(b.parse_spec(root)) == "pvc://adapters/adapter"
