"""A FineTuneJob with s3:// data and output through the real kopf loop against kmock: the storage
Secret is a dependency (named while it is missing), the pods get the endpoint, region and the key pair
only as secretKeyRef env, and the status carries the uploaded adapter's URI or the upload failure."""
from __future__ import annotations

import json

from kmockenv import FTJ_PATH, NS, KMockThread, Operator, wait_for
from test_finetunejob_operator import JOBS, SHA, finish_job, ftj, pvc, reasons, start_job, status_of, wait_phase

SECRETS = f"/api/v1/namespaces/{NS}/secrets"
KEY = "s3-SECRET-never-shown-4b1e"
STORAGE = {"s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-3",
                  "credentialsSecretRef": {"name": "s3-credentials"}}}


def s3_ftj(**spec):
    return ftj(train={"url": "s3://datasets/news/train.jsonl"}, storage=STORAGE,
               output={"pvc": {"claimName": "adapters", "path": "news"}, "s3": {"uri": "s3://adapters/team-a/news"}},
               **spec)


def env_of(job: dict) -> dict:
    c = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_s3_job_waits_for_its_secret_then_validates_trains_and_reports_the_upload(api: KMockThread) -> None:
    pvc(api, "adapters")
    api.create(FTJ_PATH, s3_ftj())
    with Operator(retry_interval=0.2):
        st = wait_phase(api, "Pending")
        assert st["reason"] == "DependencyMissing" and "Secret s3-credentials" in st["message"]
        assert api.get(f"{JOBS}/news-validate") is None

        api.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                             "stringData": {"accessKeyId": "AK", "secretAccessKey": KEY},
                             "data": {"accessKeyId": "QUs=", "secretAccessKey": "eA=="}})
        validate = wait_for(lambda: api.get(f"{JOBS}/news-validate"), what="validation Job once the Secret exists")
        env = env_of(validate)
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-west-3"
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-credentials", "key": "secretAccessKey"}}
        finish_job(api, "news-validate", container="validate", message=json.dumps(
            {"event": "validated", "dataset": {"format": "messages", "trainRows": 5, "validationRows": 0,
                                               "testRows": 0, "estimatedTokens": 50}}))
        train = wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        assert env_of(train)["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-credentials", "key": "accessKeyId"}}
        start_job(api, "news-train")
        finish_job(api, "news-train", container="trainer", message=json.dumps(
            {"event": "done", "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA,
                                          "uri": "s3://adapters/team-a/news"}}))
        st = wait_phase(api, "Succeeded")
    assert st["adapter"]["uri"] == "s3://adapters/team-a/news"
    assert "uploaded to s3://adapters/team-a/news" in st["message"]
    assert reasons(api)[0] == "DependencyMissing" and reasons(api)[-1] == "Succeeded"
    requests = api.requests("", "/")
    assert len(requests) > 20
    # the key itself is in no object the operator wrote nor any request body it sent
    for r in requests:
        if not r.url.path.startswith(SECRETS):
            assert KEY not in json.dumps(r.data or {}, default=str), r.url.path
    assert KEY not in json.dumps(status_of(api)) and all(KEY not in json.dumps(e) for e in api.events())


def test_a_failed_upload_is_the_jobs_failure_reason(api: KMockThread) -> None:
    pvc(api, "adapters")
    api.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                         "data": {"accessKeyId": "QUs=", "secretAccessKey": "eA=="}})
    api.create(FTJ_PATH, s3_ftj())
    message = ("cannot upload the adapter to output.s3.uri s3://adapters/team-a/news: s3://adapters/team-a/news/"
               "adapter_config.json: NoSuchBucket (HTTP 404): The specified bucket does not exist; its "
               "tuneop-manifest.json is not there: the upload counts as not done")
    with Operator(retry_interval=0.2):
        wait_for(lambda: api.get(f"{JOBS}/news-validate"), what="validation Job")
        finish_job(api, "news-validate", container="validate", message=json.dumps(
            {"event": "validated", "dataset": {"format": "messages", "trainRows": 5}}))
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        start_job(api, "news-train")
        finish_job(api, "news-train", container="trainer", exit_code=2, message=json.dumps(
            {"event": "error", "reason": "OutputUploadFailed", "message": message}),
            job_condition={"type": "Failed", "status": "True", "reason": "PodFailurePolicy"})
        st = wait_phase(api, "Failed")
    assert st["reason"] == "OutputUploadFailed"
    assert "NoSuchBucket" in st["message"] and "s3://adapters/team-a/news" in st["message"]
    assert "adapter" not in st
