"""backend: together driven through the real ``together`` SDK (3.1.1) against the local fake server
(tests/fake_together/server.py): upload, create, monitor, events, cancel, download, extract, layout;
faults (429, 500, dropped connections, truncated downloads, user_error jobs, bad archives); and the
API key staying out of every message. ``python -m tuneop.backends.together.pod`` runs as a real subprocess."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fake_together.adapter import build_peft_adapter, dir_entries, link, make_tar  # noqa: E402
from fake_together.server import FakeTogether  # noqa: E402
from tuneop.api.finetunejob import parse_spec  # noqa: E402
from tuneop.archive import adapter_summary, find_adapter_dir, safe_extract, write_adapter_layout
from tuneop.backends.together import client as T  # noqa: E402
from tuneop.jobconfig import resolve  # noqa: E402
from tuneop.metrics import TogetherRequestMetrics  # noqa: E402

KEY = "tk-SECRET-0123456789abcdef"
FAST = {"retry-after-ms": "20"}  # keep SDK retries quick

MESSAGES = [
    {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
    for i in range(12)
]
PREFS = [
    {"prompt": f"say {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)
]


def spec_dict(**over):
    d = {
        "backend": "together",
        "baseModel": "Qwen/Qwen2.5-7B-Instruct",
        "dataset": {"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}},
        "output": {"pvc": {"claimName": "adapters", "path": "news"}},
        "hyperparameters": {"epochs": 2, "batchSize": 16, "learningRate": 1e-4, "maxSeqLength": 2048},
        "together": {"apiKeySecretRef": {"name": "together", "key": "api-key"}},
    }
    d.update(over)
    return d


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter (tiny random Llama), saved with save_pretrained."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return Path(build_peft_adapter(str(tmp_path_factory.mktemp("peft") / "adapter")))


@pytest.fixture
def archive_gz(peft_dir) -> bytes:
    # Together nests the files in a directory of the archive
    return make_tar(dir_entries(str(peft_dir), prefix="ft-output/adapter/"), "gz")


@pytest.fixture
def fake():
    with FakeTogether(api_key=KEY) as f:
        yield f


@pytest.fixture
def metrics():
    return TogetherRequestMetrics()


@pytest.fixture
def client(fake, metrics):
    c = T.TogetherClient(KEY, fake.url, on_request=metrics.record, sleep=lambda s: None)
    yield c
    c.close()


def upload_train(client, tmp_path) -> str:
    return client.upload_file(str(write_jsonl(tmp_path / "train.jsonl", MESSAGES)))["id"]


def create(client, spec, training_file, validation_file=None, suffix=None):
    params = T.create_params(spec, training_file=training_file, validation_file=validation_file,
                             suffix=suffix or T.unique_suffix("team-a", "news", "uid-1", 1))
    return client.create_or_adopt(params)


def run_to_terminal(client, ft_id, limit=20):
    cursor, mirrored, views = 0, [], []
    for _ in range(limit):
        job = client.retrieve(ft_id)
        new, cursor = client.list_events(ft_id, cursor)
        mirrored += [T.event_to_k8s(e) for e in new]
        views.append(T.status_view(job))
        if views[-1]["terminal"]:
            return views, mirrored
    raise AssertionError(f"job did not finish: {views[-1]}")


def assert_no_key(*texts):
    for t in texts:
        assert KEY not in str(t)


# ------------------------------------------------------------------------------- happy path


def test_full_flow_upload_create_monitor_download(fake, client, metrics, tmp_path, archive_gz):
    fake.archive = archive_gz
    spec = parse_spec(spec_dict(adapter={"r": 8, "alpha": 16, "dropout": 0.05,
                                         "targetModules": ["q_proj", "v_proj"]},
                                together={"apiKeySecretRef": {"name": "t", "key": "k"}, "nCheckpoints": 2}))
    tf = upload_train(client, tmp_path)
    vf = client.upload_file(str(write_jsonl(tmp_path / "val.jsonl", MESSAGES[:3])))["id"]
    assert fake.files[tf]["validation_report"]["valid"] is True
    job, adopted = create(client, spec, tf, vf)
    assert not adopted and job["id"].startswith("ft-")

    # the wire body of POST /v1/fine-tunes is our mapping
    body = fake.create_bodies[-1]
    assert body["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert (body["training_file"], body["validation_file"]) == (tf, vf)
    assert (body["n_epochs"], body["batch_size"], body["learning_rate"]) == (2, 16, 1e-4)
    assert body["max_seq_length"] == 2048 and body["packing"] is False and body["random_seed"] == 42
    assert body["lr_scheduler"] == {"lr_scheduler_type": "cosine",
                                    "lr_scheduler_args": {"min_lr_ratio": 0.0, "num_cycles": 0.5}}
    assert body["warmup_ratio"] == 0.03 and body["weight_decay"] == 0.0
    assert body["training_type"] == {"type": "Lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                                     "lora_trainable_modules": "q_proj,v_proj"}
    assert body["training_method"] == {"method": "sft", "train_on_inputs": False}
    assert (body["n_checkpoints"], body["n_evals"]) == (2, 1)
    assert body["suffix"] == T.unique_suffix("team-a", "news", "uid-1", 1)
    # one create POST, no retry client-side
    assert len(fake.calls("POST", r"^/v1/fine-tunes$")) == 1

    views, events = run_to_terminal(client, job["id"])
    phases = [v["phase"] for v in views]
    assert phases[0] == "Pending" and "Running" in phases
    running = [v for v in views if v["togetherStatus"] == "running"]
    assert running[0]["progress"]["totalSteps"] == 30 and running[0]["progress"]["etaSeconds"] > 0
    final = views[-1]
    assert final["download"] and final["reason"] == "Downloading"
    assert final["costUSD"] == pytest.approx(1.23456789)
    assert final["tokenCount"] == 30_000 and f"-{body['suffix']}-" in final["modelOutputName"]
    assert T.find_existing(client.list_jobs(), body["suffix"])["id"] == job["id"]
    checkpoints = client._sdk.fine_tuning.list_checkpoints(job["id"]).to_dict()["data"]
    assert [c["step"] for c in checkpoints] == [15, 30]
    reasons = [r for _, r, _ in events]
    assert reasons[0] == "JobPending" and "CheckpointSave" in reasons and reasons[-1] == "JobComplete"
    assert len(reasons) == len(set((r, m) for _, r, m in events))  # each event mirrored once

    archive = tmp_path / "dl" / "archive"
    archive.parent.mkdir()
    size = client.download(job["id"], str(archive), checkpoint="adapter")
    assert size == len(archive_gz) and archive.read_bytes() == archive_gz
    dl = fake.calls("GET", r"^/v1/finetune/download$")[-1]
    assert dl.query == {"ft_id": job["id"], "checkpoint": "adapter"}
    assert dl.headers["Accept"] == "application/octet-stream"

    extracted = tmp_path / "dl" / "x"
    safe_extract(str(archive), str(extracted))
    src = find_adapter_dir(str(extracted))
    out = tmp_path / "out"
    manifest = write_adapter_layout(src, str(out), base_model=spec.base_model, method="sft", adapter_type="lora",
                                    extra={"together": {"jobId": job["id"]}})
    adir = out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert manifest["files"][name] == hashlib.sha256((peft_dir_file(src, name))).hexdigest()
        assert (adir / name).read_bytes() == Path(src, name).read_bytes()
    summary = adapter_summary(str(adir))
    assert summary["sha256"] == hashlib.sha256((adir / "adapter_model.safetensors").read_bytes()).hexdigest()

    from peft import PeftConfig
    from safetensors import safe_open

    cfg = PeftConfig.from_pretrained(str(adir))
    assert cfg.r == 4 and set(cfg.target_modules) == {"q_proj", "v_proj"}
    with safe_open(str(adir / "adapter_model.safetensors"), "np") as f:
        assert any("lora_A" in k for k in f.keys())

    # metrics: every request counted; auth only on API paths, never sent to the upload URL
    assert metrics.value("PUT", "200") == 2 and metrics.value("POST", "302") == 2
    assert metrics.value("GET", "200") >= 10
    for r in fake.requests:
        if r.path.startswith("/upload/"):
            assert "Authorization" not in r.headers
        else:
            assert r.headers.get("Authorization") == f"Bearer {KEY}"
        assert KEY.encode() not in r.body


def peft_dir_file(src, name) -> bytes:
    return Path(src, name).read_bytes()


def test_wire_body_dpo_full_constant(fake, client, tmp_path):
    spec = parse_spec(spec_dict(method="dpo", adapter={"type": "full"},
                                hyperparameters={"epochs": 1, "batchSize": 8, "dpoBeta": 0.25,
                                                 "lrScheduler": "constant", "maxSeqLength": 1024}))
    tf = client.upload_file(str(write_jsonl(tmp_path / "p.jsonl", [
        {"input": {"messages": [{"role": "user", "content": "hi"}]},
         "preferred_output": [{"role": "assistant", "content": "a"}],
         "non_preferred_output": [{"role": "assistant", "content": "b"}]}])))["id"]
    create(client, spec, tf)
    body = fake.create_bodies[-1]
    assert body["training_type"] == {"type": "Full"}
    assert body["training_method"]["method"] == "dpo" and body["training_method"]["dpo_beta"] == 0.25
    assert "train_on_inputs" not in body["training_method"]
    assert body["lr_scheduler"]["lr_scheduler_type"] == "linear"
    assert body["lr_scheduler"]["lr_scheduler_args"]["min_lr_ratio"] == 1.0


def test_limits_checked_before_create(fake, client, tmp_path):
    spec = parse_spec(spec_dict(hyperparameters={"batchSize": 2}))
    tf = upload_train(client, tmp_path)
    with pytest.raises(T.TogetherUserError) as e:
        create(client, spec, tf)
    assert e.value.reason == "TogetherLimits" and "hyperparameters.batchSize" in e.value.message
    assert fake.calls("POST", r"^/v1/fine-tunes$") == [] and fake.jobs == {}


# ------------------------------------------------------------------------------------ faults


def test_retrieve_and_list_survive_429_and_500(fake, client, metrics, tmp_path):
    tf = upload_train(client, tmp_path)
    job, _ = create(client, parse_spec(spec_dict()), tf)
    fake.fault("GET", r"^/v1/fine-tunes/ft-[^/]+$", status=429, headers={"retry-after": "0.02", **FAST})
    fake.fault("GET", r"^/v1/fine-tunes/ft-[^/]+$", status=500, headers=FAST)
    assert client.retrieve(job["id"])["id"] == job["id"]
    fake.fault("GET", r"^/v1/fine-tunes$", status=503, headers=FAST, times=2)
    assert [j["id"] for j in client.list_jobs()] == [job["id"]]
    fake.fault("GET", r"/events$", status=429, headers=FAST)
    assert client.list_events(job["id"])[1] >= 1
    assert metrics.value("GET", "429") == 2
    assert metrics.value("GET", "500") == 1 and metrics.value("GET", "503") == 2


def test_retrieve_gives_up_with_a_transient_error(fake, client, tmp_path):
    fake.fault("GET", r"^/v1/fine-tunes/ft-x$", status=429, headers=FAST, times=10)
    with pytest.raises(T.TogetherTransientError) as e:
        client.retrieve("ft-x")
    assert e.value.reason == "TogetherRateLimited" and e.value.status_code == 429
    assert len(fake.calls("GET", r"^/v1/fine-tunes/ft-x$")) == 3  # the SDK's own 2 retries


def test_create_dropped_after_server_created_adopts_the_job(fake, client, tmp_path):
    tf = upload_train(client, tmp_path)
    fake.fault("POST", r"^/v1/fine-tunes$", drop_after=True)
    job, adopted = create(client, parse_spec(spec_dict()), tf)
    assert adopted
    assert len(fake.jobs) == 1 and job["id"] in fake.jobs
    assert len(fake.calls("POST", r"^/v1/fine-tunes$")) == 1  # never re-sent
    # a later reconcile (or an operator restart) finds it again instead of creating
    again, adopted2 = create(client, parse_spec(spec_dict()), tf)
    assert adopted2 and again["id"] == job["id"] and len(fake.jobs) == 1


def test_create_500_does_not_make_a_second_job(fake, client, tmp_path):
    tf = upload_train(client, tmp_path)
    fake.fault("POST", r"^/v1/fine-tunes$", status=500, headers=FAST)
    with pytest.raises(T.TogetherTransientError) as e:
        create(client, parse_spec(spec_dict()), tf)
    assert e.value.status_code == 500
    assert fake.jobs == {} and len(fake.calls("POST", r"^/v1/fine-tunes$")) == 1
    job, adopted = create(client, parse_spec(spec_dict()), tf)  # the handler's retry
    assert not adopted and len(fake.jobs) == 1


def test_create_dropped_before_the_server_saw_it(fake, client, tmp_path):
    tf = upload_train(client, tmp_path)
    fake.fault("POST", r"^/v1/fine-tunes$", drop=True)
    with pytest.raises(T.TogetherTransientError) as e:
        create(client, parse_spec(spec_dict()), tf)
    assert e.value.reason == "TogetherUnavailable" and fake.jobs == {}
    assert len(fake.calls("POST", r"^/v1/fine-tunes$")) == 1
    create(client, parse_spec(spec_dict()), tf)
    assert len(fake.jobs) == 1


def test_create_timeout_then_adopt(fake, metrics, tmp_path):
    """The create POST times out while Together is still creating the job: the first attempt
    reports a transient error (nothing listed yet), the handler's next attempt adopts the job."""
    import time

    slow = T.TogetherClient(KEY, fake.url, timeout=0.5, on_request=metrics.record)
    tf = upload_train(slow, tmp_path)
    fake.fault("POST", r"^/v1/fine-tunes$", delay=1.0)
    with pytest.raises(T.TogetherTransientError) as e:
        create(slow, parse_spec(spec_dict()), tf)
    assert "timed out" in e.value.message
    assert metrics.value("POST", "error") == 1
    deadline = time.monotonic() + 10
    while not fake.jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    job, adopted = create(slow, parse_spec(spec_dict()), tf)
    assert adopted and list(fake.jobs) == [job["id"]]
    assert len(fake.calls("POST", r"^/v1/fine-tunes$")) == 1
    slow.close()


