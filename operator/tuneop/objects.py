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


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    """Environment variable `name` from key `key` of Secret `secret`: how every secret reaches a pod
    (never a value in a spec, a ConfigMap or a log)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def secret_key_refs(env: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(Secret name, key) of each variable of `env` that comes from a Secret."""
    out = []
    for entry in env:
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            out.append((ref["name"], ref["key"]))
    return out


def resource_requirements(requests: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """A container's ``resources``, with only the parts that have something in them."""
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def storage_env(storage: Any) -> list[dict[str, Any]]:
    """The environment a pod reads s3:// URIs with (``tuneop.s3``), from ``spec.storage``: endpoint and
    region as values, the access key pair only as ``secretKeyRef`` (never a value)."""
    s3 = getattr(storage, "s3", None)
    if s3 is None:
        return []
    env: list[dict[str, Any]] = []
    if s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3.endpoint.rstrip("/")})
    if s3.region:
        env.append({"name": "AWS_REGION", "value": s3.region})
    ref = s3.credentials_secret_ref
    if ref is not None:
        for name, key in (("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
                          ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key)):
            env.append(secret_env(name, ref.name, key))
    return env
