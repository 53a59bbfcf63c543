"""Pure decisions of the trainer: config parsing, precision, checkpointing, steps, arguments."""
from __future__ import annotations

import json

import pytest

from tuneop.api.finetunejob import Hyperparameters
from tuneop.trainer import config as C
from tuneop.trainer.errors import TrainerError


def doc(**spec_over):
    spec = {
        "baseModel": "Qwen/Qwen3-8B",
        "dataset": {"train": {"pvc": {"claimName": "d", "path": "train.jsonl"}}},
        "output": {"pvc": {"claimName": "o", "path": "run"}},
    }
    spec.update(spec_over)
    return {
        "metadata": {"name": "news"},
        "spec": spec,
        "paths": {"model": "Qwen/Qwen3-8B", "train": "/mnt/pvc/d/train.jsonl", "validation": None,
                  "test": None, "output": "/mnt/pvc/o/run"},
    }


def test_parse_config_reads_spec_and_paths():
    cfg = C.parse_config(doc(hyperparameters={"learningRate": 1e-4}))
    assert cfg.spec.hyperparameters.learning_rate == 1e-4
    assert cfg.paths.train == "/mnt/pvc/d/train.jsonl" and cfg.paths.test is None
    assert cfg.name == "news"


@pytest.mark.parametrize(
    "mutate, text",
    [
        (lambda d: d.pop("spec"), "spec"),
        (lambda d: d["paths"].pop("output"), "paths.output"),
        (lambda d: d["spec"].update(hyperparameters={"learningRate": 5}), "learningRate"),
        (lambda d: d["spec"].update(bogus=1), "bogus"),
    ],
)
def test_parse_config_rejects_bad_documents(mutate, text):
    d = doc()
    mutate(d)
    with pytest.raises(TrainerError) as e:
        C.parse_config(d)
    assert e.value.reason == "ConfigInvalid" and e.value.exit_code == 2
    assert text in e.value.message


