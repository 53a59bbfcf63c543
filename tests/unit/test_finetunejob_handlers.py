"""Pure pieces of finetunejob/handlers.py: which Job events are already accounted for, the
dataset check of ConfigMap datasets, concurrent reads."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tuneop import kube
from tuneop.backends import base
from tuneop.finetunejob import handlers as h


def job(name: str, rv: Any, **status: Any) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "resourceVersion": rv},
            "status": status}


def test_seen_jobs_match_name_and_what_a_reconcile_reads() -> None:
    async def main() -> None:
        seen = h.SeenJobs()
        assert not seen.seen("ns", "news", job("news-train", "5"))
        seen.remember("ns", "news", [None, job("news-train", "5", active=1), {"metadata": {"name": "x"}}])
        assert seen.seen("ns", "news", job("news-train", "5", active=1))
        # the Job controller's bookkeeping since: nothing a reconcile reads changed
        assert seen.seen("ns", "news", job("news-train", "6", active=1, ready=0, startTime="t", terminating=0))
        assert not seen.seen("ns", "news", job("news-train", "6", active=1, ready=1))  # the pod is ready
        assert not seen.seen("ns", "news", job("news-train", "6", active=0, failed=1))
        assert not seen.seen("ns", "news", job("news-train", None, active=1))
        assert not seen.seen("ns", "other", job("news-train", "5", active=1))
        assert not seen.seen("ns", "news", job("x", "1"))
        # Each reconcile replaces what the previous one saw.
        seen.remember("ns", "news", [job("news-validate", "7")])
        assert not seen.seen("ns", "news", job("news-train", "5", active=1))
        assert seen.seen("ns", "news", job("news-validate", "7"))
        seen.forget("ns", "news")
        assert not seen.seen("ns", "news", job("news-validate", "7"))

    asyncio.run(main())


def test_seen_jobs_are_per_event_loop() -> None:
    seen = h.SeenJobs()

    async def remember() -> None:
        seen.remember("ns", "news", [job("news-train", "5")])

    async def check() -> bool:
        return seen.seen("ns", "news", job("news-train", "5"))

    asyncio.run(remember())
    assert asyncio.run(check()) is False  # an operator restarted in a new loop sees nothing


def test_object_locks_are_per_event_loop_even_when_a_loop_id_is_reused() -> None:
    from tuneop.glue import ObjectLocks

    locks = ObjectLocks()
    held: list[asyncio.Lock] = []

    async def take() -> None:
        lock = locks.get("ns", "news")
        assert lock is locks.get("ns", "news")  # one lock per object within a loop
        await lock.acquire()  # left held, as by a reconcile cut off when its loop closed
        held.append(lock)

    async def fresh() -> bool:
        return not locks.get("ns", "news").locked()

    asyncio.run(take())
    for _ in range(20):  # new loops, some with the id of the closed one: never its held lock
        assert asyncio.run(fresh())
    assert held[0].locked()


@pytest.mark.parametrize("rows", [3, 4000])  # in the loop, and (over the size limit) in a thread
def test_inline_dataset_check_small_and_large(rows: int) -> None:
    lines = [json.dumps({"prompt": f"q{i}" * 5, "completion": f"a{i}"}) for i in range(rows)]
    text = "\n".join(lines)
    assert (len(text) > base.INLINE_CHECK_MAX_CHARS) == (rows > 100)
    report = asyncio.run(base.check_inline_dataset(text, "auto", "configMap d/train.jsonl"))
    assert report["ok"] is True and report["rows"] == rows
    bad = asyncio.run(base.check_inline_dataset(text + '\n{"prompt": ', "auto", "configMap d/train.jsonl"))
    assert bad["ok"] is False


def test_gather_waits_for_every_read_then_raises_the_first_error() -> None:
    done = []

    async def ok(delay: float, value: int) -> int:
        await asyncio.sleep(delay)
        done.append(value)
        return value

    async def fail() -> None:
        raise kube.ApiError(500, "InternalError", "boom")

    assert asyncio.run(base.gather(ok(0.01, 1), ok(0, 2))) == [1, 2]
    with pytest.raises(kube.ApiError):
        asyncio.run(base.gather(fail(), ok(0.02, 3)))
    assert 3 in done  # the slower read finished before the error was raised


# ---------------------------------------------------------------------------------- kopf bookkeeping


def ftj_body(generation=1, observed=None, annotations=None) -> dict:
    body: dict = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
                  "metadata": {"name": "news", "namespace": "ns", "annotations": annotations or {}},
                  "spec": {"backend": "kubernetes", "baseModel": "m"}}
    if generation is not None:
        body["metadata"]["generation"] = generation
    if observed is not None:
        body["status"] = {"phase": "Running", "observedGeneration": observed}
    return body


def test_spec_handled_is_observed_generation_equal_to_generation() -> None:
    assert h.spec_handled(ftj_body(1, 1)) is True
    assert h.spec_handled(ftj_body(2, 1)) is False  # spec changed since the last reconcile
    assert h.spec_handled(ftj_body(1, None)) is False  # never reconciled
    assert h.spec_handled(ftj_body(None, 1)) is None  # no generation: kopf's annotation decides
    # An event older than this process' own status write of that generation: handled too.
    assert h.spec_handled(ftj_body(1, None), remembered=1) is True
    assert h.spec_handled(ftj_body(2, 1), remembered=1) is False


def test_observed_generations_by_uid() -> None:
    seen = h.ObservedGenerations()
    body = {"metadata": {"uid": "u1", "generation": 2}}
    assert seen.get(body) is None
    seen.remember(body, 2)
    seen.remember({"metadata": {}}, 3)  # no uid: nothing to key it by
    seen.remember({"metadata": {"uid": "u2"}}, None)
    assert seen.get(body) == 2 and seen.get({"metadata": {"uid": "u2"}}) is None
    seen.forget("u1")
    assert seen.get(body) is None


def _diffbase() -> "h.GenerationDiffBase":
    import kopf

    return h.GenerationDiffBase(kopf.AnnotationsDiffBaseStorage(prefix="tuneop.dev", key="last-handled-configuration"),
                                kinds={"FineTuneJob"})


def test_generation_diffbase_handled_object_has_no_diff_and_stores_nothing() -> None:
    import kopf
    from kopf._cogs.structs import bodies, diffs, patches

    storage = _diffbase()
    body = bodies.Body(ftj_body(1, 1))
    stale = bodies.Body(ftj_body(1, None))  # sent before the status write this process made
    remembering = h.GenerationDiffBase(storage.fallback, kinds={"FineTuneJob"}, remembered=lambda b: 1)
    assert not diffs.diff(remembering.fetch(body=stale), remembering.build(body=stale))
    assert not diffs.diff(storage.fetch(body=body), storage.build(body=body))
    patch = patches.Patch()
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    assert not patch  # no annotation, no marker: no PATCH of kopf's own
    # New (no status yet) and changed (generation ahead of the status) objects are to be handled.
    assert storage.fetch(body=bodies.Body(ftj_body(1, None))) is None
    assert storage.fetch(body=bodies.Body(ftj_body(2, 1))) is None
    # ... unless an older tuneop left its annotation: kopf then diffs against it, as before.
    legacy = ftj_body(2, 1, {"tuneop.dev/last-handled-configuration": json.dumps({"spec": {"baseModel": "old"}})})
    assert storage.fetch(body=bodies.Body(legacy)) == {"spec": {"baseModel": "old"}}
    assert isinstance(storage, kopf.DiffBaseStorage)


def test_generation_diffbase_other_kinds_and_generationless_objects_keep_the_annotation() -> None:
    from kopf._cogs.structs import bodies, patches

    storage = _diffbase()
    for raw in (dict(ftj_body(1, 1), kind="AdapterDeployment"), ftj_body(None, None)):
        body = bodies.Body(raw)
        assert storage.fetch(body=body) is None
        patch = patches.Patch()
        storage.store(body=body, patch=patch, essence=storage.build(body=body))
        assert "tuneop.dev/last-handled-configuration" in patch["metadata"]["annotations"]


def test_lone_marker_only_when_no_other_annotation_of_ours_stays() -> None:
    m = "tuneop.dev/kopf-managed"
    assert h.lone_marker("tuneop.dev", {}, {m: "yes"}) == m
    assert h.lone_marker("tuneop.dev", {"other.io/x": "1"}, {m: "yes", "tuneop.dev/reconcile": None}) == m
    assert h.lone_marker("tuneop.dev", {}, {m: "yes", "tuneop.dev/reconcile": "{}"}) is None  # a retry record
    assert h.lone_marker("tuneop.dev", {"tuneop.dev/last-handled-configuration": "{}"}, {m: "yes"}) is None
    assert h.lone_marker("tuneop.dev", {m: "yes"}, {"tuneop.dev/reconcile": None}) is None  # nothing to add
    assert h.lone_marker("tuneop.dev", {}, {}) is None


def test_progress_storage_leaves_no_trace_of_a_handler_done_at_once() -> None:
    from kopf._cogs.structs import bodies, patches

    storage = h.ProgressAnnotations(prefix="tuneop.dev")
    body = bodies.Body(ftj_body(1, None))
    patch = patches.Patch()
    storage.store(key="reconcile", record={"started": "t", "success": True}, body=body, patch=patch)
    assert patch["metadata"]["annotations"]  # the record (and kopf's marker)
    storage.purge(key="reconcile", body=body, patch=patch)
    assert not patch
    # A handler being retried keeps its record and the marker.
    patch = patches.Patch()
    storage.store(key="reconcile", record={"started": "t", "retries": 1}, body=body, patch=patch)
    storage.purge(key="other", body=body, patch=patch)
    assert set(patch["metadata"]["annotations"]) == {"tuneop.dev/reconcile", "tuneop.dev/kopf-managed"}


def test_progress_poller_tracks_running_kubernetes_jobs_only() -> None:
    poller = h.ProgressPoller()
    k8s, together = {"backend": "kubernetes"}, {"backend": "together"}
    poller.track("ns", "a", {"phase": "Running", "progress": {"step": 3}}, k8s)
    poller.track("ns", "b", {"phase": "Running"}, together)
    poller.track("ns", "c", {"phase": "Pending"}, k8s)
    poller.track("ns", "e", {"phase": "Evaluating"}, k8s)
    assert poller.running() == [("ns", "a"), ("ns", "e")]
    poller.track("ns", "a", {"phase": "Succeeded"}, k8s)
    poller.track("ns", "e", {"phase": "Succeeded"}, k8s)
    assert poller.running() == []
    poller.track("ns", "a", {"phase": "Running"}, k8s)
    poller.forget("ns", "a")
    assert poller.running() == []


def test_progress_poller_keeps_the_jobs_waiting_for_their_pods() -> None:
    poller = h.ProgressPoller()
    waiting = {"phase": "Pending", "reason": "TrainingPending",
               "conditions": [{"type": "Running", "status": "False", "reason": "TrainingPending"}]}
    poller.track("ns", "a", waiting, {"backend": "kubernetes"})
    poller.track("ns", "b", {"phase": "Pending", "reason": "DependencyMissing"}, {})  # the retry timer's
    poller.track("ns", "c", waiting, {"backend": "together"})
    assert poller.pending() == [("ns", "a")] and poller.running() == []
    poller.track("ns", "a", {"phase": "Running"}, {})
    assert poller.pending() == [] and poller.running() == [("ns", "a")]
    poller.track("ns", "a", waiting, {})
    poller.forget("ns", "a")
    assert poller.pending() == []


def test_pending_jobs_are_reconciled_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    reconciled: list[str] = []

    async def fake_reconcile(namespace: str, name: str, logger: Any, **kwargs: Any) -> bool:
        reconciled.append(name)
        if name == "bad":
            raise RuntimeError("boom")
        return True

    monkeypatch.setattr(h, "reconcile_or_report", fake_reconcile)
    waiting = {"phase": "Pending", "conditions": [{"type": "Validated", "reason": "ValidationPending"}]}

    async def main() -> None:
        poller = h.ProgressPoller()
        poller.start(3600, 0.01)
        for n in ("bad", "good"):
            poller.track("ns", n, waiting, {})
        for _ in range(200):
            if reconciled.count("good") >= 2:
                break
            await asyncio.sleep(0.01)
        await poller.stop()

    asyncio.run(main())
    assert reconciled.count("good") >= 2 and "bad" in reconciled


def test_progress_poller_polls_each_running_job_and_survives_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    polled: list[tuple[str, str, dict]] = []

    async def fake_poll(namespace: str, name: str, old: dict, logger: logging.Logger) -> None:
        polled.append((namespace, name, old))
        if name == "bad":
            raise RuntimeError("boom")

    monkeypatch.setattr(h, "poll_progress", fake_poll)

    async def main() -> None:
        poller = h.ProgressPoller(concurrency=2)
        poller.start(0.01)
        for n in ("bad", "good"):
            poller.track("ns", n, {"phase": "Running", "progress": {"step": 1}}, {})
        for _ in range(200):
            if sum(1 for p in polled if p[1] == "good") >= 2:
                break
            await asyncio.sleep(0.01)
        await poller.stop()

    asyncio.run(main())
    assert {p[1] for p in polled} == {"bad", "good"}
    assert sum(1 for p in polled if p[1] == "good") >= 2  # the loop outlived "bad"'s error
    assert ("ns", "good", {"phase": "Running", "progress": {"step": 1}}) in polled


def test_first_reconcile_is_a_kubernetes_job_without_any_status() -> None:
    assert h.first_reconcile({"spec": {"backend": "kubernetes"}})
    assert h.first_reconcile({"spec": {}, "status": {}})
    assert not h.first_reconcile({"spec": {"backend": "kubernetes"}, "status": {"phase": "Pending"}})
    assert not h.first_reconcile({"spec": {"backend": "together"}})  # its children: see together.observe


def test_use_given_only_for_an_untouched_new_object() -> None:
    new = {"metadata": {"name": "a", "uid": "u1", "generation": 1}, "spec": {"backend": "kubernetes"}}
    assert h.use_given(new, None)
    assert not h.use_given(new, 1)  # this process already wrote a status: the event's body is stale
    assert not h.use_given({**new, "status": {"phase": "Running"}}, None)
    assert not h.use_given({**new, "metadata": {**new["metadata"], "deletionTimestamp": "2026-11-26T00:00:00Z"}}, None)
    assert not h.use_given({**new, "spec": {"backend": "together"}}, None)
    assert not h.use_given(None, None)


def test_plain_copies_the_body() -> None:
    src = {"metadata": {"name": "a"}, "spec": {"x": [1]}}
    out = h._plain(src)
    assert out == src and out is not src and out["spec"] is not src["spec"]
    assert h._plain(object()) is None


def test_in_cluster_login_uses_the_service_address_not_cluster_dns(tmp_path) -> None:
    """A real cluster without working DNS for kubernetes.default.svc (kopf's default) still lets the
    operator in: the kubelet's KUBERNETES_SERVICE_HOST/PORT, as client-go does."""
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("tuneop-system")
    (tmp_path / "ca.crt").write_text("ca")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    info = h.login_in_cluster(env, str(tmp_path))
    assert info.server == "https://10.96.0.1:443" and info.token == "tok" and info.scheme == "Bearer"
    assert info.default_namespace == "tuneop-system" and info.ca_path == str(tmp_path / "ca.crt")
    assert h.in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}) == "https://[fd00::1]:6443"
    assert h.login_in_cluster({}, str(tmp_path)) is None  # not in a pod: kopf's own login functions
    assert h.login_in_cluster(env, str(tmp_path / "nowhere")) is None


