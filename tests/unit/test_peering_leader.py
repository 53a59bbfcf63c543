"""Which replica acts under kopf peering, as the operator's own tasks (the progress poller) decide it
from the peering objects in the API server: kopf's rule, and the poller skipping its rounds while
another replica leads."""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, Optional

import pytest

from tuneop import glue as common
from tuneop import kube
from tuneop.finetunejob import handlers as h

NOW = dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.timezone.utc)


def peer(priority: int, seconds_ago: float = 1, lifetime: int = 60) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - dt.timedelta(seconds=seconds_ago)).isoformat()}


def obj(**peers: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "tuneop"}, "status": peers}


@pytest.mark.parametrize("peers, leads", [
    ({"me": peer(10)}, True),                                    # alone
    ({"me": peer(10), "b": peer(5)}, True),                      # the others rank lower
    ({"me": peer(10), "b": peer(20)}, False),                    # a live peer ranks higher
    ({"me": peer(10), "b": peer(10)}, False),                    # the same priority: kopf pauses both
    ({"me": peer(10), "b": peer(20, seconds_ago=61)}, True),     # the higher one is dead (lifetime 60)
    ({"me": peer(10), "b": peer(20, seconds_ago=5, lifetime=3)}, True),
    ({"b": peer(5)}, True),                                      # before kopf wrote our own record
])
def test_leads_follows_kopfs_rule(peers: dict[str, Any], leads: bool) -> None:
    assert common.leads([obj(**peers)], "me", 10, NOW) is leads


def test_every_peering_object_counts_and_a_missing_one_pauses() -> None:
    assert common.leads([obj(me=peer(10)), obj(me=peer(10), b=peer(11))], "me", 10, NOW) is False
    assert common.leads([obj(me=peer(10)), None], "me", 10, NOW) is False
    assert common.leads([], "me", 10, NOW) is True


class FakeKube:
    def __init__(self, bodies: dict[str, Optional[dict[str, Any]]]) -> None:
        self.bodies = bodies
        self.paths: list[str] = []

    async def request(self, method: str, path: str, **_: Any) -> Any:
        self.paths.append(path)
        body = self.bodies.get(path)
        if body is None:
            raise kube.NotFound(404, "not found")
        return body


def test_still_leading_reads_each_namespace_peering_object() -> None:
    me = common.PeeringSelf(name="tuneop", namespaces=("a", "b"), identity="me", priority=10)
    fresh = peer(10, seconds_ago=0)
    fresh["lastseen"] = dt.datetime.now(dt.timezone.utc).isoformat()
    kc = FakeKube({"/apis/kopf.dev/v1/namespaces/a/kopfpeerings/tuneop": obj(me=fresh),
                   "/apis/kopf.dev/v1/namespaces/b/kopfpeerings/tuneop": obj(me=fresh)})
    assert asyncio.run(common.still_leading(kc, me)) is True  # type: ignore[arg-type]
    assert kc.paths == ["/apis/kopf.dev/v1/namespaces/a/kopfpeerings/tuneop",
                        "/apis/kopf.dev/v1/namespaces/b/kopfpeerings/tuneop"]
    other = dict(fresh, priority=99)
    kc.bodies["/apis/kopf.dev/v1/namespaces/b/kopfpeerings/tuneop"] = obj(me=fresh, newer=other)
    assert asyncio.run(common.still_leading(kc, me)) is False  # type: ignore[arg-type]
    assert asyncio.run(common.still_leading(kc, None)) is True  # type: ignore[arg-type]  # standalone: no read


def test_a_paused_replica_neither_polls_progress_nor_reconciles_pending_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica led, tracked a Running and a Pending job, then another replica took over: its
    own tasks (not kopf's handlers, which kopf pauses) must stop acting on them."""
    me = common.PeeringSelf(name="tuneop", namespaces=(), identity="me", priority=10)
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    leader = {"me": {"priority": 10, "lifetime": 60, "lastseen": now}}
    kc = FakeKube({"/apis/kopf.dev/v1/clusterkopfpeerings/tuneop": obj(**leader)})
    monkeypatch.setattr(h, "CONFIG", h.OperatorConfig(peering=me))
    monkeypatch.setattr(kube, "client", lambda: kc)
    polled: list[tuple[str, str]] = []
    reconciled: list[tuple[str, str]] = []

    async def poll_progress(namespace: str, name: str, *_: Any) -> None:
        polled.append((namespace, name))

    async def reconcile_or_report(namespace: str, name: str, *_: Any, **__: Any) -> bool:
        reconciled.append((namespace, name))
        return True

    monkeypatch.setattr(h, "poll_progress", poll_progress)
    monkeypatch.setattr(h, "reconcile_or_report", reconcile_or_report)

    async def rounds() -> None:
        poller = h.ProgressPoller()
        poller.start(0.01, 0.01)
        poller.track("ns", "running", {"phase": "Running"}, {"backend": "kubernetes"})
        poller.track("ns", "pending", {"phase": "Pending", "conditions": [{"type": "Running", "reason": "TrainingPending"}]},
                      {"backend": "kubernetes"})
        while not (polled and reconciled):
            await asyncio.sleep(0.01)
        kc.bodies["/apis/kopf.dev/v1/clusterkopfpeerings/tuneop"] = obj(
            **leader, newer={"priority": 20, "lifetime": 60, "lastseen": now})
        await asyncio.sleep(0.05)  # a round in flight may finish
        before = (len(polled), len(reconciled))
        reads = len(kc.paths)
        while len(kc.paths) < reads + 6:  # several rounds, each reading the peering object
            await asyncio.sleep(0.01)
        assert (len(polled), len(reconciled)) == before
        await poller.stop()

    asyncio.run(rounds())
    assert ("ns", "running") in polled and ("ns", "pending") in reconciled