def test_load_config_bad_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{\n nope")
    with pytest.raises(TrainerError) as e:
        C.load_config(str(p))
    assert e.value.reason == "ConfigInvalid" and "line 2" in e.value.message
    with pytest.raises(TrainerError):
        C.load_config(str(tmp_path / "missing.json"))
    p.write_text(json.dumps(doc()))
    assert C.load_config(str(p)).spec.base_model == "Qwen/Qwen3-8B"


def test_cpu_flags_and_bf16():
    text = "processor : 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n"
    flags = C.cpu_flags(text)
    assert "amx_bf16" in flags and C.cpu_supports_bf16(flags)
    assert C.cpu_supports_bf16({"avx512_bf16"})
    assert not C.cpu_supports_bf16(C.cpu_flags("flags : fpu sse avx2\n"))
    assert C.cpu_flags("") == set()


@pytest.mark.parametrize(
    "precision, cuda, cuda_bf16, cpu_bf16, expected",
    [
        ("auto", True, True, False, "bf16"),
        ("auto", True, False, False, "fp32"),
        ("auto", False, False, True, "bf16"),
        ("auto", False, False, False, "fp32"),
        ("fp32", True, True, True, "fp32"),
        ("bf16", False, False, False, "bf16"),
        ("fp16", True, False, False, "fp16"),
    ],
)
def test_choose_precision(precision, cuda, cuda_bf16, cpu_bf16, expected):
    assert C.choose_precision(precision, cuda, cuda_bf16, cpu_bf16) == expected


def test_choose_precision_refuses_what_the_hardware_cannot_do():
    with pytest.raises(TrainerError) as e:
        C.choose_precision("fp16", cuda=False, cuda_bf16=False, cpu_bf16=True)
    assert e.value.reason == "UnsupportedHardware"
    with pytest.raises(TrainerError):
        C.choose_precision("bf16", cuda=True, cuda_bf16=False, cpu_bf16=False)


def test_load_dtype():
    assert C.load_dtype_name("bf16", "lora") == "bfloat16"
    assert C.load_dtype_name("fp16", "qlora") == "float16"
    assert C.load_dtype_name("bf16", "full") == "float32"  # fp32 master weights, autocast compute
    assert C.load_dtype_name("fp32", "lora") == "float32"


def test_gradient_checkpointing_decision():
    assert C.decide_gradient_checkpointing(True, cuda=False, need_bytes=1, device_bytes=None) is True
    assert C.decide_gradient_checkpointing(False, cuda=True, need_bytes=10**12, device_bytes=10**9) is False
    assert C.decide_gradient_checkpointing(None, cuda=False, need_bytes=10**12, device_bytes=None) is False
    assert C.decide_gradient_checkpointing(None, cuda=True, need_bytes=10**9, device_bytes=80 * 10**9) is False
    assert C.decide_gradient_checkpointing(None, cuda=True, need_bytes=79 * 10**9, device_bytes=80 * 10**9) is True


def test_memory_estimate_orders():
    kw = dict(n_params=8_000_000_000, hidden_size=4096, num_layers=36, batch_size=8, seq_len=2048)
    full = C.estimate_training_bytes(adapter_type="full", **kw)
    lora = C.estimate_training_bytes(adapter_type="lora", **kw)
    qlora = C.estimate_training_bytes(adapter_type="qlora", **kw)
    assert full > lora > qlora
    assert lora > 16 * 10**9  # bf16 weights of an 8B model alone
    small = C.estimate_training_bytes(adapter_type="lora", n_params=135_000_000, hidden_size=576,
                                      num_layers=30, batch_size=8, seq_len=1024)
    assert not C.decide_gradient_checkpointing(None, True, small, 80 * 10**9)
    assert C.decide_gradient_checkpointing(None, True, full, 80 * 10**9)


def test_steps():
    assert C.steps_per_epoch(100, 8, 1) == 13
    assert C.steps_per_epoch(100, 8, 2) == 7
    assert C.steps_per_epoch(100, 8, 1, world_size=2) == 7
    assert C.steps_per_epoch(0, 8, 1) == 1
    assert C.total_steps(Hyperparameters(epochs=3, batch_size=8), 100) == 39
    assert C.total_steps(Hyperparameters(max_steps=7), 10_000) == 7
    assert C.total_steps(Hyperparameters(epochs=0.5, batch_size=10), 100) == 5
    assert C.logging_steps(30) == 1 and C.logging_steps(1000) == 20
    assert C.save_steps(30) == 3 and C.save_steps(5) == 1
    assert C.save_steps(100_000) == 500
    assert C.eval_steps(30) == 6 and C.eval_steps(3) == 1 and C.eval_steps(10**6) == 1000


def test_training_arguments_mapping():
    hp = Hyperparameters(
        epochs=2, learning_rate=1e-4, batch_size=4, gradient_accumulation_steps=2, lr_scheduler="linear",
        warmup_ratio=0.1, weight_decay=0.01, max_seq_length=512, seed=7,
    )
    a = C.training_arguments(hp, "/o/checkpoints", total=100, precision="bf16", gradient_checkpointing=False,
                             has_eval=True, cuda=False)
    assert a["num_train_epochs"] == 2.0 and a["max_steps"] == -1
    assert a["learning_rate"] == 1e-4 and a["per_device_train_batch_size"] == 4
    assert a["gradient_accumulation_steps"] == 2 and a["lr_scheduler_type"] == "linear"
    assert a["warmup_steps"] == 0.1 and "warmup_ratio" not in a
    assert a["weight_decay"] == 0.01 and a["max_length"] == 512 and a["seed"] == 7
    assert a["bf16"] is True and a["fp16"] is False and a["use_cpu"] is True
    assert a["report_to"] == [] and a["disable_tqdm"] is True
    # rotation is callbacks.CheckpointMarker's, after the commit marker: Trainer's own would run before it
    assert a["save_total_limit"] is None and a["save_steps"] == 10 and a["eval_steps"] == 20
    assert a["eval_strategy"] == "steps" and a["output_dir"] == "/o/checkpoints"
    assert "ddp_backend" not in a and "gradient_checkpointing_kwargs" not in a

    b = C.training_arguments(Hyperparameters(max_steps=50), "/o", 50, "fp32", True, False, cuda=True, world_size=4)
    assert b["max_steps"] == 50 and b["eval_strategy"] == "no" and b["eval_steps"] is None
    assert b["ddp_backend"] == "nccl" and b["gradient_checkpointing"] is True
    assert b["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    c = C.training_arguments(Hyperparameters(), "/o", 50, "fp32", False, False, cuda=False, world_size=2)
    assert c["ddp_backend"] == "gloo"


def test_resolve_layers():
    assert C.resolve_layers([-2, -1], 30) == [28, 29]
    assert C.resolve_layers([29, 0, -30 + 5], 30) == [0, 5, 29]
    assert C.resolve_layers([], 30) == []
    for layers, num, msg in [([30], 30, "no layer 30: it has 30 decoder layers (0 to 29, or -30 to -1)"),
                             ([-31], 30, "no layer -31"),
                             ([29, -1], 30, "layer 29 is listed twice (as 29 and -1)"),
                             ([0], 0, "does not say how many decoder layers")]:
        with pytest.raises(TrainerError) as e:
            C.resolve_layers(layers, num)
        assert e.value.reason == "ConfigInvalid" and msg in str(e.value), str(e.value)


# ---------------------------------------------------------------- training fingerprint

def job_spec(**changes):
    from tuneop.api.finetunejob import FineTuneJobSpec

    body = {
        "baseModel": "Qwen/Qwen3-0.6B",
        "dataset": {"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}},
        "output": {"pvc": {"claimName": "out", "path": "job"}},
        "hyperparameters": {"learningRate": 2e-4, "maxSteps": 30},
    }
    for key, value in changes.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    return FineTuneJobSpec.model_validate(body).to_dict()


DATA = {"train": "a" * 64, "validation": None}


def test_fingerprint_changes_with_what_is_trained():
    base = C.training_fingerprint(job_spec(), DATA)
    assert len(base) == 16 and all(c in "0123456789abcdef" for c in base)
    assert C.training_fingerprint(job_spec(), DATA) == base  # stable
    changed = [
        job_spec(hyperparameters={"learningRate": 1e-4, "maxSteps": 30}),
        job_spec(hyperparameters={"learningRate": 2e-4, "maxSteps": 31}),
        job_spec(baseModel="Qwen/Qwen3-1.7B"),
        job_spec(adapter={"r": 8}),
        job_spec(method="dpo"),
        job_spec(resources={"gpus": 2}),
        job_spec(resources={"nodes": 2}),
        job_spec(dataset={"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}, "format": "messages"}),
        job_spec(dataset={"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}, "validationSplit": 0.1}),
    ]
    prints = {C.training_fingerprint(s, DATA) for s in changed}
    assert base not in prints and len(prints) == len(changed)
    # the data's content, train and validation alike
    assert C.training_fingerprint(job_spec(), {"train": "b" * 64, "validation": None}) != base
    assert C.training_fingerprint(job_spec(), {"train": "a" * 64, "validation": "c" * 64}) != base


def test_fingerprint_ignores_where_and_how_the_pods_run():
    base = C.training_fingerprint(job_spec(), DATA)
    same = [
        job_spec(suspend=True),
        job_spec(evaluation={"enabled": False, "maxNewTokens": 8}),
        job_spec(activeDeadlineSeconds=3600, maxRetries=5, image="registry/trainer:2",
                 terminationGracePeriodSeconds=900, hfTokenSecretRef={"name": "hf", "key": "token"}),
        job_spec(output={"pvc": {"claimName": "other", "path": "elsewhere"}}),
        job_spec(resources={"gpus": 1, "cpu": "8", "memory": "64Gi", "nodeSelector": {"pool": "a100"},
                            "tolerations": [{"key": "gpu", "operator": "Exists"}]}),
        job_spec(modelVolume={"claimName": "models", "path": "qwen"}),
        # the data's location: the same content at another path, in a ConfigMap, behind a URL
        job_spec(dataset={"train": {"url": "https://example.com/train.jsonl"}}),
        job_spec(dataset={"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
                          "test": {"pvc": {"claimName": "data", "path": "test.jsonl"}}}),
        job_spec(hyperparameters={"learningRate": 2e-4, "maxSteps": 30, "seed": 42}),  # a default spelt out
    ]
    for spec in same:
        assert C.training_fingerprint(spec, DATA) == base, spec
    fields = C.fingerprint_fields(job_spec(), DATA)
    assert fields["data"] == DATA and fields["resources"] == {"gpus": 1, "nodes": 1}
    assert fields["dataset"] == {"format": "auto"}
    for key in C.FINGERPRINT_IGNORED:
        assert key not in fields
