"""spec.tracking for real: a real MLflow tracking server on loopback (the `mlflow` package, sqlite
store, served artifacts, its basic-auth app: every request needs the user's password) and W&B in offline mode, with a tiny training run through the trainer
command exactly as the pod runs it. The run is read back with MlflowClient and from W&B's offline
run directory; a distinctive fake credential passed as the pod would get it (environment from a
Secret) appears nowhere it must not."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from trainer_harness import make_config, run_trainer, trainer_env

pytestmark = pytest.mark.slow

USER = "tuneop-trainer"
FAKE_PASSWORD = "tuneop-fake-mlflow-password-7f3c9a1e5d"
FAKE_WANDB_KEY = "tuneop-fake-wandb-key-0123456789abcdef0123"
SECRETS = (FAKE_PASSWORD, FAKE_WANDB_KEY)
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": FAKE_PASSWORD}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` on 127.0.0.1 (a free port), sqlite backend, artifacts served
    from a tmp dir; its admin user (USER, FAKE_PASSWORD) is the only one, nothing is readable without it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root}/auth.db\nadmin_username = {USER}\nadmin_password = {FAKE_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    log = open(root / "server.log", "w")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": hashlib.sha256(str(root).encode()).hexdigest()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(root), start_new_session=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # until /health answers (bounded), or the server exits
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                proc_wait(proc, 0.5)
        else:
            raise AssertionError("mlflow server did not answer /health")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def proc_wait(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a W&B run file (what `wandb sync` would upload): a 7-byte header (":W&B", magic,
    version), then LevelDB-log framing: 32 KiB blocks of chunks, each with a 7-byte header (crc32c,
    length, type: 1 full, 2 first, 3 middle, 4 last) holding a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending + chunk)
            out.append(rec)
            pending = b""
        else:
            pending = chunk if kind == 2 else pending + chunk
    return out


def item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def client_credentials(monkeypatch) -> None:
    """The test's own MlflowClient logs in like the trainer: from the environment."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def test_mlflow_and_wandb_offline_get_the_run_and_no_secret_leaks(mlflow_server, client_credentials, tiny_model,
                                                                  datasets, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    tracking = {
        "mlflow": {"trackingUri": mlflow_server, "experiment": "tuneop-process-test", "runName": "tiny-run",
                   "credentialsSecretRef": {"name": "mlflow-creds", "usernameKey": "u", "passwordKey": "p"}},
        "wandb": {"project": "tuneop-test", "mode": "offline", "apiKeySecretRef": {"name": "wandb", "key": "key"}},
    }
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                      hyperparameters={"maxSteps": 12}, evaluation={"maxSamples": 8, "maxNewTokens": 4},
                      tracking=tracking)
    home = tmp_path / "home"
    # the credentials as the pod gets them (env from secretKeyRef); W&B's own dirs kept in tmp
    env = {**CREDENTIALS, "WANDB_API_KEY": FAKE_WANDB_KEY, "HOME": str(home),
           "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
           "WANDB_DATA_DIR": str(home / "wandb-data")}
    run = run_trainer(cfg, env=env, timeout=600)
    assert run.rc == 0, run.stderr[-4000:]
    done = run.termination
    assert done is not None and done == run.one("done")
    announced = run.one("tracking")
    assert announced == {"event": "tracking", **done["tracking"]}
    manifest_path = out / "adapter" / "tuneop-manifest.json"
    adapter_sha = done["adapter"]["sha256"]
    assert adapter_sha == sha256(out / "adapter" / "adapter_model.safetensors")

    # ---- MLflow: read the run back from the server
    run_id = done["tracking"]["mlflow"]["runId"]
    client = MlflowClient(mlflow_server)
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED"
    assert mrun.info.run_name == "tiny-run"
    experiment = client.get_experiment(mrun.info.experiment_id)
    assert experiment.name == "tuneop-process-test"
    assert done["tracking"]["mlflow"]["url"] == f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
    params = mrun.data.params
    assert params["tuneop.baseModel"] == str(tiny_model)
    assert params["tuneop.hyperparameters.maxSteps"] == "12"
    assert params["learning_rate"] == str(5e-3)  # transformers' own reporting: the training arguments
    assert not [k for k in params if "SecretRef" in k]
    losses = client.get_metric_history(run_id, "loss")
    assert len(losses) > 1
    assert [m.step for m in losses] == sorted(m.step for m in losses)
    progress_losses = [e["loss"] for e in run.of("progress") if e.get("loss") is not None]
    assert sorted(m.value for m in losses) == pytest.approx(sorted(progress_losses))
    metrics = mrun.data.metrics
    evaluation = done["evaluation"]
    assert metrics["test_base_exact_match"] == pytest.approx(evaluation["base"])
    assert metrics["test_adapter_exact_match"] == pytest.approx(evaluation["adapter"])
    assert metrics["test_samples"] == 8
    assert metrics["final_steps"] == 12
    tags = mrun.data.tags
    manifest = json.loads(manifest_path.read_text())
    assert tags["tuneop.adapter.sha256"] == adapter_sha == manifest["files"]["adapter_model.safetensors"]
    assert tags["tuneop.adapter.manifestSha256"] == sha256(manifest_path)
    assert tags["tuneop.trainingFingerprint"] == manifest["trainingFingerprint"]
    artifacts = [a.path for a in client.list_artifacts(run_id, "adapter")]
    assert artifacts == ["adapter/tuneop-manifest.json"]
    fetched = Path(client.download_artifacts(run_id, "adapter/tuneop-manifest.json", str(tmp_path / "dl")))
    assert sha256(fetched) == sha256(manifest_path)

    # ---- W&B offline: the run directory holds the history and the summary
    assert done["tracking"]["wandb"]["mode"] == "offline" and "url" not in done["tracking"]["wandb"]
    wandb_id = done["tracking"]["wandb"]["runId"]
    run_dirs = list((out / "tracking" / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(run_dirs) == 1, list((out / "tracking").rglob("*"))
    records = wandb_records(run_dirs[0] / f"run-{wandb_id}.wandb")
    history_losses = [json.loads(item.value_json) for rec in records if rec.HasField("history")
                      for item in rec.history.item if item_key(item) == "train/loss"]
    assert len(history_losses) > 1
    assert sorted(history_losses) == pytest.approx(sorted(progress_losses))
    summary = {item_key(item): json.loads(item.value_json) for rec in records if rec.HasField("summary")
               for item in rec.summary.update}
    assert summary["tuneop.adapter.sha256"] == adapter_sha
    assert summary["test_adapter_exact_match"] == pytest.approx(evaluation["adapter"])
    assert summary["test_base_exact_match"] == pytest.approx(evaluation["base"])
    assert any(rec.HasField("exit") and rec.exit.exit_code == 0 for rec in records)  # finished

    # ---- status.tracking as the operator writes it from the termination message
    from tuneop.finetunejob import reconcile as s

    status = s.tracking_status(done)
    assert status["mlflowRunId"] == run_id and status["wandbRunId"] == wandb_id and status["wandbMode"] == "offline"

    # ---- no secret anywhere: the trainer's output, the job config, the results, the tracked run
    searched: dict[str, str] = {
        "stdout": run.stdout, "stderr": run.stderr, "job config": cfg.read_text(),
        "termination": json.dumps(done), "status": json.dumps(status),
        "mlflow params/tags": json.dumps([mrun.data.params, mrun.data.tags]),
    }
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            searched[str(path)] = path.read_bytes().decode("utf-8", "replace")
    for where, text in searched.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret is in {where}"


def test_a_resumed_pod_continues_the_same_runs(mlflow_server, client_credentials, tiny_model, datasets, tmp_path):
    """SIGTERM mid-training (the pod is evicted): the MLflow run ends KILLED; the next pod resumes from the
    checkpoint and continues that very run (same id, transformers' parameters logged again without a
    conflict), which ends FINISHED with the loss curve of both pods; W&B keeps the same run id."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    tracking = {"mlflow": {"trackingUri": mlflow_server, "experiment": "tuneop-resume-test"},
                "wandb": {"project": "tuneop-test", "mode": "offline"}}
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out,
                      hyperparameters={"maxSteps": 24, "batchSize": 4}, tracking=tracking)
    home = tmp_path / "home"
    extra = {**CREDENTIALS, "HOME": str(home), "WANDB_CONFIG_DIR": str(home / "wandb-config"),
             "WANDB_CACHE_DIR": str(home / "wandb-cache"), "WANDB_DATA_DIR": str(home / "wandb-data")}
    proc = subprocess.Popen([sys.executable, "-m", "tuneop.trainer", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=trainer_env(cfg.with_suffix(".termination"), **extra), start_new_session=True)
    events = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and events[-1]["step"] >= 4:
                proc.send_signal(signal.SIGTERM)
                break
        rest, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    events += [json.loads(x) for x in rest.splitlines() if x.strip()]
    assert proc.returncode == 143, stderr[-3000:]
    first = next(e for e in events if e["event"] == "tracking")
    stopped = events[-1]["step"]
    run_id = first["mlflow"]["runId"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "KILLED"

    run = run_trainer(cfg, env=extra, timeout=600)
    assert run.rc == 0, run.stderr[-4000:]
    assert run.one("start")["resumed_from"]
    assert run.termination["tracking"]["mlflow"]["runId"] == run_id
    assert run.termination["tracking"]["wandb"]["runId"] == first["wandb"]["runId"]
    mrun = client.get_run(run_id)
    assert mrun.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert min(steps) <= stopped < max(steps) and max(steps) == 24
    assert len(client.search_runs([mrun.info.experiment_id])) == 1


def test_tuneop_run_tracks_into_mlflow_with_credentials_from_the_environment(mlflow_server, client_credentials,
                                                                           tiny_model, datasets, tmp_path):
    """`tuneop run` has no Secrets: the password comes from MLFLOW_TRACKING_PASSWORD in the environment;
    the run is announced; the password is printed nowhere, nor written into the job config it writes."""
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "cli-tracked"},
        "spec": {
            "baseModel": str(tiny_model),
            "dataset": {"train": {"pvc": {"claimName": "data", "path": datasets["pc_train"].name}}},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "maxSeqLength": 64},
            "output": {"pvc": {"claimName": "out", "path": "job"}},
            "tracking": {"mlflow": {"trackingUri": mlflow_server, "experiment": "tuneop-cli",
                                    "credentialsSecretRef": {"name": "mlflow", "usernameKey": "u",
                                                             "passwordKey": "p"}},
                         "wandb": {"project": "p", "apiKeySecretRef": {"name": "wandb", "key": "k"}, "mode": "offline"}},
        },
    }))
    home = tmp_path / "home"
    env = trainer_env(tmp_path / "unused", TUNEOP_HOME=str(home), **CREDENTIALS, HOME=str(home),
                      WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(home / "wandb-cache"),
                      WANDB_DATA_DIR=str(home / "wandb-data"))
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tuneop.cli", "run", str(job), "--volume", f"data={datasets['pc_train'].parent}",
         "--volume", f"out={tmp_path / 'out'}"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spec.tracking: WANDB_API_KEY is not set" in proc.stderr
    assert "MLFLOW_TRACKING_PASSWORD is not set" not in proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("tuneop-cli").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "cli-tracked"
    assert f"tuneop: MLflow run {runs[0].info.run_id}: {mlflow_server}/#/experiments/" in proc.stderr
    assert "W&B run " in proc.stderr and "offline" in proc.stderr
    written = (home / "runs" / "cli-tracked" / "job.json").read_text()
    for text in (proc.stdout, proc.stderr, written):
        assert FAKE_PASSWORD not in text


def test_a_wrong_password_fails_the_run_before_training_and_is_echoed_nowhere(mlflow_server, tiny_model, datasets,
                                                                             tmp_path):
    """The server refuses the credentials: the trainer stops before training with a TrainingError (exit 1:
    the Job retries, e.g. after the Secret is fixed) that does not carry the password it sent."""
    wrong = "tuneop-wrong-password-5c2e8b"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], tmp_path / "out",
                      hyperparameters={"maxSteps": 4},
                      tracking={"mlflow": {"trackingUri": mlflow_server, "experiment": "tuneop-refused"}})
    run = run_trainer(cfg, env={"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": wrong}, timeout=300)
    assert run.rc == 1, run.stderr[-3000:]
    error = run.one("error")
    assert error == run.termination and error["reason"] == "TrainingError"
    assert error["message"].startswith("spec.tracking.mlflow: cannot open the run: ") and "401" in error["message"]
    assert not run.of("progress") and not (tmp_path / "out" / "adapter").exists()
    for text in (run.stdout, run.stderr, json.dumps(run.termination)):
        assert wrong not in text and FAKE_PASSWORD not in text


def test_torchrun_two_ranks_track_one_run(mlflow_server, client_credentials, tiny_model, datasets, tmp_path):
    """Under DDP (gloo, 2 ranks) rank 0 alone opens the runs; one MLflow run, one W&B run, one announcement."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    tracking = {"mlflow": {"trackingUri": mlflow_server, "experiment": "tuneop-ddp"},
                "wandb": {"project": "tuneop-test", "mode": "offline"}}
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out,
                      hyperparameters={"maxSteps": 8, "batchSize": 4}, tracking=tracking)
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "tuneop.trainer"]
    run = run_trainer(cfg, cmd=cmd, timeout=600,
                      env={**CREDENTIALS, "CUDA_VISIBLE_DEVICES": "", "HOME": str(home),
                           "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
                           "WANDB_DATA_DIR": str(home / "wandb-data")})
    assert run.rc == 0, run.stderr[-4000:]
    assert run.one("start")["worldSize"] == 2 and len(run.of("tracking")) == 1
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("tuneop-ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run.termination["tracking"]["mlflow"]["runId"]
    assert runs[0].info.status == "FINISHED" and len(client.get_metric_history(runs[0].info.run_id, "loss")) > 1
    assert len(list((out / "tracking" / "wandb").glob("offline-run-*"))) == 1
