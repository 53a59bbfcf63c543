"""The trainer command run for real on CPU with a tiny Llama (see tinymodel.py).

Each test runs `python -m tuneop.trainer --config FILE` as a subprocess, exactly like the training
pod, and checks the contract: JSON events on stdout, progress.json, the adapter directory and its
manifest, the termination message and the exit code. Behaviour only, never timings.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_harness import make_config, run_trainer, trainer_env

pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_adapter_dir(adapter: Path, term: dict) -> dict:
    """Manifest hashes match the files; the termination message points at them."""
    manifest_path = adapter / "tuneop-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    on_disk = sorted(
        str(p.relative_to(adapter)) for p in adapter.rglob("*") if p.is_file() and p.name != "tuneop-manifest.json"
    )
    assert sorted(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert sha256(adapter / name) == digest, name
    assert term["event"] == "done"
    assert term["adapter"]["path"] == str(adapter)
    assert term["adapter"]["manifestSha256"] == sha256(manifest_path)
    weights = "adapter_model.safetensors" if (adapter / "adapter_model.safetensors").exists() else "model.safetensors"
    assert term["adapter"]["sha256"] == sha256(adapter / weights)
    assert term["adapter"]["sizeBytes"] == sum((adapter / n).stat().st_size for n in on_disk) + manifest_path.stat().st_size
    assert len(json.dumps(term)) < 4096
    for key in ("baseModel", "method", "adapterType", "metrics", "evaluation", "createdAt"):
        assert key in manifest
    return manifest


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def losses(run) -> list[float]:
    return [e["loss"] for e in run.of("progress") if e.get("loss") is not None]


def test_sft_prompt_completion(tiny_model, datasets, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(
        tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
        dataset={"train": {"pvc": {"claimName": "data", "path": "t.jsonl"}},
                 "test": {"pvc": {"claimName": "data", "path": "e.jsonl"}}, "validationSplit": 0.1},
    )
    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    start = run.one("start")
    assert start["format"] == "prompt-completion" and start["lossOn"] == "completion"
    assert start["resumed_from"] is None and start["total_steps"] == 30 and start["adapterLayers"] is None
    # "Word:" is too short a shared prefix to pay for its own pass
    assert start["speed"]["sharedPrefix"] is False and "< 16" in start["speed"]["sharedPrefixReason"]
    if cuda_available():
        assert start["device"] == "cuda" and start["precision"] in ("bf16", "fp32")
    else:
        assert start["device"] == "cpu" and start["gradientCheckpointing"] is False
    assert start["rows"] + start["validationRows"] == 48 and start["validationRows"] == 5
    progress = run.of("progress")
    assert progress and progress[-1]["step"] == 30
    for key in ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second", "eta_seconds"):
        assert key in progress[-1]
    seen = losses(run)
    assert seen[-1] < seen[0] * 0.5
    assert any("eval_loss" in e for e in run.of("eval"))
    assert run.of("checkpoint")
    assert json.loads((out / "progress.json").read_text()) == progress[-1]

    ev = next(e for e in run.of("eval") if e.get("metric") == "exact_match")
    assert ev["samples"] == 24
    assert ev["adapter"] > ev["base"] and ev["adapter"] >= 0.8
    term = run.termination
    assert term == run.one("done")
    assert term["evaluation"] == {k: ev[k] for k in ("metric", "samples", "base", "adapter")}
    manifest = check_adapter_dir(out / "adapter", term)
    assert manifest["evaluation"] == term["evaluation"]
    assert manifest["adapterType"] == "lora" and manifest["method"] == "sft"
    assert manifest["metrics"]["steps"] == 30
    cfg_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["base_model_name_or_path"] == str(tiny_model)
    assert not list(out.glob(".adapter-*"))

    # The adapter is a standard PEFT adapter: load it and see it answer with mapping B.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tinymodel

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, out / "adapter")
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    word = tinymodel.make_words(24, seed=7)[0]
    enc = tok(tinymodel.prompt(word), return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
    text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() == tinymodel.label(word, "B")


@pytest.mark.parametrize("batching", ["padding_free", "group_by_length"])
def test_sft_batching_modes_learn_the_completion(tiny_model, datasets, tmp_path, batching):
    """The batching schemes the trainer may pick for mixed lengths (forced here) still train on the
    completion only and learn it; a flattened row counts every position as a token."""
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                      hyperparameters={"maxSteps": 30})
    run = run_trainer(cfg, env={"TUNEOP_BATCHING": batching})
    assert run.rc == 0, run.stderr[-3000:]
    start = run.one("start")
    assert start["speed"]["batching"] == batching and start["lossOn"] == "completion"
    assert start["speed"]["compactLmHead"] is (not cuda_available())
    progress = run.of("progress")
    assert progress[-1]["tokens_seen"] > 0 and progress[-1]["train_seconds"] > 0
    seen = losses(run)
    assert seen[-1] < seen[0] * 0.5
    ev = next(e for e in run.of("eval") if e.get("metric") == "exact_match")
    assert ev["adapter"] > ev["base"] and ev["adapter"] >= 0.8


def test_shared_prompt_prefix_trains_the_completion(tiny_model, datasets, tmp_path):
    """Rows that all start "Word:" trained with that prefix run once per batch (forced on: the automatic
    choice wants a longer one), checked against whole rows before training; the adapter still learns."""
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                      hyperparameters={"maxSteps": 30})
    run = run_trainer(cfg, env={"TUNEOP_SHARED_PREFIX": "1", "TUNEOP_BATCHING": "group_by_length"})
    assert run.rc == 0, run.stderr[-3000:]
    speed = run.one("start")["speed"]
    assert speed["sharedPrefix"] is True and speed["sharedPrefixTokens"] > 0, speed
    assert "relative difference" in run.stderr
    seen = losses(run)
    assert seen[-1] < seen[0] * 0.5
    ev = next(e for e in run.of("eval") if e.get("metric") == "exact_match")
    assert ev["adapter"] > ev["base"] and ev["adapter"] >= 0.8


def test_lora_on_chosen_layers_only(tiny_model, datasets, tmp_path):
    """adapter.layers: [-1] trains LoRA on the top decoder layer alone (the tiny model has 2) and the
    adapter holds that layer's weights only; a layer the model lacks is a user error naming the field."""
    from safetensors import safe_open

    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                      adapter={"layers": [-1]}, hyperparameters={"maxSteps": 30})
    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    assert run.one("start")["adapterLayers"] == [1]
    seen = losses(run)
    assert seen[-1] < seen[0] * 0.5
    ev = next(e for e in run.of("eval") if e.get("metric") == "exact_match")
    assert ev["adapter"] > ev["base"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".layers.1." in k for k in keys), keys

    bad = make_config(tmp_path / "bad.json", tiny_model, datasets["pc_train"], tmp_path / "bad-out",
                      adapter={"layers": [2]}, hyperparameters={"maxSteps": 30})
    run = run_trainer(bad)
    assert run.rc == 2 and run.termination["reason"] == "ConfigInvalid"
    assert "adapter.layers: the model has no layer 2: it has 2 decoder layers" in run.termination["message"]
    assert not (tmp_path / "bad-out" / "adapter").exists()


