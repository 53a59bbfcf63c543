"""What the operator would create for every example passes the Kubernetes schemas (strict)."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tuneop.backends.registered import children as build_all
from tuneop.cli import main

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = kubernetes_validate.latest_version()


def _ftj_examples():
    for path in sorted(ROOT.glob("examples/**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                yield pytest.param(path, doc, id=f"{path.relative_to(ROOT)}:{doc['metadata']['name']}")


@pytest.mark.parametrize("path,doc", list(_ftj_examples()))
def test_children_validate_against_kubernetes_schemas(path, doc):
    body = {**doc, "metadata": {"namespace": "ns", "uid": "u-1", "generation": 1, **doc["metadata"]}}
    manifests = build_all(body, image="registry.example.com/tuneop/trainer:1")
    kinds = [m["kind"] for m in manifests]
    assert "ConfigMap" in kinds and "Job" in kinds
    for m in manifests:
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)
        assert m["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
        assert m["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tuneop"


def test_render_command_prints_the_same_manifests(capsys):
    assert main(["render", str(ROOT / "examples/finetune-qlora-multinode.yaml"), "--namespace", "team-a"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    assert len(by_kind["Service"]) == 1 and by_kind["Service"][0]["spec"]["clusterIP"] == "None"
    train = next(j for j in by_kind["Job"] if j["metadata"]["name"] == "news-70b-train")
    assert train["spec"]["completionMode"] == "Indexed" and train["spec"]["completions"] == 2
    pod = train["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "torchrun" in " ".join(pod["containers"][0]["command"] + pod["containers"][0].get("args", []))


def test_together_upload_and_download_jobs_validate_strictly():
    from tuneop.backends.together import builders as tb

    doc = yaml.safe_load((ROOT / "examples/finetune-together.yaml").read_text())
    body = {**doc, "metadata": {"namespace": "ns", "uid": "u-1", "generation": 1, **doc["metadata"]}}
    for m in (
        tb.build_upload_job(body, image="registry.example.com/tuneop/trainer:1", base_url="https://api.together.xyz"),
        tb.build_download_job(body, job_id="ft-8f4c2a", image="registry.example.com/tuneop/trainer:1"),
    ):
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)
