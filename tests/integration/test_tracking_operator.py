"""spec.tracking through the real kopf loop against kmock: the credential Secrets are dependencies the
job waits for, the training Job gets them as secretKeyRef env, status.tracking comes from the trainer's
log while it runs and from its done message, and the Secrets' values appear in no child, status or
Event. The tests play the cluster's part (pods, Job statuses), as in test_finetunejob_operator.py."""
from __future__ import annotations

import base64
import json

from kmockenv import FTJ_PATH, NS, KMockThread, Operator, wait_for
from test_finetunejob_operator import (
    CMS,
    GOOD_JSONL,
    JOBS,
    PODS,
    SHA,
    configmap,
    finish_job,
    ftj,
    job_posts,
    pvc,
    reasons,
    start_job,
    status_of,
    wait_phase,
)

SECRETS = f"/api/v1/namespaces/{NS}/secrets"
PASSWORD = "tuneop-fake-operator-password-91d0c3"
WANDB_KEY = "tuneop-fake-operator-wandb-key-4be7a2"
TRACKING = {
    "mlflow": {"trackingUri": "https://mlflow.example", "experiment": "news",
               "credentialsSecretRef": {"name": "mlflow-creds", "usernameKey": "username", "passwordKey": "password"}},
    "wandb": {"project": "news", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}},
}
RUN = {"mlflow": {"runId": "0123abcd", "experimentId": "7", "url": "https://mlflow.example/#/experiments/7/runs/0123abcd"},
       "wandb": {"runId": "f00dfeed12345678", "mode": "online", "url": "https://wandb.example/news/runs/f00dfeed"}}
STATUS = {"mlflowRunId": "0123abcd", "mlflowExperimentId": "7", "mlflowRunUrl": RUN["mlflow"]["url"],
          "wandbRunId": "f00dfeed12345678", "wandbMode": "online", "wandbRunUrl": RUN["wandb"]["url"]}


def secret(api: KMockThread, name: str, data: dict[str, str]) -> None:
    api.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                         "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


def test_tracking_secrets_are_waited_for_passed_by_reference_and_the_run_reaches_the_status(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    secret(api, "mlflow-creds", {"username": "trainer", "password": PASSWORD})
    api.emulator["get", f"{PODS}/news-train-x0/log"] << (
        b'{"event":"start","rows":5}\n'
        + json.dumps({"event": "tracking", **RUN}).encode() + b"\n"
        + b'{"event":"progress","step":3,"total_steps":30,"loss":0.9}\n'
    )
    api.create(FTJ_PATH, ftj(train={"configMap": {"name": "news-data", "key": "train.jsonl"}}, tracking=TRACKING))
    with Operator(retry_interval=0.2):
        st = wait_phase(api, "Pending")
        assert st["reason"] == "DependencyMissing" and "Secret wandb" in st["message"]
        assert job_posts(api) == []

        secret(api, "wandb", {"api-key": WANDB_KEY})
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job once the Secret exists")
        job = api.get(f"{JOBS}/news-train")
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "mlflow-creds", "key": "password"}}
        assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}

        start_job(api, "news-train")
        wait_for(lambda: status_of(api).get("tracking") == STATUS, what="status.tracking from the log")
        assert status_of(api)["phase"] == "Running"

        finish_job(api, "news-train", container="trainer",
                   message=json.dumps({"event": "done", "adapter": {"sha256": SHA}, "tracking": RUN}))
        st = wait_phase(api, "Succeeded")
        wait_for(lambda: "Succeeded" in reasons(api), what="Succeeded event")
    assert st["tracking"] == STATUS
    written = json.dumps([api.get(f"{CMS}/news-config"), api.get(f"{JOBS}/news-train"), st, api.events()])
    assert "mlflow-creds" in written  # the references are there ...
    for value in (PASSWORD, WANDB_KEY, base64.b64encode(PASSWORD.encode()).decode(),
                  base64.b64encode(WANDB_KEY.encode()).decode()):
        assert value not in written  # ... never the values
