"""spec.tracking without a server: the model's checks, the training Job's env from Secret references,
the ConfigMap without secrets, status.tracking from the done message, what the trainer logs."""
from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from tuneop.api.finetunejob import FineTuneJobSpec
from tuneop.api.tracking import TrackingSpec
from tuneop.backends import registered as backends
from tuneop.backends.together.client import unsupported
from tuneop.cli import local_secret_notes
from tuneop.finetunejob import builders as b
from tuneop.finetunejob import reconcile as s
from tuneop.trainer import config as C
from tuneop.trainer import tracking as T

MLFLOW = {"trackingUri": "https://mlflow.example:5000", "experiment": "news",
          "credentialsSecretRef": {"name": "mlflow-creds", "usernameKey": "user", "passwordKey": "pass"}}
WANDB = {"project": "tuneop", "entity": "team", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}}


def ftj(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": "Qwen/Qwen3-8B",
        "dataset": {"train": {"pvc": {"claimName": "datasets", "path": "news/train.jsonl"}}},
        "output": {"pvc": {"claimName": "adapters", "path": "news"}},
        "tracking": {"mlflow": MLFLOW, "wandb": WANDB},
    }
    base.update(spec)
    return {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "news", "namespace": "team-a", "uid": "uid-1", "generation": 1}, "spec": base}


def env_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["spec"]["template"]["spec"]["containers"][0]["env"])


# ------------------------------------------------------------------ the model


def test_tracking_uri_with_credentials_is_spec_invalid_without_echoing_them() -> None:
    obj = ftj(tracking={"mlflow": {"trackingUri": "https://bob:hunter2-secret@mlflow.example", "experiment": "x"}})
    d = backends.reconcile(obj, s.Observed(), image="trainer:1", now="2026-01-01T00:00:00Z")
    assert d.status["reason"] == "SpecInvalid" and d.create == []
    assert "tracking.mlflow.trackingUri" in d.status["message"]
    assert "must not carry credentials" in d.status["message"]
    assert "hunter2-secret" not in json.dumps(d.status) and "hunter2-secret" not in json.dumps(d.events)


def test_tracking_uri_must_be_http() -> None:
    with pytest.raises(ValidationError, match="trackingUri must be an http"):
        TrackingSpec.model_validate({"mlflow": {"trackingUri": "file:///tmp/mlruns", "experiment": "x"}})


@pytest.mark.parametrize("ref, problem", [
    ({"name": "c"}, "needs tokenKey, or usernameKey and passwordKey"),
    ({"name": "c", "usernameKey": "u"}, "usernameKey and passwordKey go together"),
    ({"name": "c", "tokenKey": "t", "passwordKey": "p"}, "usernameKey and passwordKey go together"),
])
def test_mlflow_credentials_need_a_token_or_a_username_and_password(ref: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        TrackingSpec.model_validate({"mlflow": {"trackingUri": "http://m", "experiment": "x",
                                                "credentialsSecretRef": ref}})


def test_wandb_online_needs_an_api_key_offline_does_not() -> None:
    with pytest.raises(ValidationError, match="wandb mode online requires apiKeySecretRef"):
        TrackingSpec.model_validate({"wandb": {"project": "p"}})
    spec = TrackingSpec.model_validate({"wandb": {"project": "p", "mode": "offline"}})
    assert spec.wandb is not None and spec.wandb.mode.value == "offline"


def test_tracking_does_not_change_the_training_fingerprint() -> None:
    with_tracking = FineTuneJobSpec.model_validate(ftj()["spec"]).to_dict()
    without = FineTuneJobSpec.model_validate(ftj(tracking=None)["spec"]).to_dict()
    data = {"train": "a" * 64, "validation": None}
    assert "tracking" in with_tracking and "tracking" not in without
    assert C.training_fingerprint(with_tracking, data) == C.training_fingerprint(without, data)


def test_backend_together_refuses_tracking_naming_the_field() -> None:
    spec = FineTuneJobSpec.model_validate({**ftj()["spec"], "backend": "together",
                                           "together": {"apiKeySecretRef": {"name": "t", "key": "k"}}})
    assert any(m.startswith("tracking:") for m in unsupported(spec))


# ------------------------------------------------------------------ builders


def test_training_job_gets_every_credential_from_its_secret_key() -> None:
    env = env_of(b.build_training_job(ftj()))
    by_name = {e["name"]: e for e in env}
    assert by_name["MLFLOW_TRACKING_USERNAME"] == {
        "name": "MLFLOW_TRACKING_USERNAME", "valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": "user"}}}
    assert by_name["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-creds", "key": "pass"}}
    assert by_name["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    assert "MLFLOW_TRACKING_TOKEN" not in by_name
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"):
        assert "value" not in by_name[name]


def test_a_token_secret_and_offline_wandb_without_a_key() -> None:
    tracking = {"mlflow": {**MLFLOW, "credentialsSecretRef": {"name": "tok", "tokenKey": "token"}},
                "wandb": {"project": "p", "mode": "offline"}}
    env = {e["name"]: e for e in env_of(b.build_training_job(ftj(tracking=tracking)))}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "tok", "key": "token"}}
    assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"} & set(env)


