"""spec.startFrom: the schema, the pure decision (finetunejob/startfrom.py), both reducers around it,
the trainer's side of the job config and fingerprint. No cluster."""
from __future__ import annotations

import json
from typing import Any, Optional

import celpy
import pytest
from pydantic import ValidationError

from tuneop.api.crdgen import all_crds
from tuneop.api.finetunejob import parse_spec
from tuneop.backends import registered as backends
from tuneop.backends.together import client as T
from tuneop.finetunejob import builders as b
from tuneop.finetunejob import reconcile as s
from tuneop.finetunejob import startfrom as sf
from tuneop.finetunejob.handlers import StartWaiters
from tuneop.jobconfig import resolve
from tuneop.trainer import config as C
from tuneop.trainer import startfrom as TSF
from tuneop.trainer.errors import TrainerError

NOW = "2026-01-01T00:00:00Z"
SHA = "a" * 64
OTHER_SHA = "c" * 64
TOGETHER = {"apiKeySecretRef": {"name": "together", "key": "api-key"}, "model": "org/m-Reference"}


def spec_dict(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": "Qwen/Qwen3-8B",
        "dataset": {"train": {"configMap": {"name": "news-data", "key": "train.jsonl"}}},
        "output": {"pvc": {"claimName": "adapters", "path": "news-v2"}},
    }
    base.update(extra)
    return base


def ftj(name: str = "news-v2", status: Optional[dict[str, Any]] = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": f"u-{name}", "generation": 1},
        "spec": spec_dict(**extra),
    }
    if status is not None:
        out["status"] = status
    return out


def source(phase: str = "Succeeded", *, backend: str = "kubernetes", base: str = "Qwen/Qwen3-8B",
           sha: str = SHA, reason: Optional[str] = None, generation: int = 1) -> dict[str, Any]:
    extra: dict[str, Any] = {"baseModel": base, "output": {"pvc": {"claimName": "adapters", "path": "news"}}}
    if backend == "together":
        extra.update(backend="together", together=TOGETHER)
    src = ftj("news", **extra)
    src["metadata"]["generation"] = generation
    status: dict[str, Any] = {"phase": phase, "observedGeneration": 1, "reason": reason or phase}
    if phase == "Succeeded":
        status["adapter"] = {"location": "pvc://adapters/news/adapter", "sha256": sha}
        if backend == "together":
            status["together"] = {"jobId": "ft-123"}
    src["status"] = status
    return src


START_JOB = {"fineTuneJob": {"name": "news"}}


def decide(body: dict[str, Any], start_from_job: Optional[dict[str, Any]] = None, **obs: Any) -> s.Decision:
    return backends.reconcile(body, s.Observed(start_from_job=start_from_job, **obs), image="img", now=NOW)


def created(d: s.Decision, kind: str) -> list[dict[str, Any]]:
    return [o for o in d.create if o["kind"] == kind]


# ---------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("start_from, backend, message", [
    ({}, "kubernetes", "exactly one of fineTuneJob, pvc or togetherCheckpoint"),
    ({**START_JOB, "togetherCheckpoint": "ft-1"}, "together", "exactly one"),
    ({"togetherCheckpoint": "ft-1"}, "kubernetes", "startFrom.togetherCheckpoint requires backend together"),
    ({"pvc": {"claimName": "a", "path": "../x"}}, "kubernetes", "without '..'"),
    ({"pvc": {"claimName": "a", "sha256": "nothex"}}, "kubernetes", "sha256"),
])
def test_schema_refuses(start_from, backend, message):
    extra: dict[str, Any] = {"backend": backend, "startFrom": start_from}
    if backend == "together":
        extra["together"] = TOGETHER
    with pytest.raises(ValidationError, match=message):
        parse_spec(spec_dict(**extra))


def test_schema_startfrom_and_together_from_checkpoint_exclude_each_other_and_full_is_refused():
    with pytest.raises(ValidationError, match="set startFrom or together.fromCheckpoint, not both"):
        parse_spec(spec_dict(backend="together", together={**TOGETHER, "fromCheckpoint": "ft-1"},
                             startFrom={"togetherCheckpoint": "ft-2"}))
    with pytest.raises(ValidationError, match="adapter.type full"):
        parse_spec(spec_dict(adapter={"type": "full"}, startFrom=START_JOB))
    assert parse_spec(spec_dict(startFrom=START_JOB)).start_from.fine_tune_job.name == "news"