def test_sft_messages_assistant_only(tiny_model, datasets, tmp_path):
    # A copy of the base whose chat template lacks {% generation %} markers: the trainer installs its own.
    plain = tmp_path / "plain-template-model"
    shutil.copytree(tiny_model, plain)
    tpl = (plain / "chat_template.jinja")
    tpl.write_text(tpl.read_text().replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", plain, datasets["msg_train"], out, test=datasets["msg_test"],
                      dataset={"train": {"pvc": {"claimName": "d", "path": "m.jsonl"}},
                               "test": {"pvc": {"claimName": "d", "path": "t.jsonl"}}, "format": "messages"})
    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    start = run.one("start")
    assert start["format"] == "messages" and start["lossOn"] == "assistant"
    assert "generation" in (start["chatTemplate"] or "")
    seen = losses(run)
    assert seen[-1] < seen[0]
    ev = run.termination["evaluation"]
    assert ev["samples"] == 24 and ev["adapter"] > ev["base"]
    check_adapter_dir(out / "adapter", run.termination)
    assert "{% generation %}" in (out / "adapter" / "chat_template.jinja").read_text()


def test_dpo(tiny_model, datasets, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pref_train"], out, test=datasets["pref_test"],
                      method="dpo", hyperparameters={"dpoBeta": 0.1, "maxSteps": 20})
    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    start = run.one("start")
    assert start["method"] == "dpo" and start["format"] == "preference"
    seen = losses(run)
    assert seen[-1] < seen[0]
    term = run.termination
    manifest = check_adapter_dir(out / "adapter", term)
    assert manifest["method"] == "dpo"
    assert term["evaluation"]["adapter"] > term["evaluation"]["base"]


