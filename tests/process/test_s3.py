"""s3:// data, outputs and adapters against a real S3 API server on 127.0.0.1 (moto's server mode with
authentication on: every request is checked against its SigV4 signature): the real pod programs
(`python -m tuneop.trainer`, `--validate-only`, `python -m tuneop.serving.fetch`) and tuneop.s3."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3server.s3fixture import S3Server  # noqa: E402
from trainer_harness import make_config, run_trainer  # noqa: E402
from tuneop import s3  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = S3Server.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server) -> s3.Client:
    return s3.Client(s3.Settings.from_env(server.env()))


def make_bucket(client: s3.Client, name: str) -> str:
    client.request("PUT", f"s3://{name}/")
    return name


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_s3_output(cfg: Path, uri: str) -> Path:
    """The job config with spec.output.s3 (make_config's own `output` is the local directory)."""
    doc = json.loads(cfg.read_text())
    doc["spec"]["output"]["s3"] = {"uri": uri}
    cfg.write_text(json.dumps(doc))
    return cfg


def fetch(server: S3Server, uri: str, dest: Path, *args: str, **env: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "tuneop.serving.fetch", "--url", uri, "--dest", str(dest), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **server.env(**env)})
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    return proc.returncode, lines[-1] if lines else {"stderr": proc.stderr}


def test_validate_only_reads_s3_and_names_the_uri_when_it_cannot(server, client, tiny_model, datasets, tmp_path):
    bucket = make_bucket(client, "data-v")
    client.put_file(f"s3://{bucket}/words/train.jsonl", str(datasets["pc_train"]))
    client.put_file(f"s3://{bucket}/words/test.jsonl", str(datasets["pc_test"]))
    train, test = f"s3://{bucket}/words/train.jsonl", f"s3://{bucket}/words/test.jsonl"
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, train, out, test=test,
                      dataset={"train": {"url": train}, "test": {"url": test}})
    run = run_trainer(cfg, "--validate-only", env=server.env())
    assert run.rc == 0, run.stderr[-2000:]
    assert run.termination["dataset"]["trainRows"] == 48 and run.termination["dataset"]["testRows"] == 24
    assert sorted(p.read_bytes() for p in (out / ".data").iterdir()) == sorted(
        [datasets["pc_train"].read_bytes(), datasets["pc_test"].read_bytes()])

    cases = {
        f"s3://{bucket}/words/nope.jsonl": ({}, "NoSuchKey"),
        "s3://no-such-bucket/train.jsonl": ({}, "NoSuchBucket"),
        f"s3://{bucket}/words/train.jsonl?": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "SignatureDoesNotMatch"),
        f"s3://{bucket}/words/train.jsonl": ({"AWS_ACCESS_KEY_ID": "AKIANOTKNOWN"}, "InvalidAccessKeyId"),
    }
    for i, (uri, (env, code)) in enumerate(cases.items()):
        uri = uri.rstrip("?")
        cfg = make_config(tmp_path / f"bad{i}.json", tiny_model, uri, tmp_path / f"out{i}", dataset={"train": {"url": uri}})
        run = run_trainer(cfg, "--validate-only", env=server.env(**env))
        assert run.rc == 2, run.stderr[-2000:]
        term = run.termination
        assert term["reason"] == "DatasetInvalid" and code in term["message"] and uri in term["message"], term
        assert server.secret_access_key not in run.stdout + run.stderr
        assert [p.name for p in (tmp_path / f"out{i}" / ".data").iterdir()] == []  # no partial file

    # no server answering: the same report, but exit 1 (the Job retries it; a wrong bucket or key it does not)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cfg = make_config(tmp_path / "down.json", tiny_model, train, tmp_path / "down", dataset={"train": {"url": train}})
    run = run_trainer(cfg, "--validate-only", env=server.env(AWS_ENDPOINT_URL_S3=closed))
    assert run.rc == 1 and run.termination["reason"] == "DatasetInvalid", run.stderr[-2000:]
    assert "Unreachable" in run.termination["message"] and train in run.termination["message"]


