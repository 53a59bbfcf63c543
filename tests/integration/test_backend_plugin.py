"""A FineTuneJob backend written only against tuneop.backends.base (the protocol), registered with
one line, run through the real kopf loop on kmock: the FineTuneJob glue drives its check, children,
observe, reducer, outside calls and its own timer, with no other change to tuneop.

The backend, ``fakehosted``, stands for a hosted fine-tuning API (Fireworks, OpenAI fine-tuning):
a ConfigMap with the request, one submit call per FineTuneJob (recorded in status before anything
else happens to it), a poll timer while the remote job runs, and the remote result as the status.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Iterator, Optional

import kopf
import pytest

from kmockenv import FTJ_PATH, NS, KMockThread, Operator, wait_for
from tuneop.backends import registered as backends
from tuneop.backends.base import Host, ReduceOptions
from tuneop.finetunejob import reconcile as st

CMS = f"/api/v1/namespaces/{NS}/configmaps"


# ------------------------------------------------------------------- the backend (under 150 lines)


class Service:
    """The hosted API: jobs by id, a submit keyed by the caller's idempotency key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.submits = 0

    def submit(self, key: str, request: dict[str, Any]) -> str:
        with self.lock:
            self.submits += 1
            for jid, job in self.jobs.items():
                if job["key"] == key:
                    return jid
            jid = f"hj-{len(self.jobs) + 1}"
            self.jobs[jid] = {"key": key, "request": request, "state": "running"}
            return jid

    def get(self, jid: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.jobs[jid])


class FakeHosted:
    name = "fakehosted"
    prefetch = False

    def __init__(self, service: Service) -> None:
        self.service = service

    def check(self, spec: Any) -> list[str]:
        return ["adapter.type: full is not offered by backend fakehosted"] if spec.adapter.type.value == "full" else []

    def children(self, ftj: dict[str, Any], spec: Any, *, image: str) -> list[dict[str, Any]]:
        meta = ftj["metadata"]
        return [{
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{meta['name']}-request", "namespace": meta["namespace"],
                         "labels": {"tuneop.dev/finetunejob": meta["name"]}},
            "data": {"request.json": json.dumps({"model": spec.base_model, "r": spec.adapter.r})},
        }]

    async def observe(self, host: Host, kc: Any, body: dict[str, Any], spec: Any,
                      children: Optional[list[Any]] = None) -> st.Observed:
        meta = body["metadata"]
        obs = st.Observed(config_map=await kc.get("v1", "ConfigMap", f"{meta['name']}-request", meta["namespace"]))
        jid = ((body.get("status") or {}).get("hosted") or {}).get("jobId")
        if jid:
            obs.extra["job"] = self.service.get(jid)
        return obs

    def reconcile(self, start: st.Start, options: ReduceOptions) -> st.Decision:
        bld, obs = start.bld, start.obs
        bld.status["specHash"] = start.h
        if not (bld.status.get("hosted") or {}).get("jobId"):
            if obs.config_map is None:  # the children first; the submit once they exist
                bld.decision.create.extend(self.children(start.body, start.spec, image=options.image))
            bld.decision.calls.append({"op": "submit"})
            bld.phase(st.PENDING, "Submitting", "submitting to the hosted API")
            return bld.finish()
        job = obs.extra.get("job") or {}
        if job.get("state") == "succeeded":
            bld.cond(st.SUCCEEDED_COND, True, "Succeeded", "the hosted job succeeded")
            bld.phase(st.SUCCEEDED, "Succeeded", f"hosted job {bld.status['hosted']['jobId']} succeeded")
            return bld.finish()
        if job.get("state") == "failed":
            return bld.fail("TrainingFailed", f"hosted job {bld.status['hosted']['jobId']} failed")
        bld.cond(st.RUNNING_COND, True, "Running", "the hosted job runs")
        bld.phase(st.RUNNING, "Running", f"hosted job {bld.status['hosted']['jobId']} runs")
        return bld.finish()

    async def act(self, host: Host, kc: Any, body: dict[str, Any], decision: st.Decision, logger: Any) -> None:
        for call in decision.calls:
            if call["op"] == "submit":
                jid = self.service.submit(body["metadata"]["uid"], {"name": body["metadata"]["name"]})
                current = {**body, "status": decision.status}
                bld = st.StatusBuilder(current, host.now())
                bld.status["hosted"] = {"jobId": jid}
                bld.cond(st.RUNNING_COND, True, "Submitted", f"hosted job {jid} submitted")
                bld.phase(st.RUNNING, "Submitted", f"hosted job {jid} submitted")
                await host.apply(kc, current, bld.finish())

    def register(self, host: Host, registry: kopf.OperatorRegistry, resource: tuple[str, str, str]) -> None:
        def active(status: Any, spec: Any, **_: Any) -> bool:
            return (spec or {}).get("backend") == self.name and (status or {}).get("phase") == st.RUNNING

        async def poll(namespace: str, name: str, logger: Any, **_: Any) -> None:
            await host.reconcile(namespace, name, logger)

        kopf.timer(*resource, registry=registry, id="fakehosted-poll", interval=0.2, when=active)(poll)