def test_full_fine_tuning(tiny_model, datasets, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                      adapter={"type": "full"}, hyperparameters={"learningRate": 1e-3, "maxSteps": 20})
    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    adapter = out / "adapter"
    assert (adapter / "model.safetensors").exists() and (adapter / "config.json").exists()
    assert not (adapter / "adapter_config.json").exists()
    manifest = check_adapter_dir(adapter, run.termination)
    assert manifest["adapterType"] == "full"
    ev = run.termination["evaluation"]
    assert ev["base"] == 0.0 and ev["adapter"] > ev["base"]  # base scored before training

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(adapter)


def test_resume_after_kill(tiny_model, datasets, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out,
                      hyperparameters={"maxSteps": 80, "batchSize": 4})
    term = tmp_path / "job.termination"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneop.trainer", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=trainer_env(term),
        start_new_session=True,
    )
    killed_at = None
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "checkpoint":
                proc.send_signal(signal.SIGKILL)
                killed_at = event
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, "no checkpoint event before the end"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists()
    # the checkpoint event comes once the checkpoint is complete: its commit marker is there
    complete = [p for p in (out / "checkpoints").glob("*/checkpoint-*") if (p / "tuneop-checkpoint.json").exists()]
    newest = max(complete, key=lambda p: int(p.name.split("-")[1]))
    assert int(newest.name.split("-")[1]) >= killed_at["step"] and killed_at["path"] in {str(p) for p in complete}

    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    start = run.one("start")
    assert start["resumed_from"] == str(newest)
    assert start["step"] == int(newest.name.split("-")[1])
    assert run.of("progress")[0]["step"] > start["step"]
    assert run.termination["metrics"]["steps"] == 80
    check_adapter_dir(out / "adapter", run.termination)


HEAVY_PROBE = (
    "import json, sys\n"
    "from tuneop.trainer.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules)\n"
    "open(sys.argv[sys.argv.index('--config') + 1] + '.probe', 'w').write(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    "sys.exit(rc)\n"
)


def probe(cfg: Path, *args: str):
    """Run main() in a fresh interpreter and report which heavy modules it imported."""
    run = run_trainer(cfg, *args, cmd=[sys.executable, "-c", HEAVY_PROBE])
    return run, json.loads(Path(str(cfg) + ".probe").read_text())


def no_nvidia() -> bool:
    return not Path("/proc/driver/nvidia/gpus").exists() and not list(Path("/dev").glob("nvidia[0-9]*"))


def test_qlora_on_cpu_is_refused_before_loading(tiny_model, datasets, tmp_path):
    if not no_nvidia():
        pytest.skip("a GPU is visible")
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, adapter={"type": "qlora"})
    run, seen = probe(cfg)
    assert run.rc == 2 and seen["rc"] == 2
    assert seen["heavy"] == []
    assert run.termination["event"] == "error"
    assert run.termination["reason"] == "UnsupportedHardware"
    assert "CUDA" in run.termination["message"]
    assert not run.of("start")
    assert not (out / "checkpoints").exists()


def test_bad_dataset_fails_with_line_number(tiny_model, datasets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = datasets["pc_train"].read_text().splitlines()
    lines[2] = '{"prompt": "Word: x\\nLabel:", "completion": '
    bad.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path / "job.json", tiny_model, bad, tmp_path / "out")
    run = run_trainer(cfg)
    assert run.rc == 2
    assert run.termination["event"] == "error" and run.termination["reason"] == "DatasetInvalid"
    assert "line 3" in run.termination["message"]
    assert run.one("error") == run.termination


def test_validate_only(tiny_model, datasets, tmp_path):
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], tmp_path / "out",
                      test=datasets["pc_test"], dataset={"train": {"pvc": {"claimName": "d", "path": "t"}},
                                                         "validationSplit": 0.25})
    run, seen = probe(cfg, "--validate-only")
    assert run.rc == 0, run.stderr[-2000:]
    assert seen["heavy"] == []
    report = run.one("validated")["dataset"]
    assert report["format"] == "prompt-completion"
    assert report["trainRows"] == 36 and report["validationRows"] == 12 and report["testRows"] == 24
    assert report["estimatedTokens"] > 0
    assert run.termination == run.one("validated")
    assert not (tmp_path / "out" / "adapter").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\nnot json\n')
    cfg = make_config(tmp_path / "bad.json", tiny_model, bad, tmp_path / "out")
    run, seen = probe(cfg, "--validate-only")
    assert run.rc == 2 and seen["heavy"] == []
    term = run.termination
    assert term["reason"] == "DatasetInvalid"
    assert "line 2" in term["message"] and "line 3" in term["message"]
    assert any("line 2" in e for e in term["errors"])