def test_the_diff_base_essence_is_kopfs_own_from_a_fraction_of_the_body() -> None:
    import kopf

    storage = kopf.AnnotationsDiffBaseStorage(prefix="tuneop.dev", key="last-handled-configuration")
    body = {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {
            "name": "news", "namespace": "ns", "uid": "u-1", "generation": 3, "resourceVersion": "42",
            "labels": {"team": "a"},
            "annotations": {"note": "x", "kubectl.kubernetes.io/last-applied-configuration": "{}",
                            "tuneop.dev/kopf-managed": "yes", "tuneop.dev/reconcile": "{}"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:baseModel": {}}}}] * 50,
        },
        "spec": {"baseModel": "m", "dataset": {"train": {"url": "https://x/t.jsonl"}}},
        "status": {"phase": "Running", "conditions": [{"type": "Running", "status": "True"}] * 10},
    }
    slim = h.essence_source(body)
    assert "status" not in slim and set(slim["metadata"]) == {"labels", "annotations"}
    body_view = kopf.Body(body)
    assert storage.build(body=slim) == storage.build(body=body_view)
    extra = ["status.phase"]
    assert h.essence_source(body, extra) is body
    assert storage.build(body=body_view, extra_fields=extra)["status"] == {"phase": "Running"}


class RecordingClient:
    """Takes Events as the API server would (a refusal for reason 'Refused'), one at a time."""

    def __init__(self) -> None:
        self.posted: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def create(self, obj: dict, namespace: Any = None) -> tuple[dict, bool]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1
        if obj["reason"] == "Refused":
            raise kube.ApiError(403, "Forbidden", "events is forbidden")
        self.posted.append(obj["reason"])
        return obj, True


def test_events_are_posted_after_the_reconcile_in_order_and_flushed(caplog: pytest.LogCaptureFixture) -> None:
    from tuneop.glue import EventPoster

    body = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "news", "namespace": "ns", "uid": "u"}}

    async def main() -> tuple[list[str], list[str], int]:
        events, kc = EventPoster(limit=4), RecordingClient()
        events.post(kc, body, "Normal", "A", "a")  # type: ignore[arg-type]
        before = list(kc.posted)  # post() returns at once: nothing sent yet
        for reason in ("Refused", "B", "C", "D"):  # one more than the limit: A is dropped unsent
            events.post(kc, body, "Normal", reason, reason.lower())  # type: ignore[arg-type]
        await events.flush(timeout=5)
        events.post(kc, body, "Warning", "E", "after an idle spell")  # type: ignore[arg-type]
        await events.flush(timeout=5)
        return before, kc.posted, kc.most_in_flight

    with caplog.at_level("WARNING", logger="tuneop"):
        before, posted, most = asyncio.run(main())
    assert before == []
    assert posted == ["B", "C", "D", "E"] and most == 1
    assert "Event A of ns/news not posted: more than 4 Events waiting" in caplog.text
    assert "Event Refused of ns/news not posted: 403" in caplog.text