CREATE = r"^/v1/fine-tunes$"


@pytest.mark.parametrize("reply, ctype", [
    (b"", "application/json"),                                       # empty
    (b'{"id": "ft-', "application/json"),                            # truncated
    (b"<html><body>502 Bad Gateway</body></html>", "text/html"),      # not JSON
    (b"[1, 2]", "application/json"),                                  # JSON, not a job
    (b'{"ok": true}', "application/json"),                            # an object without an id
])
def test_create_answered_200_with_an_unreadable_body_adopts_the_job(fake, client, tmp_path, reply, ctype):
    """Together created the job but its answer cannot be read: as ambiguous as a 500, so the job
    is looked up by its suffix and adopted (not a user error, not a second job)."""
    tf = upload_train(client, tmp_path)
    fake.fault("POST", CREATE, reply=reply, reply_type=ctype)
    job, adopted = create(client, parse_spec(spec_dict()), tf)
    assert adopted and list(fake.jobs) == [job["id"]]
    assert len(fake.calls("POST", CREATE)) == 1


def test_create_unreadable_and_not_listed_yet_is_transient_then_adopted(fake, client, tmp_path):
    tf = upload_train(client, tmp_path)
    fake.fault("POST", CREATE, reply=b"")
    fake.fault("GET", CREATE)  # the look-up before the create goes through...
    fake.fault("GET", CREATE, status=503, headers=FAST, times=3)  # ...the one after it does not
    with pytest.raises(T.TogetherTransientError) as e:
        create(client, parse_spec(spec_dict()), tf)
    assert e.value.reason == "TogetherUnavailable" and not e.value.user_error
    assert "unreadable reply" in e.value.message and "an empty body" in e.value.message
    job, adopted = create(client, parse_spec(spec_dict()), tf)  # the handler's retry
    assert adopted and list(fake.jobs) == [job["id"]] and len(fake.calls("POST", CREATE)) == 1


