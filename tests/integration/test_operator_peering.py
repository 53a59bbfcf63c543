"""Two operator replicas (`run_operator(peering_name=...)`, each in its own thread and event loop)
peering through one KopfPeering on kmock: only the replica with the higher priority acts; when it
stops dead in the middle of a reconcile, the other one takes over once the first one's peering
record has expired, finishes that reconcile, and no child exists twice.

Who sent each request: every aiohttp request of a replica's thread (kopf's and tuneop's own
client alike) carries an ``X-Replica`` header (a test-only wrapper of aiohttp), so the requests
kmock recorded say which replica made them. "Killed" is a replica whose thread blocks in its next
request: nothing of it runs any more (no keep-alive, no request), as after SIGKILL or SIGSTOP, and
its record stays in the peering object until it expires, which is what the other replica waits for.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Iterator, Optional

import aiohttp
import kmock
import kopf
import pytest

from kmockenv import FTJ_PATH, NS, KMockThread, wait_for
from tuneop.handlers import default_priority, peering_object, run_operator

JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
CMS = f"/api/v1/namespaces/{NS}/configmaps"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
PEERING = "tuneop"
PEERING_PATH, _ = peering_object(PEERING, NS)
# A peering record older than this is dead (kopf.dev KopfPeering status: {identity: {priority,
# lifetime, lastseen}}). kopf touches its record every second with a lifetime this short.
LIFETIME = 6
GOOD_JSONL = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
    for i in range(5)
)
HEADER = "X-Replica"


class Freezer:
    """Tags each aiohttp request of a replica thread with the replica's name, and blocks the thread of
    a frozen replica in its next request (its whole event loop stops there) until thawed."""

    def __init__(self) -> None:
        self.frozen: dict[str, threading.Event] = {}
        self.blocked: dict[str, threading.Event] = {}

    def freeze(self, name: str) -> None:
        self.blocked[name] = threading.Event()
        self.frozen[name] = threading.Event()

    def thaw(self, name: str) -> None:
        self.frozen.pop(name).set()

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def _request(session: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> Any:
            name = threading.current_thread().name
            if name.startswith("replica-"):
                gate = self.frozen.get(name)
                if gate is not None:
                    self.blocked[name].set()
                    gate.wait(60)
                headers = dict(kwargs.pop("headers", None) or {})
                headers[HEADER] = name
                kwargs["headers"] = headers
            return original(session, method, url, **kwargs)

        return _request


@pytest.fixture()
def freezer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Freezer]:
    f = Freezer()
    monkeypatch.setattr(aiohttp.ClientSession, "_request", f.wrap(aiohttp.ClientSession._request))
    try:
        yield f
    finally:
        for name in list(f.frozen):
            f.thaw(name)


class Replica:
    """`tuneop operator --peering tuneop --namespace team-a --priority N` in a thread of its own."""

    def __init__(self, name: str, priority: int):
        self.name = f"replica-{name}"
        self.priority = priority
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True  # kmock cannot list Namespaces
        settings.peering.lifetime = LIFETIME
        try:
            run_operator(
                [NS], None, "trainer:test", settings=settings, peering_name=PEERING, priority=self.priority,
                identity=self.name, progress_interval=3600, retry_interval=3600, adapter_interval=3600,
                stop_flag=self.stop_flag, ready_flag=self.ready_flag,
            )
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)

    def start(self) -> "Replica":
        self.thread.start()
        if not self.ready_flag.wait(30):
            raise AssertionError(f"{self.name} did not start: {self.errors}")
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), f"{self.name} did not stop"
        assert self.errors == []


def verb(request: Any) -> str:
    return str(request.method.value).upper()


def by(api: KMockThread, replica: Optional[str], method: str = "", path: str = "") -> list[Any]:
    """kmock's requests sent by `replica` (None: by the test itself), optionally by method and path prefix."""
    return [r for r in list(api.emulator._requests)
            if r.headers.get(HEADER) == replica and (not method or verb(r) == method) and r.url.path.startswith(path)]


def writes(api: KMockThread, replica: str) -> list[str]:
    """What `replica` wrote in the watched namespace, apart from its peering record."""
    return [f"{verb(r)} {r.url.path}" for r in by(api, replica)
            if verb(r) in ("POST", "PATCH", "PUT", "DELETE") and not r.url.path.startswith(PEERING_PATH)]


def ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "generation": 1},
        "spec": {"backend": "kubernetes", "baseModel": "Qwen/Qwen3-8B",
                 "dataset": {"train": {"configMap": {"name": "data", "key": "train.jsonl"}}},
                 "output": {"pvc": {"claimName": "adapters", "path": name}}},
    }


def stored(api: KMockThread, path: str) -> Optional[dict[str, Any]]:
    return api.get(path)


def names(api: KMockThread, path: str) -> list[str]:
    return sorted(o["metadata"]["name"] for o in (api.get(path) or {}).get("items") or [])


def peers(api: KMockThread) -> dict[str, Any]:
    return (api.get(f"{PEERING_PATH}/{PEERING}") or {}).get("status") or {}


def test_default_priority_prefers_the_older_replica() -> None:
    import random

    older = default_priority(1_000.000, random.Random(1))
    younger = default_priority(1_000.001, random.Random(2))
    assert older > younger
    assert len({default_priority(5.0, random.Random(i)) for i in range(50)}) > 1  # a tiebreak in the same ms
    assert abs(default_priority()) < 2**63  # an int64 in the peering object's JSON


def test_operator_command_passes_the_peering_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import tuneop.cli as cli
    import tuneop.handlers as h

    started: list[dict[str, Any]] = []

    def fake(**kw: Any) -> None:
        started.append(kw)

    monkeypatch.setattr(h, "run_operator", fake)
    if hasattr(cli, "run_operator"):
        monkeypatch.setattr(cli, "run_operator", fake)
    assert cli.main(["operator", "--metrics-port", "0", "-n", NS, "--peering", "tuneop", "--priority=-3"]) == 0
    assert cli.main(["operator", "--metrics-port", "0"]) == 0
    assert (started[0]["peering_name"], started[0]["priority"], started[0]["namespaces"]) == ("tuneop", -3, [NS])
    assert (started[1]["peering_name"], started[1]["priority"]) == (None, None)  # standalone