def test_no_tracking_no_tracking_env_and_the_validation_job_never_gets_credentials() -> None:
    names = {e["name"] for e in env_of(b.build_training_job(ftj(tracking=None)))}
    assert not any(n.startswith(("MLFLOW_", "WANDB_")) for n in names)
    names = {e["name"] for e in env_of(b.build_validation_job(ftj()))}
    assert not any(n.startswith(("MLFLOW_", "WANDB_")) for n in names)


def test_config_map_holds_the_settings_and_only_references_to_secrets() -> None:
    cm = b.build_config_map(ftj())
    doc = json.loads(cm["data"]["job.json"])
    tracking = doc["spec"]["tracking"]
    assert tracking["mlflow"]["trackingUri"] == MLFLOW["trackingUri"]
    assert tracking["mlflow"]["credentialsSecretRef"] == MLFLOW["credentialsSecretRef"]
    assert tracking["wandb"]["apiKeySecretRef"] == WANDB["apiKeySecretRef"]


# ------------------------------------------------------------------ status


def test_status_tracking_from_the_done_message() -> None:
    msg = {"tracking": {"mlflow": {"runId": "r1", "experimentId": "3", "url": "http://m/#/experiments/3/runs/r1"},
                        "wandb": {"runId": "abc", "mode": "offline", "secret": "x"}}}
    assert s.tracking_status(msg) == {"mlflowRunId": "r1", "mlflowExperimentId": "3",
                                      "mlflowRunUrl": "http://m/#/experiments/3/runs/r1",
                                      "wandbRunId": "abc", "wandbMode": "offline"}
    assert s.tracking_status({"tracking": "garbage"}) == {}
    assert s.tracking_status({"tracking": {"mlflow": {"runId": 5}}}) == {}


def test_succeeded_job_shows_where_it_was_tracked() -> None:
    obj = ftj(dataset={"train": {"configMap": {"name": "d", "key": "train.jsonl"}}})
    ok = {"ok": True, "format": "messages", "rows": 10, "estimatedTokens": 100, "errors": [], "source": ""}

    def run(o: dict[str, Any], **observed: Any) -> s.Decision:
        return backends.reconcile(o, s.Observed(**observed), image="trainer:1", now="2026-01-01T00:00:00Z")

    d = run(obj, inline_datasets={"train": ok})
    obj["status"] = d.status
    train = b.build_training_job(obj)
    train["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    done = {"event": "done", "adapter": {"sha256": "a" * 64},
            "tracking": {"mlflow": {"runId": "r9", "experimentId": "1", "url": "u"}}}
    pod = {"metadata": {"name": "news-train-x", "labels": {"batch.kubernetes.io/job-name": "news-train"}},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps(done), "reason": "Completed"}}}]}}
    d = run(obj, training_job=train, training_pods=[pod])
    assert d.status["phase"] == "Succeeded"
    assert d.status["tracking"] == {"mlflowRunId": "r9", "mlflowExperimentId": "1", "mlflowRunUrl": "u"}


# ------------------------------------------------------------------ what the trainer logs


def test_report_to_follows_the_spec() -> None:
    assert T.report_to(None) == []
    spec = TrackingSpec.model_validate({"mlflow": MLFLOW, "wandb": WANDB})
    assert T.report_to(spec) == ["mlflow", "wandb"]
    assert T.report_to(TrackingSpec.model_validate({"wandb": WANDB})) == ["wandb"]


def test_run_key_is_stable_per_job_and_training() -> None:
    key = T.run_key("team-a", "news", "uid-1", "f" * 16)
    assert key == T.run_key("team-a", "news", "uid-1", "f" * 16)
    assert len(key) == 16 and int(key, 16) >= 0
    assert key != T.run_key("team-a", "news", "uid-2", "f" * 16)
    assert key != T.run_key("team-a", "news", "uid-1", "e" * 16)


def test_spec_params_leave_out_secret_references_and_tracking() -> None:
    spec = FineTuneJobSpec.model_validate({**ftj()["spec"], "hfTokenSecretRef": {"name": "hf", "key": "t"}}).to_dict()
    params = T.spec_params(spec)
    assert params["tuneop.baseModel"] == "Qwen/Qwen3-8B"
    assert params["tuneop.hyperparameters.learningRate"] == json.dumps(spec["hyperparameters"]["learningRate"])
    assert params["tuneop.output.pvc.claimName"] == "adapters"
    assert not [k for k in params if "SecretRef" in k or k.startswith("tuneop.tracking")]
    assert all(isinstance(v, str) for v in params.values())