@pytest.mark.parametrize("reply, ctype", [(b"<html>maintenance</html>", "text/html"), (b"", "application/json"),
                                          (b'{"object": "list"}', "application/json")])
def test_an_unreadable_job_list_never_leads_to_a_create(fake, client, tmp_path, reply, ctype):
    tf = upload_train(client, tmp_path)
    fake.fault("GET", CREATE, reply=reply, reply_type=ctype)
    with pytest.raises(T.TogetherTransientError) as e:
        create(client, parse_spec(spec_dict()), tf)
    assert e.value.reason == "TogetherUnavailable" and "list fine-tunes" in e.value.message
    assert fake.calls("POST", CREATE) == [] and fake.jobs == {}


@pytest.mark.parametrize("reply, ctype", [(b"<html>oops</html>", "text/html"), (b"[]", "application/json"),
                                          (b"", "application/json"), (b'{"id": "ft-', "application/json")])
def test_retrieve_of_a_reply_that_is_no_object_is_transient(fake, client, reply, ctype):
    job = fake.add_job(model="m", suffix="s")
    fake.fault("GET", rf"^/v1/fine-tunes/{job['id']}$", reply=reply, reply_type=ctype)
    with pytest.raises(T.TogetherTransientError) as e:
        client.retrieve(job["id"])
    assert e.value.reason == "TogetherUnavailable" and not e.value.user_error
    assert client.retrieve(job["id"])["id"] == job["id"]