def test_crd_has_the_exclusivity_rules():
    text = json.dumps(all_crds())
    for rule in ("exactly one of fineTuneJob, pvc or togetherCheckpoint must be set",
                 "set startFrom or together.fromCheckpoint, not both",
                 "startFrom.togetherCheckpoint requires backend together"):
        assert rule in text


# ---------------------------------------------------------------------------------- the decision


def resolve_sf(body: dict[str, Any], src: Optional[dict[str, Any]], pinned: Optional[dict[str, Any]] = None) -> sf.Resolution:
    return sf.resolve(parse_spec(body["spec"]), own_name=body["metadata"]["name"], pinned=pinned, source=src, now=NOW)


def test_reference_waits_until_the_job_exists_and_succeeds():
    body = ftj(startFrom=START_JOB)
    assert "to exist" in (resolve_sf(body, None).waiting or "")
    for phase in ("Pending", "Running", "Evaluating", "Suspended"):
        res = resolve_sf(body, source(phase))
        assert res.waiting and f"phase {phase}" in res.waiting and res.pinned is None and res.invalid is None
    # Succeeded for an older generation (its spec changed since): wait for the new result
    assert resolve_sf(body, source(generation=2)).waiting


def test_reference_to_a_succeeded_job_pins_its_adapter():
    res = resolve_sf(ftj(startFrom=START_JOB), source())
    assert res.pinned == {"fineTuneJob": "news", "location": "pvc://adapters/news/adapter", "sha256": SHA,
                          "baseModel": "Qwen/Qwen3-8B", "pinnedAt": NOW}


@pytest.mark.parametrize("src, words", [
    (source("Failed", reason="DatasetInvalid"), ["spec.startFrom.fineTuneJob", "failed (DatasetInvalid)"]),
    (source(base="meta-llama/Llama-3.2-1B"), ["spec.startFrom.fineTuneJob", "meta-llama/Llama-3.2-1B", "Qwen/Qwen3-8B"]),
    (source(sha=""), ["spec.startFrom.fineTuneJob", "sha256"]),
])
def test_reference_to_a_failed_job_or_another_base_model_is_invalid(src, words):
    res = resolve_sf(ftj(startFrom=START_JOB), src)
    assert res.pinned is None and res.waiting is None
    for w in words:
        assert w in (res.invalid or "")


def test_a_job_cannot_start_from_itself_nor_write_over_its_start():
    assert "itself" in (resolve_sf(ftj("news", startFrom=START_JOB), source()).invalid or "")
    same_output = ftj(startFrom=START_JOB, output={"pvc": {"claimName": "adapters", "path": "news"}})
    assert "spec.output" in (resolve_sf(same_output, source()).invalid or "")
    pvc_over = ftj(startFrom={"pvc": {"claimName": "adapters", "path": "news-v2/adapter"}})
    assert "spec.startFrom.pvc" in (resolve_sf(pvc_over, None).invalid or "")


def test_backend_combinations():
    # together -> together: its Together job id
    tg = ftj(backend="together", together=TOGETHER, startFrom=START_JOB)
    res = resolve_sf(tg, source(backend="together"))
    assert res.pinned and res.pinned["togetherCheckpoint"] == "ft-123" and res.pinned["sha256"] == SHA
    # together -> kubernetes: refused, Together cannot read the volume
    res = resolve_sf(tg, source())
    assert "backend together continues only from a together FineTuneJob" in (res.invalid or "")
    # kubernetes -> together: the adapter its download Job wrote
    res = resolve_sf(ftj(startFrom=START_JOB), source(backend="together"))
    assert res.pinned and res.pinned["location"] == "pvc://adapters/news/adapter"
    # together with a pvc: refused naming the field
    res = resolve_sf(ftj(backend="together", together=TOGETHER, startFrom={"pvc": {"claimName": "a", "path": "x"}}), None)
    assert (res.invalid or "").startswith("spec.startFrom.pvc:")


def test_spec_only_pins():
    assert resolve_sf(ftj(), None).pinned is None
    res = resolve_sf(ftj(startFrom={"pvc": {"claimName": "old", "path": "run1/checkpoints/x/checkpoint-40",
                                            "sha256": SHA}}), None)
    assert res.pinned == {"location": "pvc://old/run1/checkpoints/x/checkpoint-40", "sha256": SHA, "pinnedAt": NOW}
    res = resolve_sf(ftj(backend="together", together={**TOGETHER, "fromCheckpoint": "ft-9:10"}), None)
    assert res.pinned == {"togetherCheckpoint": "ft-9:10", "pinnedAt": NOW}