# ----------------------------------------------------------------------------------------- tests


@pytest.fixture()
def service() -> Iterator[Service]:
    svc = Service()
    backends.register(FakeHosted(svc))  # the one registration line
    try:
        yield svc
    finally:
        backends.unregister("fakehosted")


def ftj(name: str, **adapter: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "generation": 1},
        "spec": {"backend": "fakehosted", "baseModel": "org/model-8b", "adapter": {"type": "lora", "r": 8, **adapter},
                 "dataset": {"train": {"url": "https://data.example.com/train.jsonl"}},
                 "output": {"pvc": {"claimName": "adapters", "path": name}}},
    }


def status(api: KMockThread, name: str) -> dict[str, Any]:
    return (api.get(f"{FTJ_PATH}/{name}") or {}).get("status") or {}


def test_a_plugin_backend_runs_through_the_kopf_loop(api: KMockThread, service: Service) -> None:
    with Operator():
        api.create(FTJ_PATH, ftj("hosted"))
        running = wait_for(lambda: status(api, "hosted").get("phase") == "Running" and status(api, "hosted"),
                           what="Running at the hosted API")
        assert running["hosted"] == {"jobId": "hj-1"} and running["observedGeneration"] == 1
        cm = api.get(f"{CMS}/hosted-request")
        assert json.loads(cm["data"]["request.json"]) == {"model": "org/model-8b", "r": 8}
        with service.lock:
            service.jobs["hj-1"]["state"] = "succeeded"
        done = wait_for(lambda: status(api, "hosted").get("phase") == "Succeeded" and status(api, "hosted"),
                        what="Succeeded (the backend's own poll timer)")
    assert done["hosted"] == {"jobId": "hj-1"}
    assert len(service.jobs) == 1 and service.submits == 1
    assert len([r for r in api.requests("POST", CMS)]) == 1
    assert st.find_condition(done["conditions"], "Succeeded")["status"] == "True"


def test_a_plugin_backend_check_names_the_field_and_creates_nothing(api: KMockThread, service: Service) -> None:
    with Operator():
        api.create(FTJ_PATH, ftj("fullft", type="full"))
        failed = wait_for(lambda: status(api, "fullft").get("phase") == "Failed" and status(api, "fullft"),
                          what="Failed at its check")
    assert failed["reason"] == "SpecInvalid" and "adapter.type: full" in failed["message"]
    assert api.requests("POST", CMS) == [] and service.submits == 0


def test_an_unregistered_backend_is_an_invalid_spec_naming_the_field(api: KMockThread) -> None:
    with Operator():
        api.create(FTJ_PATH, ftj("nobody"))
        failed = wait_for(lambda: status(api, "nobody").get("phase") == "Failed" and status(api, "nobody"),
                          what="Failed: no such backend")
    assert failed["reason"] == "SpecInvalid" and "backend" in failed["message"] and "fakehosted" in failed["message"]