def test_wrong_typed_fields_of_a_retrieve_reach_status_view_without_raising(fake, client):
    job = fake.add_job(model="m", suffix="s")
    odd = {"id": job["id"], "status": "running", "epochs_completed": "two", "total_price": "n/a",
           "events": [{"type": "checkpoint_save", "message": "saved", "step": "ten", "total_steps": 30}]}
    fake.fault("GET", rf"^/v1/fine-tunes/{job['id']}$", reply=json.dumps(odd).encode())
    view = T.status_view(client.retrieve(job["id"]))
    assert view["togetherStatus"] == "running" and view["progress"] == {"totalSteps": 30}
    assert "Together reply field 'step' is not a number: 'ten'" in view["problems"]
    assert "Together reply field 'epochs_completed' is not a number: 'two'" in view["problems"]


def test_retry_after_of_a_429_comes_back_for_the_next_poll(fake):
    import email.utils
    from datetime import datetime, timedelta, timezone

    with T.TogetherClient(KEY, fake.url, max_retries=0) as c:
        fake.fault("GET", r"^/v1/fine-tunes/ft-x$", status=429, headers={"retry-after": "120"})
        with pytest.raises(T.TogetherTransientError) as e:
            c.retrieve("ft-x")
        assert e.value.retry_after == 120 and T.retry_delay(e.value.retry_after, 30) == 120
        later = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(hours=2), usegmt=True)
        fake.fault("GET", r"^/v1/fine-tunes/ft-x$", status=503, headers={"retry-after": later})
        with pytest.raises(T.TogetherTransientError) as e:
            c.retrieve("ft-x")
        assert e.value.retry_after > 600 and T.retry_delay(e.value.retry_after, 30) == T.RETRY_AFTER_MAX


