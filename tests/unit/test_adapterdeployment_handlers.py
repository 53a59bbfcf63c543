"""Pure pieces of handlers/adapterdeployment.py: which FineTuneJobs an AdapterDeployment
references (the kopf index), and which FineTuneJob changes matter to it."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tuneop.handlers import adapterdeployment as h

SPEC = {"adapters": [
    {"name": "a", "fineTuneJobRef": {"name": "news"}},
    {"name": "b", "source": {"pvc": {"claimName": "x", "path": "y"}}},
    {"name": "c", "fineTuneJobRef": {"name": "legal"}},
    {"name": "d", "fineTuneJobRef": {"name": "news"}},
    {"name": "e", "fineTuneJobRef": {}},
    "not-a-dict",
]}


def test_referenced_jobs_and_references() -> None:
    assert h.referenced_jobs(SPEC) == ["legal", "news"]
    assert h.referenced_jobs({}) == [] and h.referenced_jobs(None) == []
    assert h.references({"spec": SPEC}, "news") and not h.references({"spec": SPEC}, "other")


def test_index_maps_each_referenced_job_to_the_adapterdeployment() -> None:
    assert h.ad_by_finetunejob(namespace="team-a", name="qwen", spec=SPEC) == {
        ("team-a", "legal"): "qwen", ("team-a", "news"): "qwen"}
    assert h.ad_by_finetunejob(namespace="team-a", name="qwen", spec={"adapters": []}) == {}


def test_ftj_fingerprint_is_phase_sha_and_output() -> None:
    body = {"spec": {"output": {"pvc": {"claimName": "c", "path": "p"}}},
            "status": {"phase": "Running", "progress": {"step": 3}}}
    fp = h.ftj_fingerprint("MODIFIED", body)
    assert fp == h.ftj_fingerprint(None, {**body, "status": {"phase": "Running", "progress": {"step": 9}}})
    assert fp != h.ftj_fingerprint("MODIFIED", {**body, "status": {"phase": "Succeeded"}})
    assert fp != h.ftj_fingerprint("MODIFIED", {**body, "status": {"phase": "Running", "adapter": {"sha256": "x"}}})
    assert h.ftj_fingerprint("DELETED", body) is None


def test_ftj_event_reconciles_only_the_referencing_adapterdeployments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    async def fake(namespace: str, name: str, logger: Any) -> bool:
        calls.append((namespace, name))
        return True

    monkeypatch.setattr(h, "_reconcile_quietly", fake)
    h._ftj_seen.clear()
    index = {("ns", "news"): ["qwen", "llama", "qwen"]}
    log = logging.getLogger("test")
    running = {"status": {"phase": "Running"}}

    async def event(name: str, body: dict, type_: str = "MODIFIED") -> None:
        await h.on_ftj_event(type=type_, body=body, name=name, namespace="ns", logger=log, ad_by_finetunejob=index)

    asyncio.run(event("other", running))
    assert calls == []  # referenced by none: nothing read, nothing reconciled
    asyncio.run(event("news", running))
    assert calls == [("ns", "llama"), ("ns", "qwen")]
    asyncio.run(event("news", {"status": {"phase": "Running", "progress": {"step": 5}}}))
    assert len(calls) == 2  # progress only: nothing the AdapterDeployments care about
    asyncio.run(event("news", {"status": {"phase": "Succeeded", "adapter": {"sha256": "s"}}}))
    assert calls[2:] == [("ns", "llama"), ("ns", "qwen")]
    asyncio.run(event("news", {}, "DELETED"))
    assert calls[4:] == [("ns", "llama"), ("ns", "qwen")]
    assert ("ns", "news") not in h._ftj_seen  # nothing kept of a deleted job