def test_a_pin_is_kept_whatever_the_source_does_later():
    pin = {"fineTuneJob": "news", "location": "pvc://adapters/news/adapter", "sha256": SHA}
    assert resolve_sf(ftj(startFrom=START_JOB), source("Failed"), pinned=pin).pinned == pin
    assert resolve_sf(ftj(startFrom=START_JOB), source(sha=OTHER_SHA), pinned=pin).pinned == pin


def test_needs_source_only_while_nothing_is_pinned_for_the_spec():
    body = ftj(startFrom=START_JOB)
    spec = parse_spec(body["spec"])
    h = b.spec_hash(spec)
    assert sf.needs_source(spec, None, h) == "news"
    assert sf.needs_source(spec, {"specHash": h, "startedFrom": {"sha256": SHA}}, h) is None
    assert sf.needs_source(spec, {"specHash": "older", "startedFrom": {"sha256": SHA}}, h) == "news"
    assert sf.needs_source(parse_spec(ftj()["spec"]), None, h) is None


def test_parse_location():
    assert sf.parse_location("pvc://adapters/news/adapter") == ("adapters", "news/adapter")
    assert sf.parse_location("pvc://adapters") == ("adapters", "")
    for bad in ("s3://x/y", "pvc:///x", "pvc://a/../b", "pvc://a//b"):
        assert sf.parse_location(bad) is None, bad


# ---------------------------------------------------------------------------------- the reducers


def test_kubernetes_reducer_waits_without_children_then_pins_and_mounts():
    body = ftj(startFrom=START_JOB)
    d = decide(body, source("Running"), inline_datasets={"train": {"ok": True, "rows": 3, "errors": []}})
    assert d.create == [] and d.phase == "Pending" and d.status["reason"] == sf.WAITING_FOR_START
    assert "news" in d.status["message"] and d.retry_after
    assert "startedFrom" not in d.status
    assert [e["reason"] for e in d.events] == [sf.WAITING_FOR_START]
    assert s.RETRY_REASONS.count(sf.WAITING_FOR_START) == 1

    body["status"] = d.status
    d = decide(body, source(), inline_datasets={"train": {"ok": True, "rows": 3, "errors": []}})
    assert d.status["startedFrom"]["sha256"] == SHA and d.status["startedFrom"]["fineTuneJob"] == "news"
    config = json.loads(created(d, "ConfigMap")[0]["data"]["job.json"])
    assert config["startFrom"] == {"path": "/mnt/pvc/adapters/news/adapter", "location": "pvc://adapters/news/adapter",
                                   "sha256": SHA}
    [train] = created(d, "Job")
    mounts = train["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"/mnt/pvc/adapters"} <= {m["mountPath"] for m in mounts}

    # the next reconcile keeps the pin even though the source moved on (and is not needed)
    body["status"] = d.status
    d2 = decide(body, source(sha=OTHER_SHA))
    assert d2.status["startedFrom"] == d.status["startedFrom"]


def test_kubernetes_reducer_mounts_another_claim_read_only():
    body = ftj(startFrom=START_JOB, output={"pvc": {"claimName": "other", "path": "v2"}})
    d = decide(body, source(), inline_datasets={"train": {"ok": True, "rows": 3, "errors": []}})
    [train] = created(d, "Job")
    pod = train["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"other": False, "adapters": True}


def test_kubernetes_reducer_fails_naming_the_field():
    d = decide(ftj(startFrom=START_JOB), source("Failed", reason="TrainingFailed"))
    assert d.phase == "Failed" and d.status["reason"] == s.SPEC_INVALID
    assert d.status["message"].startswith("spec.startFrom.fineTuneJob:") and d.create == []
    assert d.events[0]["type"] == "Warning"


def test_a_new_spec_drops_the_old_pin():
    body = ftj(startFrom=START_JOB, status={"specHash": "older", "startedFrom": {"fineTuneJob": "news", "sha256": OTHER_SHA}})
    d = decide(body, source())
    assert d.status["startedFrom"]["sha256"] == SHA


def test_pvc_without_sha256_takes_the_trainers_word_on_success():
    body = ftj(startFrom={"pvc": {"claimName": "old", "path": "a"}})
    d = decide(body, None, inline_datasets={"train": {"ok": True, "rows": 3, "errors": []}})
    assert d.status["startedFrom"]["location"] == "pvc://old/a" and "sha256" not in d.status["startedFrom"]
    assert ("PersistentVolumeClaim", "old", None) in s.dependencies(parse_spec(body["spec"]))
    body["status"] = d.status
    train = created(d, "Job")[0]
    train["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    message = json.dumps({"event": "done", "adapter": {"sha256": SHA}, "startedFrom": {"location": "pvc://old/a",
                                                                                        "sha256": OTHER_SHA}})
    pod = {"metadata": {"name": "p", "labels": {"batch.kubernetes.io/job-name": train["metadata"]["name"]}},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": b.TRAINER_CONTAINER, "state": {
               "terminated": {"exitCode": 0, "message": message, "finishedAt": NOW}}}]}}
    d = decide(body, None, training_job=train, training_pods=[pod], config_map=created(d, "ConfigMap")[0])
    assert d.phase == "Succeeded" and d.status["startedFrom"]["sha256"] == OTHER_SHA