def test_base_url_with_a_trailing_v1_is_corrected_not_a_404(fake, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="tuneop.backends.together")
    with T.TogetherClient(KEY, fake.url + "/v1/") as c:
        assert c.base_url == fake.url and c.list_jobs() == []
    monkeypatch.setenv("TOGETHER_BASE_URL", fake.url + "/v1")
    with T.TogetherClient(KEY) as c:  # as the pods and the operator get it, from the environment
        assert c.base_url == fake.url and c.list_jobs() == []
    warnings = [r.getMessage() for r in caplog.records if "TOGETHER_BASE_URL" in r.getMessage()]
    assert len(warnings) == 1 and "host root" in warnings[0]  # once
    assert fake.requests and not any(r.path.startswith("/v1/v1") for r in fake.requests)
    assert_no_key(*warnings)


def test_download_past_the_limit_names_the_limit_and_its_source(fake, client, tmp_path):
    fake.archive = b"x" * 100_000
    jid = completed_job(fake)
    dest = tmp_path / "archive"
    with pytest.raises(T.TogetherUserError) as e:
        client.download(jid, str(dest), max_bytes=10_000, limit_source="estimated from LoRA rank 8 and a 1B model")
    assert e.value.reason == "ArchiveInvalid"
    assert "10000 bytes" in e.value.message and "LoRA rank 8" in e.value.message
    assert not dest.exists() and not (tmp_path / "archive.part").exists()


