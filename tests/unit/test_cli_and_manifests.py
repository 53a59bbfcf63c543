from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneop import quickstart
from tuneop.cli import main, summary_table
from tuneop.jobconfig import local_pvc_resolver, resolve
from tuneop.manifests import ManifestError, load_finetunejob

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "examples" / "quickstart"

GOOD = """\
apiVersion: tuneop.dev/v1alpha1
kind: FineTuneJob
metadata: {name: t}
spec:
  baseModel: m
  dataset:
    train: {pvc: {claimName: data, path: train.jsonl}}
    test: {configMap: {name: cm, key: test.jsonl}}
  output: {pvc: {claimName: out, path: run1}}
"""


def test_bad_yaml_errors_name_field_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD.replace("  baseModel: m\n", "  baseModel: m\n  adapter: {type: lora, rank: 4}\n")
                 .replace("output: {pvc: {claimName: out, path: run1}}", "output: {pvc: {claimName: out, path: /abs}}"))
    with pytest.raises(ManifestError) as exc:
        load_finetunejob(p)
    msg = str(exc.value)
    assert f"{p}:6: spec.adapter.rank: unknown field" in msg
    assert f"{p}:10: spec.output.pvc" in msg and "relative" in msg


def test_wrong_api_version_and_missing_kind(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(GOOD.replace("v1alpha1", "v1"))
    with pytest.raises(ManifestError, match="apiVersion must be tuneop.dev/v1alpha1"):
        load_finetunejob(p)
    p.write_text("kind: ConfigMap\n")
    with pytest.raises(ManifestError, match="no FineTuneJob"):
        load_finetunejob(p)


def test_local_resolution_maps_claims_to_directories(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(GOOD)
    (tmp_path / "volumes" / "data").mkdir(parents=True)
    job = load_finetunejob(p)
    pvc = local_pvc_resolver(tmp_path, {"out": str(tmp_path / "elsewhere")}, tmp_path / "scratch")
    cfg = resolve({"name": "t", "namespace": "ns", "generation": 3}, job["spec"], pvc_dir=pvc,
                  configmap_dir=lambda n: f"/cm/{n}")
    assert cfg["paths"]["train"] == str(tmp_path / "volumes" / "data" / "train.jsonl")
    assert cfg["paths"]["output"] == str(tmp_path / "elsewhere" / "run1")
    assert cfg["paths"]["test"] == "/cm/cm/test.jsonl"
    assert cfg["paths"]["validation"] is None
    assert cfg["metadata"] == {"name": "t", "namespace": "ns", "generation": 3}
    assert cfg["spec"]["hyperparameters"]["learningRate"] == 2e-4  # defaults filled in


def test_pod_resolution_uses_mount_layout(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(GOOD)
    cfg = resolve({"name": "t"}, load_finetunejob(p)["spec"])
    assert cfg["paths"]["train"] == "/mnt/pvc/data/train.jsonl"
    assert cfg["paths"]["test"] == "/mnt/configmap/cm/test.jsonl"
    assert cfg["paths"]["output"] == "/mnt/pvc/out/run1"


def test_quickstart_data_is_reproducible_and_disjoint(tmp_path):
    paths = quickstart.write(tmp_path)
    for split, path in paths.items():
        committed = QS / "volumes" / "quickstart-data" / f"{split}.jsonl"
        assert path.read_text() == committed.read_text(), "regenerate with `tuneop quickstart-data`"
    data = quickstart.generate()
    train = {r["prompt"][1]["content"] for r in data["train"]}
    assert not train & {r["prompt"][1]["content"] for r in data["test"]}
    answers = [json.loads(r["completion"][0]["content"]) for r in data["test"]]
    assert {a["intent"] for a in answers} == set(quickstart.INTENTS)
    assert any(a["order"] is None for a in answers) and any(a["order"] for a in answers)


def test_validate_command(tmp_path, capsys):
    assert main(["validate", str(QS / "finetune.yaml")]) == 0
    out = capsys.readouterr().out
    assert "train: 240 rows" in out and "test: 60 rows" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    assert main(["validate", str(bad)]) == 1
    assert "line 2" in capsys.readouterr().out


def test_validate_refuses_what_run_would_refuse(tmp_path, capsys):
    """Missing local base model file or data files: rc 1, each named by its field (not "skipped")."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    spec = GOOD.replace("baseModel: m", "baseModel: ./models/missing.gguf")
    job = tmp_path / "job.yaml"
    job.write_text(spec)
    rc = main(["validate", str(job), "--volume", f"data={tmp_path / 'data'}"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "baseModel: base model file ./models/missing.gguf does not exist" in out
    assert "dataset.test: " in out and "does not exist (configMap cm" in out
    assert "train: 1 rows" in out or "train: 1 row" in out
    assert "dataset.train" not in out
    # a missing PVC file names the claim and how to map it
    (tmp_path / "data" / "train.jsonl").unlink()
    assert main(["validate", str(job), "--volume", f"data={tmp_path / 'data'}"]) == 1
    assert "--volume data=DIR" in capsys.readouterr().out
    # the spec alone is valid
    assert main(["validate", str(job), "--spec-only"]) == 0
    # a hub id is not a local file: nothing to refuse about it
    job.write_text(GOOD.replace("baseModel: m", "baseModel: Qwen/Qwen3-8B"))
    main(["validate", str(job)])
    assert "baseModel" not in capsys.readouterr().out


def test_summary_table_reports_before_and_after():
    events = {
        "start": {"model": "pkg://m"},
        "progress": {"step": 50, "loss": 0.1234},
        "done": {
            "adapter": {"path": "/o/adapter", "sha256": "ab" * 32},
            "evaluation": {"metric": "exact_match", "samples": 80, "base": 0.0, "adapter": 0.9375},
            "metrics": {"train_loss": 0.5, "train_runtime": 125.2, "steps": 50},
        },
    }
    table = summary_table(events, 200)
    assert "exact match (80 test rows)" in table
    assert "0.0%" in table and "93.8%" in table
    assert "2m05s" in table and "3m20s" in table
    assert "/o/adapter" in table


def test_operator_refuses_bad_workload_defaults_before_starting(capsys, monkeypatch) -> None:
    import tuneop.handlers as h

    monkeypatch.setattr(h, "run_operator", lambda **kw: pytest.fail("must not start"))
    assert main(["operator", "--workload-defaults", '{"trainer": {"nodeselector": {}}}']) == 2
    assert "trainer.nodeselector: unknown field" in capsys.readouterr().err
    started = {}
    monkeypatch.setattr(h, "run_operator", lambda **kw: started.update(kw) or 0)
    monkeypatch.setenv("TUNEOP_WORKLOAD_DEFAULTS", '{"vllm": {"memory": "8Gi"}}')
    assert main(["operator", "--metrics-port", "0"]) == 0
    assert started["workload_defaults"] == {"vllm": {"memory": "8Gi"}}


def test_run_refuses_a_start_from_another_finetunejob_and_resolves_a_local_adapter(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD + "  startFrom: {fineTuneJob: {name: earlier}}\n")
    assert main(["run", str(job)]) != 0
    err = capsys.readouterr().err
    assert "spec.startFrom.fineTuneJob" in err and "startFrom.pvc" in err and "--volume" in err
    # startFrom.pvc maps its claim like any other volume
    spec = load_finetunejob_spec(GOOD + "  startFrom: {pvc: {claimName: old, path: run0/adapter}}\n", tmp_path)
    doc = resolve({"name": "t"}, spec, pvc_dir=local_pvc_resolver(tmp_path, {"old": str(tmp_path / "o")}, tmp_path))
    assert doc["startFrom"] == {"path": str(tmp_path / "o" / "run0" / "adapter"), "location": "pvc://old/run0/adapter"}


def load_finetunejob_spec(text: str, tmp_path: Path):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return load_finetunejob(p)["spec"]


def test_run_prints_the_cost_estimate_and_refuses_over_max_cost(tmp_path, capsys, monkeypatch):
    """`tuneop run --gpu-hourly-price`: the estimate the operator would show, from the local train
    file; spec.maxCostUSD under it: rc 2 and no trainer started."""
    (tmp_path / "data").mkdir()
    rows = "".join(json.dumps({"prompt": "x" * 400, "completion": "y" * 400}) + "\n" for _ in range(50))
    (tmp_path / "data" / "train.jsonl").write_text(rows)
    spec = GOOD.replace("baseModel: m", "baseModel: Qwen/Qwen3-8B").replace(
        "    test: {configMap: {name: cm, key: test.jsonl}}\n", "").replace(
        "  output:", "  maxCostUSD: 0.01\n  output:")
    job = tmp_path / "job.yaml"
    job.write_text(spec)
    monkeypatch.setenv("TUNEOP_HOME", str(tmp_path / "home"))
    started = []
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: started.append(a) or pytest.fail("trainer started"))
    rc = main(["run", str(job), "--volume", f"data={tmp_path / 'data'}", "--gpu-hourly-price", "10000"])
    err = capsys.readouterr().err
    assert rc == 2 and not started
    assert "tuneop: cost estimate $" in err
    assert "CostLimitExceeded" in err and "$0.01" in err and "~10,000 dataset tokens" in err
    assert main(["run", str(job), "--gpu-hourly-price", "nvidia.com/gpu"]) == 2 and not started
    assert "--gpu-hourly-price: 'nvidia.com/gpu': expected RESOURCE=USD_PER_HOUR" in capsys.readouterr().err