def test_together_reducer_waits_then_creates_from_the_pinned_job_id():
    body = ftj(backend="together", together=TOGETHER, startFrom=START_JOB)
    d = decide(body, source("Running", backend="together"))
    assert d.status["reason"] == sf.WAITING_FOR_START and d.create == [] and d.calls == []
    d = decide(body, source("Failed", backend="together"))
    assert d.status["reason"] == s.SPEC_INVALID and "spec.startFrom.fineTuneJob" in d.status["message"]
    d = decide(body, source(backend="together"))
    assert d.status["startedFrom"]["togetherCheckpoint"] == "ft-123"
    params = T.create_params(parse_spec(body["spec"]), training_file="file-1", validation_file=None, suffix="x",
                             from_checkpoint=d.status["startedFrom"]["togetherCheckpoint"])
    assert params["from_checkpoint"] == "ft-123" and "model" not in params
    assert T.unsupported(parse_spec(body["spec"])) == []


# ---------------------------------------------------------------------------------- trainer side


def test_job_config_and_trainer_parse():
    spec = parse_spec(spec_dict(startFrom={"pvc": {"claimName": "old", "path": "a/adapter", "sha256": SHA}}))
    doc = resolve({"name": "x"}, spec, pvc_dir=lambda c: f"/local/{c}")
    assert doc["startFrom"] == {"path": "/local/old/a/adapter", "location": "pvc://old/a/adapter", "sha256": SHA}
    doc["paths"]["train"] = "/t.jsonl"
    cfg = C.parse_config(doc)
    assert cfg.start_from == C.StartFromConfig(path="/local/old/a/adapter", location="pvc://old/a/adapter", sha256=SHA)
    # a reference the config does not resolve: refused, never a silent fresh training
    ref = resolve({"name": "x"}, parse_spec(spec_dict(startFrom=START_JOB)))
    ref["paths"]["train"] = "/t.jsonl"
    assert "startFrom" not in ref
    with pytest.raises(TrainerError, match="spec.startFrom: not resolved"):
        C.parse_config(ref)
    assert C.parse_config({**doc, "startFrom": None, "spec": spec_dict()}).start_from is None


def test_fingerprint_counts_the_starting_adapter_by_content():
    spec = parse_spec(spec_dict()).to_dict()
    data = {"train": "t", "validation": None}
    plain = C.training_fingerprint(spec, data)
    assert C.training_fingerprint(spec, data, None) == plain  # jobs without startFrom keep their fingerprint
    a = C.training_fingerprint(spec, data, SHA)
    assert a != plain and a != C.training_fingerprint(spec, data, OTHER_SHA)
    # where the adapter lies does not count, its content does
    moved = parse_spec(spec_dict(startFrom={"pvc": {"claimName": "elsewhere", "path": "b"}})).to_dict()
    assert C.training_fingerprint(moved, data, SHA) == a


# ---------------------------------------------------------------------------------- glue's index