def test_torchrun_two_processes(tiny_model, datasets, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                      hyperparameters={"maxSteps": 12, "batchSize": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tuneop.trainer"]
    # gloo on CPU, also on a one-GPU machine (two ranks cannot share one GPU with NCCL)
    run = run_trainer(cfg, cmd=cmd, env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.rc == 0, run.stderr[-4000:]
    assert len(run.of("start")) == 1 and len(run.of("done")) == 1
    assert run.one("start")["worldSize"] == 2
    assert run.termination["metrics"]["steps"] == 12
    check_adapter_dir(out / "adapter", run.termination)
    assert [p.name for p in out.iterdir() if p.name.startswith(".adapter")] == []


def test_validate_only_downloads_url(tiny_model, datasets, tmp_path):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(datasets["pc_train"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pc_train.jsonl?sig=s3cr3t"
        out = tmp_path / "out"
        cfg = make_config(tmp_path / "job.json", tiny_model, url, out,
                          dataset={"train": {"url": url}})
        run = run_trainer(cfg, "--validate-only")
        assert run.rc == 0, run.stderr[-2000:]
        assert run.termination["dataset"]["trainRows"] == 48
        assert len(list((out / ".data").iterdir())) == 1
        assert "s3cr3t" not in run.stdout + run.stderr

        missing = url.replace("pc_train", "nope")
        cfg = make_config(tmp_path / "job2.json", tiny_model, missing, out, dataset={"train": {"url": missing}})
        run = run_trainer(cfg, "--validate-only")
        assert run.rc == 2 and run.termination["reason"] == "DatasetInvalid"
        assert "404" in run.termination["message"] and "s3cr3t" not in run.termination["message"]
    finally:
        server.shutdown()


def test_qlora_on_gpu(tiny_model, datasets, tmp_path):
    import importlib.util

    if not cuda_available() or importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs CUDA and bitsandbytes")
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                      adapter={"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0})
    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    assert run.one("start")["device"] == "cuda"
    manifest = check_adapter_dir(out / "adapter", run.termination)
    assert manifest["adapterType"] == "qlora"
    seen = losses(run)
    assert seen[-1] < seen[0]


def test_time_budget_ends_training_and_the_schedule(tiny_model, datasets, tmp_path):
    """hyperparameters.maxTrainSeconds with far more epochs than fit: the budget ends training, the
    cosine schedule runs over the budget (the last logged LR is near 0), the adapter is written, and each
    checkpoint records the budget spent for a resumed run."""
    out = tmp_path / "out"
    rows = Path(datasets["pc_train"]).read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows * 20) + "\n")  # 960 rows x 100 epochs: far more steps than 10 s hold
    cfg = make_config(tmp_path / "job.json", tiny_model, train, out,
                      hyperparameters={"maxSteps": None, "epochs": 100, "maxTrainSeconds": 10,
                                       "lrScheduler": "cosine", "warmupRatio": 0.1})
    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    start = run.one("start")
    assert start["timeBudget"]["seconds"] == 10 and start["timeBudget"]["spentBefore"] == 0
    metrics = run.termination["metrics"]
    assert metrics["stopped_by_time_budget"] is True and metrics["time_budget_seconds"] == 10
    assert 0 < metrics["steps"] < start["total_steps"]  # stopped long before 100 epochs
    progress = run.of("progress")
    assert progress[-1]["step"] == metrics["steps"]  # the last step is logged
    peak = max(p["learning_rate"] for p in progress)
    assert 0 < progress[-1]["learning_rate"] < 0.2 * peak
    assert progress[-1]["total_steps"] == metrics["steps"]
    ckpts = list((out / "checkpoints").glob("*/checkpoint-*"))
    assert ckpts
    for ckpt in ckpts:
        spent = json.loads((ckpt / "tuneop-checkpoint.json").read_text())
        # the budget stops training before a step would overrun it by the steps' pace so far: a step
        # slower than that pace (a loaded machine) overruns by a fraction of one step, not more
        assert 0 < spent["elapsed_seconds"] <= 10.5 and spent["budget_seconds"] == 10
    check_adapter_dir(out / "adapter", run.termination)


def adapter_sha(out: Path) -> str:
    return sha256(out / "adapter" / "adapter_model.safetensors")


def test_changed_spec_trains_afresh_and_the_same_spec_reuses_the_adapter(tiny_model, datasets, tmp_path):
    """Checkpoints belong to a training fingerprint (spec + data content): a new learning rate does not
    resume the old run's final checkpoint but trains anew, and the old checkpoints go once the new adapter
    is written; the same spec and data again reuse the adapter without loading the model."""
    out = tmp_path / "out"
    legacy = out / "checkpoints" / "checkpoint-3"  # an older trainer's checkpoint
    legacy.mkdir(parents=True)
    (legacy / "trainer_state.json").write_text("{}")
    first_cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                            hyperparameters={"maxSteps": 12}, evaluation={"maxSamples": 8, "maxNewTokens": 4})
    first = run_trainer(first_cfg)
    assert first.rc == 0, first.stderr[-3000:]
    fp1 = first.one("start")["trainingFingerprint"]
    manifest = check_adapter_dir(out / "adapter", first.termination)
    assert manifest["trainingFingerprint"] == fp1
    info = manifest["baseModelInfo"]
    assert info == {"architecture": "LlamaForCausalLM", "modelType": "llama", "hiddenSize": info["hiddenSize"],
                    "numLayers": 2, "vocabSize": info["vocabSize"]} and info["hiddenSize"] > 0
    assert first.termination["adapter"]["baseModelInfo"] == info
    assert first.termination["adapter"]["baseModel"] == str(tiny_model)
    # evaluation progress: each stage starts at 0 and ends at its total, after training
    evaluating = first.of("evaluating")
    assert [(e["stage"], e["done"]) for e in evaluating if e["done"] in (0, 8)] == [
        ("base", 0), ("base", 8), ("adapter", 0), ("adapter", 8)]
    assert all(e["total"] == 8 for e in evaluating)
    assert first.events.index(evaluating[0]) > first.events.index(first.of("progress")[-1])
    assert [p.name for p in (out / "checkpoints").iterdir()] == [fp1]  # the legacy checkpoint went
    markers = [json.loads(p.read_text()) for p in (out / "checkpoints" / fp1).glob("*/tuneop-checkpoint.json")]
    assert {m["fingerprint"] for m in markers} == {fp1} and max(m["step"] for m in markers) == 12

    second_cfg = make_config(tmp_path / "job2.json", tiny_model, datasets["pc_train"], out, test=datasets["pc_test"],
                             hyperparameters={"maxSteps": 12, "learningRate": 2e-3},
                             evaluation={"maxSamples": 8, "maxNewTokens": 4})
    second = run_trainer(second_cfg)
    assert second.rc == 0, second.stderr[-3000:]
    start = second.one("start")
    assert start["trainingFingerprint"] != fp1 and start["resumed_from"] is None and start["step"] == 0
    assert second.termination["metrics"]["steps"] == 12 and second.of("progress")[-1]["step"] == 12
    assert second.termination["adapter"]["sha256"] != first.termination["adapter"]["sha256"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [start["trainingFingerprint"]]
    check_adapter_dir(out / "adapter", second.termination)

    third, seen = probe(second_cfg)
    assert third.rc == 0 and seen["heavy"] == [], third.stderr[-3000:]  # no model loaded, no torch
    done = third.termination
    assert done == third.one("done") and done["reused"] is True
    assert not third.of("start") and not third.of("progress")
    assert "reused the adapter" in third.stderr
    assert done["adapter"] == second.termination["adapter"]
    manifest = json.loads((out / "adapter" / "tuneop-manifest.json").read_text())
    assert done["evaluation"] == manifest["evaluation"] and done["metrics"] == manifest["metrics"]
    assert adapter_sha(out) == second.termination["adapter"]["sha256"]

    # the same spec with other training data is another fingerprint: trained again
    changed = tmp_path / "train-changed.jsonl"
    changed.write_text("\n".join(Path(datasets["pc_train"]).read_text().splitlines()[:-1]) + "\n")
    fourth_cfg = make_config(tmp_path / "job4.json", tiny_model, changed, out,
                             hyperparameters={"maxSteps": 2, "learningRate": 2e-3})
    fourth = run_trainer(fourth_cfg)
    assert fourth.rc == 0 and "reused" not in fourth.termination, fourth.stderr[-3000:]
    assert fourth.one("start")["trainingFingerprint"] != start["trainingFingerprint"]


def test_sigterm_checkpoints_exits_143_and_resumes(tiny_model, datasets, tmp_path):
    """A real SIGTERM during training: the current step ends, a complete checkpoint of that step is written,
    the interrupted event is the termination message, exit 143 within seconds; a rerun resumes there."""
    import time

    out = tmp_path / "out"
    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], out,
                      hyperparameters={"maxSteps": 60, "batchSize": 4})
    term = cfg.with_suffix(".termination")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneop.trainer", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env(term),
        start_new_session=True,
    )
    events = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and events[-1]["step"] >= 2:
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                break
        rest, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    events += [json.loads(x) for x in rest.splitlines() if x.strip()]
    assert proc.returncode == 143, stderr[-3000:]
    assert elapsed < 20, elapsed
    interrupted = events[-1]
    assert interrupted["event"] == "interrupted" and interrupted["signal"] == "SIGTERM"
    assert json.loads(term.read_text()) == interrupted
    step, path = interrupted["step"], Path(interrupted["checkpoint"])
    assert 2 <= step < 60 and path.name == f"checkpoint-{step}"
    marker = json.loads((path / "tuneop-checkpoint.json").read_text())
    assert marker["step"] == step and marker["fingerprint"] == path.parent.name
    assert not any(e["event"] in ("done", "eval") for e in events)
    assert not (out / "adapter").exists()

    run = run_trainer(cfg)
    assert run.rc == 0, run.stderr[-3000:]
    start = run.one("start")
    assert start["resumed_from"] == str(path) and start["step"] == step
    assert run.termination["metrics"]["steps"] == 60
    check_adapter_dir(out / "adapter", run.termination)


def test_sigterm_before_training_exits_143_at_once(tiny_model, datasets, tmp_path):
    """SIGTERM while the trainer is still loading: exit 143 promptly, interrupted event with step null."""
    import time

    cfg = make_config(tmp_path / "job.json", tiny_model, datasets["pc_train"], tmp_path / "out")
    term = cfg.with_suffix(".termination")
    # Python starts slowly and then loads torch: wait until the handler is installed (the first stderr
    # lines come after it), then signal
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tuneop.trainer import main as m; "
         "orig = m.train\n"
         "def slow(*a, **k):\n    print('loading', file=sys.stderr, flush=True); time.sleep(30)\n"
         "m.train = slow; sys.exit(m.main(sys.argv[1:]))", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env(term), start_new_session=True,
    )
    try:
        assert proc.stderr.readline().strip() == "loading"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143
    event = {"event": "interrupted", "signal": "SIGTERM", "step": None, "checkpoint": None}
    assert json.loads(stdout.splitlines()[-1]) == event and json.loads(term.read_text()) == event


def test_tuneop_run_into_a_file_prints_plain_progress_lines(tiny_model, datasets, tmp_path):
    """`tuneop run` whose output goes to a file (a CI log): plain progress lines, no tqdm \\r redraws."""
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "cli-lines"},
        "spec": {
            "baseModel": str(tiny_model),
            "dataset": {"train": {"pvc": {"claimName": "data", "path": datasets["pc_train"].name}},
                        "test": {"pvc": {"claimName": "data", "path": datasets["pc_test"].name}}},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "maxSeqLength": 64},
            "evaluation": {"maxSamples": 4, "maxNewTokens": 4},
            "output": {"pvc": {"claimName": "out", "path": "job"}},
        },
    }))
    env = trainer_env(tmp_path / "unused", TUNEOP_HOME=str(tmp_path / "home"))
    env.pop("TUNEOP_PROGRESS")
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "tuneop.cli", "run", str(job), "--volume", f"data={datasets['pc_train'].parent}",
             "--volume", f"out={tmp_path / 'out'}"],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), timeout=240,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    assert "training: step 6/6 loss" in text
    assert "evaluating adapter: 4/4" in text
    assert (tmp_path / "out" / "job" / "adapter" / "tuneop-manifest.json").exists()
