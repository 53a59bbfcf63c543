"""Pieces every builder shares (pure)."""
from __future__ import annotations

from typing import Any, Mapping

# CPU-only helper pods (dataset validation, Together upload/download).
SMALL_POD_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "2Gi"},
}


def owner_reference(owner: Mapping[str, Any], *, api_version: str, kind: str) -> dict[str, Any]:
    """A controller ownerReference to `owner`, so deleting it garbage-collects the child."""
    meta = owner.get("metadata") or {}
    ref = {
        "apiVersion": owner.get("apiVersion", api_version),
        "kind": owner.get("kind", kind),
        "name": meta["name"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    if meta.get("uid"):
        ref["uid"] = meta["uid"]
    return ref


def resource_requirements(requests: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """A container's ``resources``, with only the parts that have something in them."""
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out