def test_user_error_job(fake, client, tmp_path):
    fake.outcome = "user_error"
    fake.outcome_message = "Dataset row 17 exceeds max_seq_length 2048"
    tf = upload_train(client, tmp_path)
    job, _ = create(client, parse_spec(spec_dict()), tf)
    views, events = run_to_terminal(client, job["id"])
    v = views[-1]
    assert (v["phase"], v["reason"], v["terminal"], v["download"]) == ("Failed", "TogetherUserError", True, False)
    assert "Dataset row 17 exceeds max_seq_length 2048" in v["message"]
    assert ("Warning", "JobError", "Dataset row 17 exceeds max_seq_length 2048") in events


def test_cancel(fake, client, tmp_path):
    tf = upload_train(client, tmp_path)
    job, _ = create(client, parse_spec(spec_dict()), tf)
    res = client.cancel(job["id"])
    assert res["status"] == "cancel_requested"
    assert len(fake.calls("POST", rf"^/v1/fine-tunes/{job['id']}/cancel$")) == 1
    v = T.status_view(client.retrieve(job["id"]))
    assert (v["phase"], v["reason"]) == ("Failed", "TogetherCancelled")


def test_download_resumes_a_broken_stream(fake, client, tmp_path, archive_gz):
    fake.archive = archive_gz
    fake.progression = ["completed"]
    tf = upload_train(client, tmp_path)
    job, _ = create(client, parse_spec(spec_dict()), tf)
    client.retrieve(job["id"])
    fake.fault("GET", r"^/v1/finetune/download$", truncate=len(archive_gz) // 3)
    dest = tmp_path / "a.tar.gz"
    assert client.download(job["id"], str(dest)) == len(archive_gz)
    assert dest.read_bytes() == archive_gz
    ranges = [r.headers.get("Range") for r in fake.calls("GET", r"^/v1/finetune/download$")]
    assert ranges[0] is None and ranges[-1] == f"bytes={len(archive_gz) // 3}-"
    assert not (tmp_path / "a.tar.gz.part").exists()


def test_upload_rejected_by_validation_report(fake, client, tmp_path):
    fake.file_invalid = "Missing 'messages' key on line 1"
    with pytest.raises(T.TogetherUserError) as e:
        upload_train(client, tmp_path)
    assert e.value.reason == "TogetherFileInvalid" and "Missing 'messages' key on line 1" in e.value.message


def test_wrong_key_and_no_key_leak(fake, tmp_path):
    bad = T.TogetherClient(KEY + "-wrong", fake.url)
    errors = []
    with pytest.raises(T.TogetherUserError) as e:
        bad.list_jobs()
    errors.append(e.value)
    assert e.value.reason == "TogetherAuth"
    good = T.TogetherClient(KEY, fake.url)
    for fault in ({"status": 500, "headers": FAST, "times": 3}, {"drop": True, "times": 3},
                  {"status": 400, "body": {"error": {"message": f"bad request for key {KEY}"}}}):
        fake.fault("GET", r"^/v1/fine-tunes$", **fault)
        with pytest.raises(T.TogetherBackendError) as e:
            good.list_jobs()
        errors.append(e.value)
    assert errors[-1].user_error and "***" in errors[-1].message
    assert_no_key(*[str(x) for x in errors], *[repr(x) for x in errors], *[x.args for x in errors],
                  repr(good), repr(bad))
    bad.close()
    good.close()


# -------------------------------------------------------------------- the upload/download pods


def job_config(tmp_path: Path, spec: dict, name: str = "news") -> Path:
    vols = tmp_path / "vols"
    cfg = resolve({"name": name, "namespace": "team-a", "uid": "uid-1", "generation": 1}, parse_spec(spec),
                  pvc_dir=lambda claim: str(vols / claim), configmap_dir=lambda n: str(tmp_path / "cm" / n))
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    return path


def run_job(fake, tmp_path, *args, key=KEY):
    term = tmp_path / f"termination-{len(list(tmp_path.glob('termination-*')))}"
    env = {**os.environ, "TOGETHER_API_KEY": key, "TOGETHER_BASE_URL": fake.url,
           "TUNEOP_TERMINATION_LOG": str(term), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tuneop.backends.together.pod", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    message = term.read_text() if term.exists() else ""
    assert_no_key(proc.stdout, proc.stderr, message)
    return proc, (json.loads(message) if message else None)


def test_job_upload_messages_with_validation_split(fake, tmp_path):
    write_jsonl(tmp_path / "vols" / "data" / "train.jsonl", MESSAGES)
    spec = spec_dict(dataset={"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
                              "validationSplit": 0.25})
    proc, msg = run_job(fake, tmp_path, "upload", "--config", str(job_config(tmp_path, spec)))
    assert proc.returncode == 0, proc.stderr
    assert msg["event"] == "uploaded" and msg["format"] == "messages"
    assert msg["dataset"]["trainRows"] == 9 and msg["dataset"]["validationRows"] == 3
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == msg
    train = fake.uploads[msg["trainingFile"]].decode().splitlines()
    val = fake.uploads[msg["validationFile"]].decode().splitlines()
    assert len(train) == 9 and len(val) == 3
    assert json.loads(train[0]).keys() == {"messages"}
    assert fake.files[msg["trainingFile"]]["filename"] == "news-train.jsonl"


def test_job_upload_converts_preference_rows(fake, tmp_path):
    write_jsonl(tmp_path / "vols" / "data" / "train.jsonl", PREFS)
    proc, msg = run_job(fake, tmp_path, "upload", "--config", str(job_config(tmp_path, spec_dict(method="dpo"))))
    assert proc.returncode == 0, proc.stderr
    assert msg["validationFile"] is None and msg["format"] == "preference"
    row = json.loads(fake.uploads[msg["trainingFile"]].decode().splitlines()[0])
    assert row == {"input": {"messages": [{"role": "user", "content": "say 0"}]},
                   "preferred_output": [{"role": "assistant", "content": "good 0"}],
                   "non_preferred_output": [{"role": "assistant", "content": "bad 0"}]}


def test_job_upload_bad_data_is_a_user_error(fake, tmp_path):
    path = tmp_path / "vols" / "data" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"messages": [{"role": "user", "content": "q"}]}\nnot json\n')
    proc, msg = run_job(fake, tmp_path, "upload", "--config", str(job_config(tmp_path, spec_dict())))
    assert proc.returncode == 2
    assert msg["event"] == "error" and msg["reason"] == "DatasetInvalid" and "line 2" in msg["message"]
    assert fake.uploads == {}


def test_job_upload_wrong_key_is_a_user_error(fake, tmp_path):
    write_jsonl(tmp_path / "vols" / "data" / "train.jsonl", MESSAGES)
    proc, msg = run_job(fake, tmp_path, "upload", "--config", str(job_config(tmp_path, spec_dict())),
                        key=KEY + "x")
    assert proc.returncode == 2 and msg["reason"] == "TogetherAuth"
    assert KEY + "x" not in proc.stdout + proc.stderr + json.dumps(msg)


def test_job_upload_together_down_exits_1(fake, tmp_path):
    write_jsonl(tmp_path / "vols" / "data" / "train.jsonl", MESSAGES)
    fake.fault("POST", r"^/v1/files$", status=503, headers=FAST, times=3)
    proc, msg = run_job(fake, tmp_path, "upload", "--config", str(job_config(tmp_path, spec_dict())))
    assert proc.returncode == 1 and msg["reason"] == "TogetherUnavailable"


def completed_job(fake) -> str:
    fake.progression = ["completed"]
    job = fake.add_job(model="Qwen/Qwen2.5-7B-Instruct", suffix="news-0123456789", n_epochs=1)
    job["status"] = "completed"
    return job["id"]


def test_job_download_writes_the_layout(fake, tmp_path, peft_dir):
    fake.archive = make_tar(dir_entries(str(peft_dir), prefix="out/adapter/"), "zst")
    fake.archive_content_type = "application/zstd"
    jid = completed_job(fake)
    proc, msg = run_job(fake, tmp_path, "download", "--config", str(job_config(tmp_path, spec_dict())),
                        "--job-id", jid)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "vols" / "adapters" / "news"
    adir = out / "adapter"
    assert msg["event"] == "done" and msg["adapter"]["path"] == str(adir)
    assert msg["adapter"]["sha256"] == hashlib.sha256((peft_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    manifest_bytes = (adir / "tuneop-manifest.json").read_bytes()
    assert msg["adapter"]["manifestSha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    manifest = json.loads(manifest_bytes)
    assert manifest["source"] == "together" and manifest["baseModel"] == "Qwen/Qwen2.5-7B-Instruct"
    assert manifest["together"]["jobId"] == jid
    assert sorted(os.listdir(out)) == ["adapter"]  # no leftovers
    json.loads((adir / "adapter_config.json").read_text())


@pytest.mark.parametrize("entries, compression", [
    ({"out/adapter_config.json": b"{}", "../../escape.txt": b"x"}, "gz"),
    ({"out/adapter_config.json": b"{}", "out/evil": link("out/evil", "/etc/passwd")}, "zst"),
    ({"out/adapter_config.json": b"{}"}, "gz"),  # no weights: a half adapter
    (None, None),  # not an archive
])
def test_job_download_bad_archive(fake, tmp_path, entries, compression):
    fake.archive = make_tar(entries, compression) if entries else b"<html>oops</html>" * 50
    jid = completed_job(fake)
    out = tmp_path / "vols" / "adapters" / "news"
    out.mkdir(parents=True)
    (out / "progress.json").write_text("{}")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc, msg = run_job(fake, tmp_path, "download", "--config", str(job_config(tmp_path, spec_dict())),
                        "--job-id", jid)
    assert proc.returncode == 2 and msg["reason"] == "ArchiveInvalid", (proc.stderr, msg)
    after = sorted(str(p) for p in tmp_path.rglob("*") if not p.name.startswith("termination-"))
    assert after == sorted(before + [str(tmp_path / "job.json")])
    assert not (out / "adapter").exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "vols" / "escape.txt").exists()


def test_job_download_of_an_unfinished_job(fake, tmp_path):
    job = fake.add_job(model="m", suffix="s")
    proc, msg = run_job(fake, tmp_path, "download", "--config", str(job_config(tmp_path, spec_dict())),
                        "--job-id", job["id"])
    assert proc.returncode == 2 and "not completed" in msg["message"]
