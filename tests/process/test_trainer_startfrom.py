"""spec.startFrom run for real: the trainer (and `tuneop run`) continues a tiny Llama's adapter.

A first run trains an adapter from scratch; a second one starts from it (startFrom.pvc, the sha256
pinned): its loss starts near where the first ended, and its adapter differs from the first one and
from the adapter the same spec trains from scratch. A wrong pin fails before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_harness import make_config, parse_events, run_trainer, trainer_env

pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e.get("event") == "progress" and e.get("loss") is not None]


def job_yaml(path: Path, tiny_model: Path, train: Path, output_path: str, start_from: dict | None) -> Path:
    spec = {
        "baseModel": str(tiny_model),
        "dataset": {"train": {"pvc": {"claimName": "data", "path": train.name}}},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {"maxSteps": 12, "learningRate": 5e-3, "batchSize": 8, "maxSeqLength": 64,
                            "warmupRatio": 0.05},
        "output": {"pvc": {"claimName": "out", "path": output_path}},
    }
    if start_from is not None:
        spec["startFrom"] = start_from
    path.write_text(json.dumps({"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
                                "metadata": {"name": path.stem}, "spec": spec}))
    return path


def tuneop_run(job: Path, tmp_path: Path, data_dir: Path, out_dir: Path) -> tuple[int, list[dict], str]:
    env = trainer_env(tmp_path / "unused", TUNEOP_HOME=str(tmp_path / "home"), TUNEOP_PROGRESS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "tuneop.cli", "run", str(job), "--json-events", "--volume", f"data={data_dir}",
         "--volume", f"out={out_dir}"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    events = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            events.extend(parse_events(line))
    return proc.returncode, events, proc.stderr


def test_continued_training_starts_where_the_first_run_ended(tiny_model, datasets, tmp_path):
    out_dir = tmp_path / "out"
    data_dir = datasets["pc_train"].parent
    # 1. from scratch, 30 steps (the trainer command, as in the pod)
    first = run_trainer(make_config(tmp_path / "first.json", tiny_model, datasets["pc_train"], out_dir / "first"))
    assert first.rc == 0, first.stderr[-3000:]
    first_losses = losses(first.events)
    first_adapter = out_dir / "first" / "adapter"
    first_sha = first.termination["adapter"]["sha256"]
    assert first_sha == sha256(first_adapter / "adapter_model.safetensors")

    # 2. continued from it with `tuneop run`: startFrom.pvc on the same volume, sha256 pinned
    start = {"pvc": {"claimName": "out", "path": "first/adapter", "sha256": first_sha}}
    rc, events, stderr = tuneop_run(job_yaml(tmp_path / "second.yaml", tiny_model, datasets["pc_train"], "second",
                                             start), tmp_path, data_dir, out_dir)
    assert rc == 0, stderr[-3000:]
    begin = next(e for e in events if e.get("event") == "start")
    assert begin["startedFrom"] == {"location": "pvc://out/first/adapter", "sha256": first_sha}
    second_losses = losses(events)
    # it starts near where the first run ended, far below where the first one started
    assert second_losses[0] < 0.5 * first_losses[0], (first_losses, second_losses)
    assert second_losses[0] < first_losses[-1] * 2 + 0.05, (first_losses, second_losses)
    done = next(e for e in events if e.get("event") == "done")
    assert done["startedFrom"]["sha256"] == first_sha
    second_adapter = out_dir / "second" / "adapter"
    manifest = json.loads((second_adapter / "tuneop-manifest.json").read_text())
    assert manifest["startedFrom"] == {"location": "pvc://out/first/adapter", "sha256": first_sha}
    second_sha = sha256(second_adapter / "adapter_model.safetensors")
    # the starting adapter is untouched
    assert sha256(first_adapter / "adapter_model.safetensors") == first_sha

    # 3. the same spec from scratch: another adapter, a higher first loss
    rc, scratch_events, stderr = tuneop_run(job_yaml(tmp_path / "third.yaml", tiny_model, datasets["pc_train"],
                                                     "third", None), tmp_path, data_dir, out_dir)
    assert rc == 0, stderr[-3000:]
    third_sha = sha256(out_dir / "third" / "adapter" / "adapter_model.safetensors")
    assert len({first_sha, second_sha, third_sha}) == 3
    assert second_losses[0] < 0.5 * losses(scratch_events)[0]
    print(f"first run: loss {first_losses[0]:.3f} -> {first_losses[-1]:.3f}; continued: {second_losses[0]:.3f} -> "
          f"{second_losses[-1]:.3f}; same spec from scratch: {losses(scratch_events)[0]:.3f} -> "
          f"{losses(scratch_events)[-1]:.3f}")
    assert next(e for e in scratch_events if e.get("event") == "start").get("startedFrom") is None


def test_a_changed_starting_adapter_fails_before_anything_is_written(tiny_model, datasets, tmp_path):
    out_dir = tmp_path / "out"
    first = run_trainer(make_config(tmp_path / "first.json", tiny_model, datasets["pc_train"], out_dir / "first",
                                    hyperparameters={"maxSteps": 2}))
    assert first.rc == 0, first.stderr[-3000:]
    cfg = make_config(tmp_path / "second.json", tiny_model, datasets["pc_train"], out_dir / "second",
                      startFrom={"pvc": {"claimName": "out", "path": "first/adapter", "sha256": "0" * 64}})
    doc = json.loads(cfg.read_text())
    doc["startFrom"] = {"path": str(out_dir / "first" / "adapter"), "location": "pvc://out/first/adapter",
                        "sha256": "0" * 64}
    cfg.write_text(json.dumps(doc))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = run_trainer(cfg, env={"TMPDIR": str(scratch)})
    assert run.rc == 2
    assert not list(scratch.glob("tuneop-start-*"))
    assert run.termination["reason"] == "ConfigInvalid"
    assert "spec.startFrom" in run.termination["message"] and "0" * 64 in run.termination["message"]
    assert not (out_dir / "second").exists()
    assert not run.of("start")

    # a spec.startFrom the job config does not resolve is refused too (never a silent fresh training)
    del doc["startFrom"]
    cfg.write_text(json.dumps(doc))
    run = run_trainer(cfg)
    assert run.rc == 2 and "spec.startFrom: not resolved" in run.termination["message"]


def test_a_trainer_checkpoint_directory_is_loaded_as_the_adapter(tiny_model, datasets, tmp_path):
    """A checkpoint-N directory: its adapter weights are loaded (optimizer and schedule start fresh);
    without a pinned sha256 the trainer reports the one it loaded."""
    out_dir = tmp_path / "out"
    first = run_trainer(make_config(tmp_path / "first.json", tiny_model, datasets["pc_train"], out_dir / "first",
                                    hyperparameters={"maxSteps": 4}))
    assert first.rc == 0, first.stderr[-3000:]
    checkpoint = sorted((out_dir / "first" / "checkpoints").glob("*/checkpoint-*"))[-1]
    assert (checkpoint / "optimizer.pt").exists()  # a real Trainer checkpoint
    rel = checkpoint.relative_to(out_dir).as_posix()
    cfg = make_config(tmp_path / "second.json", tiny_model, datasets["pc_train"], out_dir / "second",
                      hyperparameters={"maxSteps": 2}, startFrom={"pvc": {"claimName": "out", "path": rel}})
    doc = json.loads(cfg.read_text())
    doc["startFrom"] = {"path": str(checkpoint), "location": f"pvc://out/{rel}"}
    cfg.write_text(json.dumps(doc))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = run_trainer(cfg, env={"TMPDIR": str(scratch)})
    assert run.rc == 0, run.stderr[-3000:]
    assert not list(scratch.glob("tuneop-start-*"))  # the staged copy is gone
    loaded = sha256(checkpoint / "adapter_model.safetensors")
    assert run.one("start")["startedFrom"] == {"location": f"pvc://out/{rel}", "sha256": loaded}
    assert run.one("start")["resumed_from"] is None  # not a resume: a new training from those weights
    assert run.termination["startedFrom"]["sha256"] == loaded
    assert run.termination["metrics"]["steps"] == 2
