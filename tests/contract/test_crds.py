"""The CRDs are generated from the models, and every shipped YAML passes both."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tuneop.api import crdcheck
from tuneop.api.crdgen import all_crds, render_yaml
from tuneop.api.finetunejob import FineTuneJobSpec

ROOT = Path(__file__).resolve().parents[2]
CRDS = all_crds()
FTJ_CRD = CRDS["finetunejobs.yaml"]


@pytest.mark.parametrize("fname", sorted(CRDS))
def test_crd_files_match_the_models(fname):
    path = ROOT / "crds" / fname
    assert path.exists(), f"crds/{fname} missing: run `tuneop crds --out crds`"
    assert path.read_text() == render_yaml(CRDS[fname]), (
        f"crds/{fname} drifted from the pydantic models: run `tuneop crds --out crds`"
    )


def test_no_stray_crd_files():
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(CRDS)


def _our_documents():
    for path in sorted(ROOT.glob("examples/**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("apiVersion", "").startswith("tuneop.dev/"):
                yield path.relative_to(ROOT), doc


DOCS = list(_our_documents())


def test_examples_exist():
    kinds = {d["kind"] for _, d in DOCS}
    assert "FineTuneJob" in kinds


@pytest.mark.parametrize("path,doc", DOCS, ids=[f"{p}:{d['metadata']['name']}" for p, d in DOCS])
def test_example_passes_crd_and_model(path, doc):
    crd = next(c for c in CRDS.values() if c["spec"]["names"]["kind"] == doc["kind"])
    assert crdcheck.check(doc, crd) == []
    if doc["kind"] == "FineTuneJob":
        FineTuneJobSpec.model_validate(doc["spec"])


BASE = {
    "apiVersion": "tuneop.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "x"},
    "spec": {
        "baseModel": "Qwen/Qwen3-0.6B",
        "dataset": {"train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}},
        "output": {"pvc": {"claimName": "out", "path": "x"}},
    },
}


BAD = {
    "qlora on together": [("adapter", {"type": "qlora"}), ("backend", "together"),
                          ("together", {"apiKeySecretRef": {"name": "t", "key": "k"}})],
    "together without block": [("backend", "together")],
    "two train sources": [("dataset.train", {"pvc": {"claimName": "d", "path": "a"}, "url": "https://x/y"})],
    "no train source": [("dataset.train", {})],
    "validation and split": [("dataset.validation", {"url": "https://x/v.jsonl"}), ("dataset.validationSplit", 0.1)],
    "dpo on text": [("method", "dpo"), ("dataset.format", "text")],
    "absolute pvc path": [("output", {"pvc": {"claimName": "o", "path": "/etc"}})],
    "dotdot pvc path": [("output", {"pvc": {"claimName": "o", "path": "a/../../b"}})],
    "negative lr": [("hyperparameters", {"learningRate": -1})],
    "zero rank": [("adapter", {"r": 0})],
    "unknown method": [("method", "ppo")],
    "unknown field": [("adapter", {"rank": 8})],
    "non-http url": [("dataset.train", {"url": "file:///etc/passwd"})],
    "split too large": [("dataset.validationSplit", 0.9)],
    "layers with full": [("adapter", {"type": "full", "layers": [0]})],
    "layer index out of range": [("adapter", {"layers": [5000]})],
    "wandb online without a key": [("tracking", {"wandb": {"project": "p"}})],
    "mlflow username without password": [("tracking", {"mlflow": {
        "trackingUri": "http://m", "experiment": "e", "credentialsSecretRef": {"name": "c", "usernameKey": "u"}}})],
    "mlflow credentials without keys": [("tracking", {"mlflow": {
        "trackingUri": "http://m", "experiment": "e", "credentialsSecretRef": {"name": "c"}}})],
    "mlflow uri with credentials": [("tracking", {"mlflow": {"trackingUri": "https://u:p@m", "experiment": "e"}})],
    "mlflow uri not http": [("tracking", {"mlflow": {"trackingUri": "file:///mlruns", "experiment": "e"}})],
}


def _apply(changes):
    obj = copy.deepcopy(BASE)
    for path, value in changes:
        obj = _merge(obj, path, value)
    return obj


def _merge(obj, path, value):
    node = obj["spec"]
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return obj


def test_minimal_spec_is_accepted_by_both():
    assert crdcheck.check(BASE, FTJ_CRD) == []
    FineTuneJobSpec.model_validate(BASE["spec"])


@pytest.mark.parametrize("case", sorted(BAD))
def test_schema_and_models_reject_the_same_bad_specs(case):
    obj = _apply(BAD[case])
    errors = crdcheck.check(obj, FTJ_CRD)
    assert errors, f"the CRD accepts {case}"
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate(obj["spec"])


def test_cel_messages_name_the_problem():
    errors = crdcheck.check(_apply(BAD["qlora on together"]), FTJ_CRD)
    assert any("qlora requires backend kubernetes" in e for e in errors)
    errors = crdcheck.check(_apply(BAD["unknown field"]), FTJ_CRD)
    assert errors == ['spec.adapter.rank: unknown field "rank"']
    # a CEL rule, not a pattern: the API server's message does not quote the URL's password
    errors = crdcheck.check(_apply([("tracking", {"mlflow": {"trackingUri": "https://bob:hunter2@m", "experiment": "e"}})]),
                            FTJ_CRD)
    assert errors and all("hunter2" not in e for e in errors) and any("without credentials" in e for e in errors)


def test_crd_has_kubectl_niceties():
    v = FTJ_CRD["spec"]["versions"][0]
    assert FTJ_CRD["spec"]["names"]["shortNames"] == ["ftj"]
    assert v["subresources"] == {"status": {}}
    cols = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert cols["Phase"] == ".status.phase" and cols["Loss"] == ".status.progress.loss"
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    # descriptions become `kubectl explain` text
    assert spec["properties"]["baseModel"]["description"]
    assert spec["properties"]["adapter"]["properties"]["type"]["enum"] == ["lora", "qlora", "full"]
    # defaults of nested objects are materialised so the API server fills them in
    assert spec["properties"]["hyperparameters"]["default"]["learningRate"] == 2.0e-4


def test_field_reference_matches_the_models():
    from tuneop.api.reference import render

    path = ROOT / "docs" / "reference.md"
    assert path.read_text() == render(), "docs/reference.md drifted: run `make crds`"
    text = path.read_text()
    assert "| `dataset.train.pvc.claimName` | string | yes |" in text
    assert "rule: qlora requires backend kubernetes" not in text  # spec-level rules are listed once, above
    assert "adapter.type qlora requires backend kubernetes" in text