def test_only_the_higher_priority_replica_acts_and_a_takeover_mid_reconcile_duplicates_nothing(
    api: KMockThread, freezer: Freezer,
) -> None:
    # kopf's peering CRD (kopf.dev/v1 KopfPeering), as charts/tuneop installs it with replicas > 1.
    api.emulator.resources["kopf.dev/v1/kopfpeerings"] = kmock.ResourceInfo(
        kind="KopfPeering", namespaced=True, subresources=set(),
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
    )
    api.create(PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters"}})
    api.create(CMS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "data"},
                     "data": {"train.jsonl": GOOD_JSONL}})

    # The active one starts first (it creates the peering object); the standby then sees its record at
    # once and never starts watching FineTuneJobs until the active one is gone.
    a = Replica("a", priority=100).start()
    b: Optional[Replica] = None
    try:
        wait_for(lambda: "replica-a" in peers(api), what="replica-a's peering record")
        b = Replica("b", priority=10).start()
        wait_for(lambda: "replica-b" in peers(api), what="replica-b's peering record")
        assert [r.data["metadata"]["name"] for r in by(api, "replica-a", "POST", PEERING_PATH)] == [PEERING]
        # replica-b's create of it answered 409 (it existed): one object, replica-a's.
        assert len(by(api, "replica-b", "POST", PEERING_PATH)) == 1

        # 1. A FineTuneJob: replica-a reconciles it; replica-b neither reads nor writes anything of it.
        api.wait_watching(FTJ_PATH)
        api.create(FTJ_PATH, ftj("alpha"))
        wait_for(lambda: (stored(api, f"{FTJ_PATH}/alpha") or {}).get("status", {}).get("phase") == "Pending",
                 what="alpha Pending")
        assert stored(api, f"{JOBS}/alpha-train") is not None
        wait_for(lambda: len(by(api, "replica-a", "POST", f"/api/v1/namespaces/{NS}/events")) == 2,
                 what="its two Events (posted after the reconcile)")
        assert sorted(writes(api, "replica-a")) == sorted([
            f"POST {CMS}", f"POST {JOBS}", f"PATCH {FTJ_PATH}/alpha/status",
            f"POST /api/v1/namespaces/{NS}/events", f"POST /api/v1/namespaces/{NS}/events",
        ])
        assert writes(api, "replica-b") == []
        # replica-b has not even listed or watched anything of the namespace but its peering object.
        assert {r.url.path for r in by(api, "replica-b") if f"/namespaces/{NS}/" in r.url.path} == {PEERING_PATH,
                                                                                                   f"{PEERING_PATH}/{PEERING}"}

        # 2. replica-a dies right after it created beta's children (its ConfigMap and training Job, at
        #    once), before the status: kmock lets the creates through, and replica-a's thread stops in
        #    its next request (the status patch).
        original = api.emulator._handle
        killed_at: list[int] = []

        async def handle(request: Any) -> Any:
            data = request.data if isinstance(request.data, dict) else {}
            if (request.headers.get(HEADER) == "replica-a" and verb(request) == "POST"
                    and request.url.path == JOBS and data.get("metadata", {}).get("name") == "beta-train"):
                freezer.freeze("replica-a")
                killed_at.append(request.id)
            return await original(request)

        api.emulator._handle = handle
        api.create(FTJ_PATH, ftj("beta"))
        wait_for(lambda: killed_at and freezer.blocked["replica-a"].is_set(), what="replica-a frozen")
        assert stored(api, f"{CMS}/beta-config") is not None
        made_by_a = stored(api, f"{JOBS}/beta-train")
        assert made_by_a is not None and not (stored(api, f"{FTJ_PATH}/beta") or {}).get("status")

        # replica-b takes over once replica-a's record expired (it removes it), and finishes beta.
        status = wait_for(lambda: ((stored(api, f"{FTJ_PATH}/beta") or {}).get("status") or None),
                          timeout=LIFETIME * 5, what="beta reconciled by replica-b")
        assert status["phase"] == "Pending" and status["reason"] == "TrainingPending"
        assert status["observedGeneration"] == 1
        assert by(api, "replica-b", "PATCH", f"{FTJ_PATH}/beta/status")
        assert by(api, "replica-a", "PATCH", f"{FTJ_PATH}/beta/status") == []
        assert [r.data["metadata"]["name"] for r in by(api, "replica-a", "POST", JOBS)] == ["alpha-train", "beta-train"]
        assert stored(api, f"{JOBS}/beta-train")["metadata"]["uid"] == made_by_a["metadata"]["uid"]
        cleaned = [r for r in by(api, "replica-b", "PATCH", PEERING_PATH)
                   if "replica-a" in ((r.data or {}).get("status") or {})
                   and r.data["status"]["replica-a"] is None]
        assert cleaned, "replica-b resumed without seeing replica-a's record expire"
        first_ftj_request = min(r.id for r in by(api, "replica-b", path=FTJ_PATH))
        assert min(r.id for r in cleaned) < first_ftj_request
        assert "replica-a" not in peers(api) or peers(api)["replica-a"] is None
    finally:
        if b is not None:
            b.stop()
        # replica-a comes back from the dead only to stop: whatever its reconcile still does then
        # (the training Job's create answers 409) must not duplicate anything either.
        a.stop_flag.set()
        if "replica-a" in freezer.frozen:
            freezer.thaw("replica-a")
        a.stop()

    # Exactly one of each child: replica-a's. replica-b found them (its creates, if any, answered
    # 409) and wrote the status from them; replica-a, thawed, found them too.
    assert names(api, JOBS) == ["alpha-train", "beta-train"]
    assert names(api, CMS) == ["alpha-config", "beta-config", "data"]
    for path in (f"{CMS}/beta-config", f"{JOBS}/beta-train"):
        posts = sorted((r for r in by(api, "replica-a", "POST", path.rsplit("/", 1)[0])
                        if r.data["metadata"]["name"] == path.rsplit("/", 1)[1]), key=lambda r: r.id)
        assert stored(api, path)["metadata"]["uid"] == posts[0].data["metadata"]["uid"]
    assert api.requests("DELETE", JOBS) == [] and api.requests("DELETE", CMS) == []

    # What the replicas did with their peering object: the RBAC charts/tuneop grants with replicas > 1
    # (test_chart_peering.PEERING_VERBS).
    used = set()
    for r in by(api, "replica-a", path=PEERING_PATH) + by(api, "replica-b", path=PEERING_PATH):
        if verb(r) == "GET":
            used.add("watch" if "watch" in str(r.url.query) else "list" if r.url.path == PEERING_PATH else "get")
        else:
            used.add({"POST": "create", "PATCH": "patch"}.get(verb(r), verb(r)))
    assert used == {"list", "watch", "patch", "create"}
    final = (stored(api, f"{FTJ_PATH}/beta") or {}).get("status") or {}
    assert final["phase"] == "Pending" and final["reason"] == "TrainingPending"