def test_training_uploads_the_adapter_manifest_last_and_fetch_verifies_it(server, client, tiny_model, datasets,
                                                                          tmp_path):
    data, adapters = make_bucket(client, "data-t"), make_bucket(client, "adapters")
    train = f"s3://{data}/train.jsonl"
    client.put_file(train, str(datasets["pc_train"]))
    prefix = f"s3://{adapters}/team-a/words"
    out = tmp_path / "out"
    spec = {"dataset": {"train": {"url": train}}, "hyperparameters": {"maxSteps": 4}}
    cfg = with_s3_output(make_config(tmp_path / "job.json", tiny_model, train, out, **spec), prefix)
    run = run_trainer(cfg, env=server.env())
    assert run.rc == 0, run.stderr[-3000:]
    adapter = run.termination["adapter"]
    assert adapter["uri"] == prefix
    local = out / "adapter"
    manifest = json.loads((local / s3.MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256(client.get_bytes(f"{prefix}/{name}")).hexdigest() == digest
    assert client.get_bytes(f"{prefix}/{s3.MANIFEST}") == (local / s3.MANIFEST).read_bytes()

    # the AdapterDeployment's init container: every file checked against the manifest, then placed
    dest = tmp_path / "adapters" / "words"
    rc, msg = fetch(server, prefix, dest, "--sha256", adapter["sha256"])
    assert rc == 0, msg
    assert msg["adapter"]["sha256"] == adapter["sha256"]
    assert {p.name: sha(p) for p in dest.iterdir() if p.name != s3.MANIFEST} == manifest["files"]

    # a wrong --sha256: refused, and what was placed before stays as it was
    before = {p.name: sha(p) for p in dest.iterdir()}
    rc, msg = fetch(server, prefix, dest, "--sha256", "0" * 64)
    assert rc == 2 and msg["reason"] == "AdapterRefused" and "ChecksumMismatch" in msg["message"], msg
    assert {p.name: sha(p) for p in dest.iterdir()} == before
    assert [p.name for p in dest.parent.iterdir()] == ["words"]  # no staging directory left

    # a file changed after the upload: refused naming it, nothing placed
    weights = "adapter_model.safetensors"
    client.put_bytes(f"{prefix}/{weights}", b"not the weights")
    other = tmp_path / "other" / "words"
    rc, msg = fetch(server, prefix, other)
    assert rc == 2 and "ChecksumMismatch" in msg["message"] and f"{prefix}/{weights}" in msg["message"], msg
    assert not other.exists() and list(other.parent.iterdir()) == []

    # the same spec again: the adapter on the volume is reused and uploaded again (manifest last)
    run = run_trainer(cfg, env=server.env())
    assert run.rc == 0 and run.termination.get("reused") is True, run.stderr[-2000:]
    rc, msg = fetch(server, prefix, other)
    assert rc == 0, msg

    # ... to a bucket that does not exist: a user error naming the URI, no manifest anywhere
    missing = "s3://no-such-bucket/words"
    cfg2 = with_s3_output(make_config(tmp_path / "job2.json", tiny_model, train, out, **spec), missing)
    run = run_trainer(cfg2, env=server.env())
    assert run.rc == 2, run.stderr[-2000:]
    term = run.termination
    assert term["reason"] == "OutputUploadFailed" and missing in term["message"] and "NoSuchBucket" in term["message"]
    assert "not there" in term["message"]

    # bad credentials: refused the same way, the secret in no output
    run = run_trainer(cfg, env=server.env(AWS_SECRET_ACCESS_KEY="wrong-secret"))
    assert run.rc == 2 and run.termination["reason"] == "OutputUploadFailed"
    assert "SignatureDoesNotMatch" in run.termination["message"]
    assert "wrong-secret" not in run.stdout + run.stderr and server.secret_access_key not in run.stdout + run.stderr


class FailingClient(s3.Client):
    """The real client, whose connection drops before the n-th PUT of a file (an upload cut short)."""

    def __init__(self, settings: s3.Settings, fail_at: int):
        super().__init__(settings)
        self.fail_at, self.puts = fail_at, 0

    def put_file(self, uri: str, path: str, sha256=None) -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            raise s3.S3Error(uri, "Unreachable", "connection reset")
        super().put_file(uri, path, sha256)


def write_adapter(d: Path, weights: bytes) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (d / "adapter_model.safetensors").write_bytes(weights)
    (d / "tokenizer.json").write_text("{}")
    files = {p.name: sha(p) for p in d.iterdir()}
    (d / s3.MANIFEST).write_text(json.dumps({"files": files}))
    return d


def test_an_upload_cut_short_leaves_no_manifest_and_is_refused(server, client, tmp_path):
    bucket = make_bucket(client, "partial")
    prefix = f"s3://{bucket}/a"
    old = write_adapter(tmp_path / "old", b"old weights")
    s3.upload_adapter(client, str(old), prefix)
    assert client.get_bytes(f"{prefix}/{s3.MANIFEST}") == (old / s3.MANIFEST).read_bytes()

    new = write_adapter(tmp_path / "new", b"new weights")
    cut = FailingClient(client.settings, fail_at=2)
    with pytest.raises(s3.S3Error):
        s3.upload_adapter(cut, str(new), prefix)
    # the old manifest went first: neither the old adapter nor a mix of old and new files looks complete
    with pytest.raises(s3.S3Error) as e:
        client.head(f"{prefix}/{s3.MANIFEST}")
    assert e.value.code in ("NotFound", "NoSuchKey")
    dest = tmp_path / "serve" / "a"
    rc, msg = fetch(server, prefix, dest)
    assert rc == 2 and msg["reason"] == "AdapterRefused", msg
    assert "Incomplete" in msg["message"] and prefix in msg["message"] and "did not finish" in msg["message"]
    assert not dest.exists() and list(dest.parent.iterdir()) == []

    # finished by a retry: served
    s3.upload_adapter(client, str(new), prefix)
    rc, msg = fetch(server, prefix, dest)
    assert rc == 0 and (dest / "adapter_model.safetensors").read_bytes() == b"new weights", msg


def test_fetch_refuses_a_missing_bucket_a_missing_key_and_bad_credentials(server, client, tmp_path):
    bucket = make_bucket(client, "serve")
    src = write_adapter(tmp_path / "src", b"weights")
    s3.upload_adapter(client, str(src), f"s3://{bucket}/ok")
    cases = [
        ("s3://no-such-bucket/x", {}, "NoSuchBucket"),
        (f"s3://{bucket}/missing", {}, "Incomplete"),  # no manifest under that prefix
        (f"s3://{bucket}/ok/adapter.tar.gz", {}, "NoSuchKey"),  # an archive key that is not there
        (f"s3://{bucket}/ok", {"AWS_SECRET_ACCESS_KEY": "nope"}, "SignatureDoesNotMatch"),
        (f"s3://{bucket}/ok", {"AWS_ACCESS_KEY_ID": "AKIANOTKNOWN"}, "InvalidAccessKeyId"),
    ]
    for i, (uri, env, code) in enumerate(cases):
        dest = tmp_path / f"d{i}" / "a"
        rc, msg = fetch(server, uri, dest, **env)
        assert rc == 2 and msg["reason"] == "AdapterRefused", (uri, msg)
        assert code in msg["message"] and uri in msg["message"], (uri, msg)
        assert not dest.exists() and list(dest.parent.iterdir()) == [], uri
    rc, msg = fetch(server, f"s3://{bucket}/ok", tmp_path / "good" / "a")
    assert rc == 0 and msg["adapter"]["sha256"] == hashlib.sha256(b"weights").hexdigest(), msg

    # an archive key is downloaded and extracted like an https archive, its manifest checked
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="adapter")
    client.put_file(f"s3://{bucket}/archives/adapter.tar.gz", str(archive))
    rc, msg = fetch(server, f"s3://{bucket}/archives/adapter.tar.gz", tmp_path / "arch" / "a")
    assert rc == 0 and msg["adapter"]["sha256"] == hashlib.sha256(b"weights").hexdigest(), msg
    assert (tmp_path / "arch" / "a" / "adapter_model.safetensors").read_bytes() == b"weights"


def test_large_files_go_up_in_parts(server, client, tmp_path, monkeypatch):
    bucket = make_bucket(client, "big")
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 6 << 20)
    monkeypatch.setattr(s3, "PART_SIZE", 5 << 20)  # S3's smallest part
    data = os.urandom(11 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    client.put_file(f"s3://{bucket}/big.bin", str(path))
    assert client.head(f"s3://{bucket}/big.bin")["etag"].strip('"').endswith("-3")  # three parts
    client.get_file(f"s3://{bucket}/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data


def test_tuneop_run_reads_an_s3_dataset_and_writes_an_s3_output(server, client, tiny_model, datasets, tmp_path):
    """`tuneop run`: spec.storage.s3's endpoint from the YAML, the key pair from the shell's AWS_* env."""
    bucket = make_bucket(client, "local-run")
    client.put_file(f"s3://{bucket}/train.jsonl", str(datasets["pc_train"]))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "cli-s3"},
        "spec": {
            "baseModel": str(tiny_model),
            "dataset": {"train": {"url": f"s3://{bucket}/train.jsonl"}},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "hyperparameters": {"maxSteps": 3, "batchSize": 8, "maxSeqLength": 64},
            "output": {"pvc": {"claimName": "out", "path": "job"}, "s3": {"uri": f"s3://{bucket}/adapters/cli"}},
            "storage": {"s3": {"endpoint": server.endpoint, "credentialsSecretRef": {"name": "unused-locally"}}},
        },
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", TUNEOP_PROGRESS="0", TUNEOP_HOME=str(tmp_path / "home"),
               AWS_ACCESS_KEY_ID=server.access_key_id, AWS_SECRET_ACCESS_KEY=server.secret_access_key)
    proc = subprocess.run([sys.executable, "-m", "tuneop.cli", "run", str(job), "--volume", f"out={tmp_path / 'out'}"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"uploaded to: s3://{bucket}/adapters/cli" in proc.stdout + proc.stderr
    local = tmp_path / "out" / "job" / "adapter" / s3.MANIFEST
    assert client.get_bytes(f"s3://{bucket}/adapters/cli/{s3.MANIFEST}") == local.read_bytes()


def test_a_download_cut_short_is_retried_from_the_start(tmp_path):
    """A server that drops the connection half-way through the first answer: the client retries and the
    file holds the object once, complete (never the first half twice)."""
    import http.server
    import threading

    payload = os.urandom(300_000)
    calls: list[int] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            calls.append(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload if len(calls) > 1 else payload[:100_000])
            if len(calls) == 1:
                self.close_connection = True

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = s3.Client(s3.Settings(endpoint=f"http://127.0.0.1:{srv.server_address[1]}"))
        n = c.get_file("s3://bucket/object.bin", str(tmp_path / "object.bin"))
    finally:
        srv.shutdown()
    assert len(calls) == 2 and n == len(payload)
    assert (tmp_path / "object.bin").read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["object.bin"]