def test_jobs_made_next_to_a_config_of_another_spec_or_owner_are_made_again() -> None:
    def obj(kind: str, spec_hash: str, owner: str = "u1") -> dict:
        return {"kind": kind, "metadata": {"name": "news-x", "annotations": {"tuneop.dev/spec-hash": spec_hash},
                                           "ownerReferences": [{"uid": owner}]}}

    job, svc = obj("Job", "h1"), obj("Service", "h1")
    assert h.created_next_to_a_foreign_config([job, svc], obj("ConfigMap", "h1"), "u1") == []
    assert h.created_next_to_a_foreign_config([job, svc], None, "u1") == []
    assert h.created_next_to_a_foreign_config([job, svc], obj("ConfigMap", "h0"), "u1") == [job]
    assert h.created_next_to_a_foreign_config([job, svc], obj("ConfigMap", "h1", owner="u0"), "u1") == [job]
    assert h.created_next_to_a_foreign_config([svc], obj("ConfigMap", "h0"), "u1") == []


def test_the_watch_event_of_a_new_kubernetes_job_starts_its_dependency_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a FineTuneJob nothing reconciled yet (no status), with a valid spec of a backend that
    reads ahead (kubernetes: its PVCs, dataset ConfigMaps and Secrets); nothing else is started."""
    started: list[tuple[str, str, str, str]] = []

    class Client:
        def read_ahead(self, api_version: str, kind: str, name: str, namespace: str) -> None:
            started.append((api_version, kind, name, namespace))

    monkeypatch.setattr(kube, "client", lambda: Client())
    spec = {
        "backend": "kubernetes", "baseModel": "Qwen/Qwen3-8B",
        "dataset": {"train": {"configMap": {"name": "data", "key": "train.jsonl"}}},
        "output": {"pvc": {"claimName": "adapters", "path": "x"}},
        "hfTokenSecretRef": {"name": "hf", "key": "token"},
    }

    def event(**body: Any) -> list[tuple[str, str, str, str]]:
        started.clear()
        asyncio.run(h.read_ahead({"metadata": {"name": "x", "namespace": "ns"}, **body}))
        return sorted(started)

    assert event(spec=spec) == [("v1", "ConfigMap", "data", "ns"), ("v1", "PersistentVolumeClaim", "adapters", "ns"),
                                ("v1", "Secret", "hf", "ns")]
    assert event(spec=spec, status={"phase": "Pending"}) == []  # reconciled before: it reads its children first
    assert event(spec={**spec, "baseModel": None}) == []  # invalid: the reconcile says SpecInvalid
    assert event(spec={**spec, "backend": "together"}) == []  # no reads ahead
    assert event(spec={**spec, "backend": "nope"}) == []


def test_watch_only_kinds_have_no_handler_that_reads_their_essence() -> None:
    """GenerationDiffBase hands kopf an empty essence for WATCH_ONLY_KINDS: true only while nothing
    but on.event handlers watch them (a create/update handler, timer or daemon there would see no diff)."""
    import kopf
    from kopf._cogs.structs import bodies

    from tuneop.adapterdeployment import handlers as ad

    registry = kopf.OperatorRegistry()
    configs = h.CONFIG, ad.CONFIG
    try:
        h.register(registry, h.OperatorConfig(image="trainer:test"))
        ad.register(registry, ad.AdapterConfig(vllm_image="vllm:test", trainer_image="trainer:test"))
    finally:
        h.CONFIG, ad.CONFIG = configs
    plurals = {"Job": "jobs", "Deployment": "deployments"}
    assert set(plurals) == set(h.WATCH_ONLY_KINDS)
    reading = {sel.plural or sel.any_name for sub in (registry._changing, registry._spawning) for sel in sub.get_all_selectors()}
    watched = {sel.plural or sel.any_name for sel in registry._watching.get_all_selectors()}
    assert reading == {"finetunejobs", "adapterdeployments"}
    assert set(plurals.values()) <= watched
    storage = h.GenerationDiffBase(_diffbase().fallback, kinds={"FineTuneJob"}, watch_only=h.WATCH_ONLY_KINDS)
    job = bodies.Body({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"template": {}}})
    assert storage.build(body=job) == {}
    assert storage.build(body=bodies.Body(ftj_body(1, 1)))["spec"]  # the FineTuneJob's as before