def test_start_waiters_reconcile_on_the_awaited_jobs_end():
    w = StartWaiters()
    waiting = {"reason": sf.WAITING_FOR_START, "phase": "Pending"}
    spec = {"startFrom": {"fineTuneJob": {"name": "news"}}}
    assert w.update("team-a", "news-v2", waiting, spec) == []
    assert w.update("team-a", "news", {"phase": "Running"}, {}) == []
    assert w.update("team-b", "news", {"phase": "Succeeded"}, {}) == []  # another namespace
    assert w.update("team-a", "news", {"phase": "Succeeded"}, {}) == ["news-v2"]
    assert w.update("team-a", "news", None, {}) == ["news-v2"]  # deleted
    w.update("team-a", "news-v2", {"reason": "TrainingStarted", "phase": "Running"}, spec)
    assert w.update("team-a", "news", {"phase": "Failed"}, {}) == []


def _rules(schema: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["rule"], r["message"]) for r in schema.get("x-kubernetes-validations") or []]


@pytest.mark.parametrize("spec", [
    spec_dict(startFrom=START_JOB),
    spec_dict(startFrom={"pvc": {"claimName": "a", "path": "b"}}),
    spec_dict(startFrom={}),
    spec_dict(startFrom={**START_JOB, "pvc": {"claimName": "a"}}),
    spec_dict(startFrom={"togetherCheckpoint": "ft-1"}),
    spec_dict(backend="together", together=TOGETHER, startFrom={"togetherCheckpoint": "ft-1"}),
    spec_dict(backend="together", together={**TOGETHER, "fromCheckpoint": "ft-1"}, startFrom=START_JOB),
    spec_dict(backend="together", together={**TOGETHER, "fromCheckpoint": "ft-1"}),
    spec_dict(adapter={"type": "full"}, startFrom=START_JOB),
])
def test_cel_rules_agree_with_the_model(spec):
    """The CRD's rules, as the API server evaluates them (celpy), accept exactly what the model accepts."""
    crd = all_crds()["finetunejobs.yaml"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    env = celpy.Environment()
    cel_ok = True
    for node, value in ((schema, spec), (schema["properties"]["startFrom"], spec.get("startFrom"))):
        if value is None:
            continue
        for rule, _ in _rules(node):
            if not bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)})):
                cel_ok = False
    try:
        parse_spec(spec)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert cel_ok == model_ok


def test_a_config_map_left_by_a_reconcile_that_died_keeps_its_pin():
    """The ConfigMap of this spec was created with a pin, the status write was lost, and the source has a new
    adapter since: the status takes the ConfigMap's pin (what the pods load), not the source's new one."""
    body = ftj(startFrom=START_JOB)
    first = decide(body, source(), inline_datasets={"train": {"ok": True, "rows": 3, "errors": []}})
    cm = created(first, "ConfigMap")[0]
    d = decide(body, source(sha=OTHER_SHA), config_map=cm, inline_datasets={"train": {"ok": True, "rows": 3, "errors": []}})
    assert d.status["startedFrom"]["sha256"] == SHA
    assert [p for p in d.patch if p["kind"] == "ConfigMap"] == []
    # a ConfigMap of another spec does not count
    cm["metadata"]["annotations"][b.SPEC_HASH_ANNOTATION] = "older"
    d = decide(body, source(sha=OTHER_SHA), config_map=cm, inline_datasets={"train": {"ok": True, "rows": 3, "errors": []}})
    assert d.status["startedFrom"]["sha256"] == OTHER_SHA


def test_trainer_refuses_to_start_from_its_own_output_and_an_adapter_of_another_base(tmp_path):
    own = tmp_path / "out" / "adapter"
    own.mkdir(parents=True)
    with pytest.raises(TrainerError, match="spec.output"):
        TSF.check_not_output(C.StartFromConfig(path=str(own), location="pvc://out/adapter"), str(tmp_path / "out"))
    TSF.check_not_output(C.StartFromConfig(path=str(own), location="pvc://out/adapter"), str(tmp_path / "other"))
    (own / "tuneop-manifest.json").write_text(json.dumps({"baseModel": "org/a"}))
    start = C.StartFromConfig(path=str(own), location="pvc://out/adapter")
    with pytest.raises(TrainerError, match="trained on 'org/a'"):
        TSF.check_base_model(start, "org/b")
    TSF.check_base_model(start, "org/a")
    # not an adapter directory: named, nothing staged
    with pytest.raises(TrainerError, match="no adapter_config.json, adapter_model.safetensors"):
        TSF.staged_sha256(start, scratch=str(tmp_path))
    assert not list(tmp_path.glob("tuneop-start-*"))
