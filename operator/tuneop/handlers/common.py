"""Pieces every kopf handler module shares: per-object locks, the live object, timestamps."""
from __future__ import annotations

import asyncio
import datetime
from typing import Any, Optional

from .. import kube


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ObjectLocks:
    """One asyncio.Lock per (event loop, namespace, name): reconciles of one object never overlap."""

    def __init__(self) -> None:
        self._locks: dict[tuple[int, str, str], asyncio.Lock] = {}

    def _key(self, namespace: str, name: str) -> tuple[int, str, str]:
        return (id(asyncio.get_running_loop()), namespace, name)

    def get(self, namespace: str, name: str) -> asyncio.Lock:
        key = self._key(namespace, name)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop(self._key(namespace, name), None)


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


async def post_event(kc: kube.KubeClient, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event from a task of tuneop's own (kopf.event works only inside kopf's handlers)."""
    await kc.create(event_object(body, type_, reason, message, now=now_iso()), (body.get("metadata") or {}).get("namespace"))