def test_spec_params_drop_the_query_and_user_part_of_urls() -> None:
    spec = FineTuneJobSpec.model_validate({**ftj()["spec"], "dataset": {"train": {
        "url": "https://bob:bobs-pw-77@data.example:8443/news/train.jsonl?X-Amz-Signature=sig-secret&X-Amz-Credential=c"}}})
    params = T.spec_params(spec.to_dict())
    assert params["tuneop.dataset.train.url"] == "https://data.example:8443/news/train.jsonl"
    assert not any("sig-secret" in v or "bobs-pw-77" in v for v in params.values())


def test_final_metrics_and_tags() -> None:
    metrics = {"train_loss": 0.5, "final_loss": 0.25, "steps": 12, "stopped_by_time_budget": False, "resumed_from": "/x",
               "tokens_per_second": float("nan")}
    evaluation = {"metric": "exact_match", "samples": 8, "base": 0.25, "adapter": 0.75}
    assert T.final_metrics(metrics, evaluation) == {
        "final_train_loss": 0.5, "final_loss": 0.25, "final_steps": 12.0,
        "test_base_exact_match": 0.25, "test_adapter_exact_match": 0.75, "test_samples": 8.0}
    assert T.final_metrics(None, None) == {}
    tags = T.final_tags({"sha256": "a" * 64, "manifestSha256": "b" * 64}, "f" * 16)
    assert tags == {T.SHA256_TAG: "a" * 64, "tuneop.adapter.manifestSha256": "b" * 64,
                    "tuneop.trainingFingerprint": "f" * 16}


# ------------------------------------------------------------------ tuneop run


def test_tuneop_run_names_the_unset_variables_never_values() -> None:
    spec = FineTuneJobSpec.model_validate(ftj()["spec"])
    notes = local_secret_notes(spec, {"MLFLOW_TRACKING_USERNAME": "alice-secret-value"})
    assert len(notes) == 2
    assert any("MLFLOW_TRACKING_PASSWORD is not set" in n and "Secret mlflow-creds, key pass" in n for n in notes)
    assert any("WANDB_API_KEY is not set" in n for n in notes)
    assert not any("alice-secret-value" in n for n in notes)
    assert local_secret_notes(spec, {"MLFLOW_TRACKING_USERNAME": "a", "MLFLOW_TRACKING_PASSWORD": "b",
                                     "WANDB_API_KEY": "c"}) == []


def test_progress_poller_shows_the_run_while_training() -> None:
    status = {"phase": "Running", "progress": {"step": 1}}
    log = "\n".join([
        json.dumps({"event": "start", "rows": 10}),
        json.dumps({"event": "tracking", "mlflow": {"runId": "r1", "experimentId": "2", "url": "http://m/r1"},
                    "wandb": {"runId": "k1", "mode": "offline"}}),
        json.dumps({"event": "progress", "step": 2, "total_steps": 9, "loss": 0.5}),
    ])
    patch, events = s.progress_update(status, log, now="2026-01-01T00:00:00Z")
    assert events == [] and patch is not None
    assert patch["status"]["tracking"] == {"mlflowRunId": "r1", "mlflowExperimentId": "2",
                                           "mlflowRunUrl": "http://m/r1", "wandbRunId": "k1", "wandbMode": "offline"}
    assert patch["status"]["progress"]["step"] == 2
    # once in the status, the same line changes nothing
    again = {**status, "tracking": patch["status"]["tracking"], "progress": patch["status"]["progress"]}
    assert s.progress_update(again, log, now="2026-01-01T01:00:00Z") == (None, [])
    # a tail without it keeps what the status has
    tail = json.dumps({"event": "progress", "step": 3, "total_steps": 9, "loss": 0.4})
    patch, _ = s.progress_update(again, tail, now="2026-01-01T01:00:00Z")
    assert patch is not None and "tracking" not in patch["status"]


def test_the_tracking_secrets_are_dependencies_the_job_waits_for() -> None:
    spec = FineTuneJobSpec.model_validate(ftj()["spec"])
    deps = s.dependencies(spec)
    assert ("Secret", "mlflow-creds", "user") in deps and ("Secret", "mlflow-creds", "pass") in deps
    assert ("Secret", "wandb", "api-key") in deps
    offline = FineTuneJobSpec.model_validate(ftj(tracking={"wandb": {"project": "p", "mode": "offline"}})["spec"])
    assert not [d for d in s.dependencies(offline) if d[0] == "Secret"]
    # a missing one: Pending, DependencyMissing naming the Secret and the key, nothing created
    d = backends.reconcile(ftj(), s.Observed(missing=["Secret wandb (key api-key)"]), image="trainer:1",
                           now="2026-01-01T00:00:00Z")
    assert d.status["reason"] == "DependencyMissing" and "Secret wandb (key api-key)" in d.status["message"]
    assert d.create == []
