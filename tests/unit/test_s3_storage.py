"""Object storage, the pure parts: SigV4 signing (AWS's published example), s3:// URIs, settings from the
environment, spec.storage.s3 -> pod env (credentials only as secretKeyRef), the dependencies, what the
Together backend refuses, the status of an uploaded adapter and of a failed upload. The requests
themselves run against a real S3 server in tests/process/test_s3.py."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from pydantic import ValidationError
from test_podcauses import CRASHLOOP, crashed, cstatus, deployment
from test_podcauses import pod as vllm_pod
from test_status import LATER, SHA, cond, job, pod, run, running_ftj

from tuneop import podcauses, s3
from tuneop.adapterdeployment import builders as adb
from tuneop.api.adapterdeployment import AdapterDeploymentSpec
from tuneop.api.finetunejob import FineTuneJobSpec
from tuneop.backends.together.client import unsupported
from tuneop.cli import local_problems, local_storage_env
from tuneop.finetunejob import builders as b
from tuneop.finetunejob import reconcile as r

STORAGE = {"s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-3",
                  "credentialsSecretRef": {"name": "s3-creds"}}}


def ftj(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": "Qwen/Qwen3-8B",
        "dataset": {"train": {"url": "s3://datasets/news/train.jsonl"}},
        "output": {"pvc": {"claimName": "adapters", "path": "news"}, "s3": {"uri": "s3://adapters/news"}},
        "storage": STORAGE,
    }
    base.update(spec)
    return {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "news", "namespace": "team-a", "uid": "uid-1", "generation": 1}, "spec": base}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_sigv4_matches_the_aws_documented_example() -> None:
    # "Example: GET Object" of the S3 API reference (Signature Version 4, header-based auth)
    settings = s3.Settings(access_key_id="AKIAIOSFODNN7EXAMPLE",
                           secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    headers = s3.sign("GET", "examplebucket.s3.amazonaws.com", "/test.txt", {}, {"Range": "bytes=0-9"},
                      s3.EMPTY_SHA256, settings, dt.datetime(2013, 5, 24, tzinfo=dt.timezone.utc))
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    unsigned = s3.sign("GET", "h", "/k", {}, {}, s3.EMPTY_SHA256, s3.Settings(), dt.datetime(2013, 5, 24))
    assert "Authorization" not in unsigned


def test_uris_and_addresses() -> None:
    assert s3.parse_uri("s3://my-bucket/a/b c.jsonl") == ("my-bucket", "a/b c.jsonl")
    assert s3.parse_uri("s3://my-bucket") == ("my-bucket", "")
    for bad in ("https://x/y", "s3://UPPER/k", "s3://a/k", "s3://bucket/../etc", "s3://b..c/k"):
        with pytest.raises(s3.S3Error) as e:
            s3.parse_uri(bad)
        assert e.value.code == "InvalidUri" and bad in str(e.value)
    on_endpoint = s3.Settings(endpoint="http://127.0.0.1:9000")
    assert s3.address(on_endpoint, "b", "a b/c") == ("http", "127.0.0.1:9000", "/b/a%20b/c")
    assert s3.address(s3.Settings(region="eu-west-3"), "b", "k") == ("https", "b.s3.eu-west-3.amazonaws.com", "/k")
    with pytest.raises(s3.S3Error) as e:
        s3.address(s3.Settings(endpoint="minio:9000"), "b", "k")
    assert e.value.code == "InvalidEndpoint" and "minio:9000" in str(e.value) and e.value.client_error


def test_settings_from_the_environment_never_show_the_secret() -> None:
    st = s3.Settings.from_env({"AWS_ENDPOINT_URL": "http://minio:9000/", "AWS_DEFAULT_REGION": "eu-west-3",
                               "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "very-secret"})
    assert (st.endpoint, st.region, st.access_key_id) == ("http://minio:9000", "eu-west-3", "AK")
    assert "very-secret" not in repr(st)
    assert s3.Settings.from_env({"AWS_ENDPOINT_URL_S3": "http://a", "AWS_ENDPOINT_URL": "http://b"}).endpoint == "http://a"
    half = s3.Settings.from_env({"AWS_ACCESS_KEY_ID": "AK"})  # no secret: unsigned, not half-signed
    assert half.access_key_id is None and half.region == "us-east-1"
    assert s3.S3Error("s3://b/k", "NoSuchKey", "", 404).client_error
    assert not s3.S3Error("s3://b/k", "Unreachable", "reset").client_error
    assert not s3.S3Error("s3://b/k", "InternalError", "", 500).client_error


def test_pods_get_the_storage_settings_and_the_key_pair_only_from_the_secret() -> None:
    body = ftj(storage={"s3": {**STORAGE["s3"], "credentialsSecretRef": {
        "name": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}}})
    for built in (b.build_validation_job(body), b.build_training_job(body)):
        e = env_of(built["spec"]["template"]["spec"]["containers"][0])
        assert e["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000" and e["AWS_REGION"] == "eu-west-3"
        assert e["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "id"}}
        assert e["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "secret"}}
    assert b.needs_validation_job(FineTuneJobSpec.model_validate(body["spec"]))
    config = json.loads(b.build_config_map(body)["data"]["job.json"])
    assert config["paths"]["train"] == "s3://datasets/news/train.jsonl"
    assert config["spec"]["output"]["s3"] == {"uri": "s3://adapters/news"}
    plain = ftj(storage=None)
    plain["spec"].pop("storage")
    assert not any(k.startswith("AWS_") for k in env_of(b.build_training_job(plain)["spec"]["template"]["spec"]["containers"][0]))


def test_the_secret_is_a_dependency_with_both_keys() -> None:
    deps = r.dependencies(FineTuneJobSpec.model_validate(ftj()["spec"]))
    assert ("Secret", "s3-creds", "accessKeyId") in deps and ("Secret", "s3-creds", "secretAccessKey") in deps


def test_s3_fields_are_validated_naming_the_field() -> None:
    spec = ftj()["spec"]
    for bad_output in ("https://x/y", "s3://Bad_Bucket/x", "s3:/x"):
        with pytest.raises(ValidationError) as e:
            FineTuneJobSpec.model_validate({**spec, "output": {"pvc": {"claimName": "a"}, "s3": {"uri": bad_output}}})
        assert "output.s3.uri" in str(e.value)
    with pytest.raises(ValidationError) as e:
        FineTuneJobSpec.model_validate({**spec, "dataset": {"train": {"url": "ftp://x/y"}}})
    assert "dataset.train.url" in str(e.value)
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate({**spec, "storage": {"s3": {"endpoint": "minio:9000"}}})


def test_together_refuses_s3_naming_the_fields() -> None:
    spec = FineTuneJobSpec.model_validate(ftj(backend="together", together={"apiKeySecretRef": {"name": "t", "key": "k"},
                                                                         "model": "m"})["spec"])
    problems = unsupported(spec)
    assert any(p.startswith("output.s3:") for p in problems)
    assert any(p.startswith("dataset.train.url:") and "s3://" in p for p in problems)


def test_adapterdeployment_fetches_s3_adapters_with_the_storage_env() -> None:
    body = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "AdapterDeployment",
            "metadata": {"name": "qwen", "namespace": "team-a", "uid": "uid-1", "generation": 1},
            "spec": {"baseModel": "Qwen/Qwen3-8B", "storage": STORAGE,
                     "adapters": [{"name": "news", "source": {"url": "s3://adapters/news", "sha256": SHA}}]}}
    AdapterDeploymentSpec.model_validate(body["spec"])
    dep = adb.build_deployment(body)
    init = dep["spec"]["template"]["spec"]["initContainers"]
    assert len(init) == 1
    assert init[0]["command"] == ["python", "-m", "tuneop.serving.fetch", "--url", "s3://adapters/news",
                                  "--dest", "/adapters/news", "--sha256", SHA]
    e = env_of(init[0])
    assert e["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000"
    assert e["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "secretAccessKey"}}
    # the vLLM container itself gets no storage credentials
    assert not any(k.startswith("AWS_") for k in env_of(dep["spec"]["template"]["spec"]["containers"][0]))


def test_status_of_an_uploaded_adapter_and_of_a_failed_upload() -> None:
    ftj_ = running_ftj()
    done = {"event": "done", "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA,
                                         "uri": "s3://adapters/news"}}
    d = run(ftj_, now=LATER, training_job=job(ftj_, "train", "succeeded"),
            training_pods=[pod("news-train", "trainer", message=json.dumps(done))])
    assert d.status["phase"] == "Succeeded" and d.status["adapter"]["uri"] == "s3://adapters/news"
    assert "uploaded to s3://adapters/news" in d.status["message"]

    msg = ("cannot upload the adapter to output.s3.uri s3://nope/news: s3://nope/news/adapter_config.json: "
           "NoSuchBucket (HTTP 404); its tuneop-manifest.json is not there: the upload counts as not done")
    for exit_code, job_reason in ((2, "PodFailurePolicy"), (1, "BackoffLimitExceeded")):
        d = run(ftj_, now=LATER, training_job=job(ftj_, "train", "failed", reason=job_reason),
                training_pods=[pod("news-train", "trainer", exit_code=exit_code, message=json.dumps(
                    {"event": "error", "reason": "OutputUploadFailed", "message": msg}))])
        assert d.status["phase"] == "Failed" and d.status["reason"] == "OutputUploadFailed"
        assert "s3://nope/news" in d.status["message"] and "not done" in d.status["message"]
        assert cond(d.status, "Failed")["reason"] == "OutputUploadFailed"
        assert d.events == [{"type": "Warning", "reason": "OutputUploadFailed", "message": d.status["message"]}]


def test_tuneop_run_takes_endpoint_and_region_from_the_spec_unless_the_shell_sets_them() -> None:
    spec = FineTuneJobSpec.model_validate(ftj()["spec"])
    assert local_storage_env(spec, {}) == {"AWS_ENDPOINT_URL_S3": "http://minio.storage:9000", "AWS_REGION": "eu-west-3"}
    assert local_storage_env(spec, {"AWS_ENDPOINT_URL": "http://local:9000", "AWS_REGION": "x"}) == {}
    # s3:// datasets are the trainer's to read: not a missing local file
    problems = local_problems(spec, {"model": "Qwen/Qwen3-8B", "train": "s3://datasets/news/train.jsonl"})
    assert not any(p.startswith("dataset.") for p in problems)


def test_a_refused_s3_adapter_keeps_the_pod_from_starting_with_the_reason_in_the_status() -> None:
    """fetch exits 2 before vLLM starts: the pod crash-loops in its init container, and the
    AdapterDeployment's cause carries fetch's message naming the URI (nothing reached /adapters)."""
    message = json.dumps({"event": "error", "reason": "AdapterRefused", "message":
                          "s3://adapters/news: Incomplete: no tuneop-manifest.json: the upload did not finish, or "
                          "this is not an adapter tuneop wrote"})
    p = vllm_pod(init=[cstatus("fetch-web", state=CRASHLOOP, restarts=3, last=crashed(2, "Error", message),
                               image="ghcr.io/tuneop/trainer:1")],
                 containers=[cstatus(state=waiting_init())])
    c = podcauses.pod_cause([p], workload=deployment())
    assert c is not None and c["reason"] == "CrashLoop" and c["container"] == "fetch-web"
    assert "s3://adapters/news: Incomplete" in c["message"] and "last exit code 2" in c["message"]


def waiting_init() -> dict[str, Any]:
    return {"waiting": {"reason": "PodInitializing"}}


def test_where_the_data_and_adapter_live_in_s3_does_not_change_the_training_fingerprint() -> None:
    from tuneop.trainer.config import training_fingerprint

    data = {"train": "a" * 64, "validation": None}
    on_s3 = FineTuneJobSpec.model_validate(ftj()["spec"]).to_dict()
    plain = dict(on_s3, storage=None, output={"pvc": {"claimName": "adapters", "path": "news"}},
                 dataset={**on_s3["dataset"], "train": {"pvc": {"claimName": "d", "path": "train.jsonl"}}})
    plain = {k: v for k, v in plain.items() if v is not None}
    assert training_fingerprint(on_s3, data) == training_fingerprint(plain, data)
    other_endpoint = dict(on_s3, storage={"s3": {"endpoint": "https://s3.example.com"}})
    assert training_fingerprint(other_endpoint, data) == training_fingerprint(on_s3, data)
