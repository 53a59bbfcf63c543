"""Pieces every resource's kopf glue shares: per-object locks, the live object, timestamps, Events,
and the kopf peering leader check of the operator's own tasks."""
# Events are posted by one task per event loop, in the order they were decided, after the reconcile
# that decided them (as client-go's event recorder and kopf.event do): a reconcile does not wait
# for its notifications, and a burst of reconciles does not queue its children's creates and
# status writes behind them.
from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import logging
import weakref
from typing import Any, Iterable, Mapping, Optional

from . import kube


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ObjectLocks:
    """One asyncio.Lock per (event loop, namespace, name): reconciles of one object never overlap.
    Keyed by the loop object itself (weakly): the id() of a closed loop is reused by the next one."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], asyncio.Lock]] = (
            weakref.WeakKeyDictionary())

    def _of_loop(self) -> dict[tuple[str, str], asyncio.Lock]:
        return self._locks.setdefault(asyncio.get_running_loop(), {})

    def get(self, namespace: str, name: str) -> asyncio.Lock:
        locks = self._of_loop()
        lock = locks.get((namespace, name))
        if lock is None:
            lock = locks[(namespace, name)] = asyncio.Lock()
        return lock

    def forget(self, namespace: str, name: str) -> None:
        self._of_loop().pop((namespace, name), None)


async def get_live(
    kc: kube.KubeClient, api_version: str, kind: str, name: str, namespace: str
) -> Optional[dict[str, Any]]:
    """The object as the API server has it now; None when it is gone or being deleted."""
    body = await kc.get(api_version, kind, name, namespace)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    return typed(body, api_version, kind)


def typed(body: dict[str, Any], api_version: str, kind: str) -> dict[str, Any]:
    """`body` with apiVersion and kind set (a GET or a watch event may leave them out)."""
    body.setdefault("apiVersion", api_version)
    body.setdefault("kind", kind)
    return body


def event_object(body: dict[str, Any], type_: str, reason: str, message: str, *, now: str) -> dict[str, Any]:
    """A core/v1 Event about `body`, shaped as kopf posts them (component tuneop, name tuneop-...)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "tuneop-", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta.get("name"),
            "namespace": meta.get("namespace"), "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "tuneop"},
        "reportingComponent": "tuneop",
        "reportingInstance": "tuneop",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class EventPoster:
    """Events to post, per event loop: :meth:`post` queues one (built now, so it says what was
    decided now) and returns; one task posts them in order. At most `limit` wait: beyond that the
    oldest is dropped and said so in the log, as an API server that refuses Events would leave
    them. :meth:`flush` (operator cleanup) posts what is left."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _EventQueue] = weakref.WeakKeyDictionary()

    def _queue(self) -> "_EventQueue":
        loop = asyncio.get_running_loop()
        q = self._queues.get(loop)
        if q is None:
            q = self._queues[loop] = _EventQueue(self.limit)
        return q

    def post(self, kc: kube.KubeClient, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        namespace = (body.get("metadata") or {}).get("namespace")
        self._queue().put(kc, event_object(body, type_, reason, message, now=now_iso()), namespace)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait (at most `timeout` seconds) until every queued Event of this loop is posted."""
        q = self._queues.get(asyncio.get_running_loop())
        if q is not None:
            await q.flush(timeout)


class _EventQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: collections.deque[tuple[kube.KubeClient, dict[str, Any], Optional[str]]] = collections.deque()
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: Optional[asyncio.Task[None]] = None

    def put(self, kc: kube.KubeClient, event: dict[str, Any], namespace: Optional[str]) -> None:
        if len(self.items) >= self.limit:
            _, dropped, ns = self.items.popleft()
            logging.getLogger("tuneop").warning(
                f"Event {dropped.get('reason')} of {ns}/{(dropped.get('involvedObject') or {}).get('name')} "
                f"not posted: more than {self.limit} Events waiting")
        self.items.append((kc, event, namespace))
        self.idle.clear()
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            if not self.items:
                self.idle.set()
                self.wake.clear()
                await self.wake.wait()
                continue
            kc, event, ns = self.items.popleft()
            try:
                await kc.create(event, ns)
            except kube.ApiError as e:  # logged, as kopf would: the status says it already
                logging.getLogger("tuneop").warning(
                    f"Event {event.get('reason')} of {ns}/{(event.get('involvedObject') or {}).get('name')} not posted: {e}")

    async def flush(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            logging.getLogger("tuneop").warning(f"{len(self.items)} Events not posted at shutdown")
        if self.task is not None:
            self.task.cancel()
            self.task = None


EVENTS = EventPoster()

# kopf's peering objects (one per watched namespace, or one cluster-wide): kopf.dev, as kopf >= 1.29 names them.
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


def peering_object(name: str, namespace: Optional[str]) -> tuple[str, dict[str, Any]]:
    """(collection path, body) of kopf's peering object `name`: a KopfPeering in `namespace`, or the
    ClusterKopfPeering when `namespace` is None (kopf's choice for --namespace / --all-namespaces)."""
    base = f"/apis/{PEERING_GROUP}/{PEERING_VERSION}"
    meta: dict[str, Any] = {"name": name}
    if namespace is None:
        return f"{base}/clusterkopfpeerings", {
            "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "ClusterKopfPeering", "metadata": meta,
        }
    meta["namespace"] = namespace
    return f"{base}/namespaces/{namespace}/kopfpeerings", {
        "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "KopfPeering", "metadata": meta,
    }


@dataclasses.dataclass(frozen=True)
class PeeringSelf:
    """This replica in kopf's peering: the peering name, the namespaces it peers in (empty: the
    ClusterKopfPeering), its identity and priority, as passed to kopf."""

    name: str
    namespaces: tuple[str, ...]
    identity: str
    priority: int


def leads(peerings: Iterable[Optional[Mapping[str, Any]]], identity: str, priority: int,
          now: datetime.datetime) -> bool:
    """Whether kopf lets this replica act, by kopf's own rule (its peering engine,
    ``process_peering_event``): it is paused while any live peer other than itself has a priority
    above its own, or the same one (then all of them pause), in any of its peering objects; and
    while a peering object is missing. A peer is live until ``lastseen + lifetime``."""
    for body in peerings:
        if body is None:
            return False
        for peer, info in ((body.get("status") or {})).items():
            if peer == identity or not isinstance(info, Mapping):
                continue
            lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
            seen = info.get("lastseen")
            try:
                lastseen = datetime.datetime.fromisoformat(str(seen)) if seen else now
            except ValueError:
                lastseen = now
            if lastseen.tzinfo is None:
                lastseen = lastseen.replace(tzinfo=datetime.timezone.utc)
            if lastseen + lifetime <= now:
                continue  # dead
            if int(info.get("priority", 0)) >= priority:
                return False
    return True


async def still_leading(kc: kube.KubeClient, me: Optional[PeeringSelf]) -> bool:
    """For the operator's own tasks (kopf pauses only its handlers): whether this replica is the
    one acting, read from the peering objects in the API server. Always true without peering."""
    if me is None:
        return True
    bodies = []
    for ns in me.namespaces or (None,):
        path, body = peering_object(me.name, ns)
        try:
            bodies.append(await kc.request("GET", f"{path}/{me.name}"))
        except kube.NotFound:
            bodies.append(None)
    return leads(bodies, me.identity, me.priority, datetime.datetime.now(datetime.timezone.utc))

