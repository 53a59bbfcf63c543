"""spec.startFrom.fineTuneJob through the real kopf loop against kmock (backend: kubernetes).

The retry timer is set to an hour: a job waiting for another one starts because the other one's
watch event says it finished, not because a timer looked again.
"""
from __future__ import annotations

import json
from typing import Any

from kmockenv import FTJ_PATH, NS, KMockThread, Operator, wait_for
from test_finetunejob_operator import (
    CMS,
    GOOD_JSONL,
    JOBS,
    configmap,
    finish_job,
    ftj,
    job_posts,
    pvc,
    reasons,
    start_job,
    status_of,
    wait_phase,
)
from tuneop.finetunejob import handlers

SHA = "a" * 64
OTHER_SHA = "c" * 64
INLINE = {"configMap": {"name": "news-data", "key": "train.jsonl"}}


def start_from(name: str) -> dict[str, Any]:
    return {"fineTuneJob": {"name": name}}


def test_a_job_waits_for_the_one_it_continues_then_pins_its_adapter(api: KMockThread) -> None:
    pvc(api, "adapters")
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj("news", train=INLINE))
    api.create(FTJ_PATH, ftj("news-v2", train=INLINE, startFrom=start_from("news")))

    with Operator(retry_interval=3600):
        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="the first job's training Job")
        st = wait_phase(api, "Pending", "news-v2")
        wait_for(lambda: status_of(api, "news-v2").get("reason") == "WaitingForStartFrom", what="waiting")
        st = status_of(api, "news-v2")
        assert "news" in st["message"] and "spec.startFrom.fineTuneJob" in st["message"]
        assert "startedFrom" not in st
        # nothing is created for the waiting job
        assert api.get(f"{JOBS}/news-v2-train") is None and api.get(f"{CMS}/news-v2-config") is None
        wait_for(lambda: handlers._start_waiters.waits_for(NS, "news-v2") == "news", what="the watch saw it wait")

        start_job(api, "news-train")
        wait_phase(api, "Running", "news")
        assert status_of(api, "news-v2")["reason"] == "WaitingForStartFrom"
        done = {"event": "done", "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA}}
        finish_job(api, "news-train", container="trainer", message=json.dumps(done))
        wait_phase(api, "Succeeded", "news")

        # the first job's Succeeded event wakes the waiting one: pinned, config and training Job created
        tjob = wait_for(lambda: api.get(f"{JOBS}/news-v2-train"), what="the continued job's training Job")
        st = status_of(api, "news-v2")
        pin = st["startedFrom"]
        assert pin["fineTuneJob"] == "news" and pin["sha256"] == SHA
        assert pin["location"] == "pvc://adapters/news/adapter" and pin["baseModel"] == "Qwen/Qwen3-8B"
        config = json.loads(api.get(f"{CMS}/news-v2-config")["data"]["job.json"])
        assert config["startFrom"] == {"path": "/mnt/pvc/adapters/news/adapter",
                                       "location": "pvc://adapters/news/adapter", "sha256": SHA}
        mounts = {m["mountPath"] for m in tjob["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/mnt/pvc/adapters" in mounts

        # the first job's adapter changes later (say, it is trained again): the pin does not move
        api.patch(f"{FTJ_PATH}/news/status", {"status": {"adapter": {"sha256": OTHER_SHA}}})
        start_job(api, "news-v2-train")
        wait_phase(api, "Running", "news-v2")
        done2 = {"event": "done", "adapter": {"sha256": "d" * 64},
                 "startedFrom": {"location": "pvc://adapters/news/adapter", "sha256": SHA}}
        finish_job(api, "news-v2-train", container="trainer", message=json.dumps(done2))
        st = wait_phase(api, "Succeeded", "news-v2")

    assert st["startedFrom"] == pin
    assert st["adapter"]["sha256"] == "d" * 64
    assert len(job_posts(api, "news-v2-train")) == 1
    assert "WaitingForStartFrom" in reasons(api)


def test_a_failed_job_or_another_base_model_fails_the_continuation_naming_the_field(api: KMockThread) -> None:
    pvc(api, "adapters")
    bad = GOOD_JSONL.splitlines()
    bad[1] = '{"messages": ['
    configmap(api, "bad-data", {"train.jsonl": "\n".join(bad)})
    configmap(api, "news-data", {"train.jsonl": GOOD_JSONL})
    api.create(FTJ_PATH, ftj("broken", train={"configMap": {"name": "bad-data", "key": "train.jsonl"}}))
    api.create(FTJ_PATH, ftj("after-broken", train=INLINE, startFrom=start_from("broken")))
    done = {"event": "done", "adapter": {"sha256": SHA}}
    api.create(FTJ_PATH, ftj("news", train=INLINE))
    with Operator(retry_interval=3600):
        wait_phase(api, "Failed", "broken")
        st = wait_phase(api, "Failed", "after-broken")
        assert st["reason"] == "SpecInvalid"
        assert st["message"].startswith("spec.startFrom.fineTuneJob: FineTuneJob broken failed (DatasetInvalid)")
        validated = [c for c in st["conditions"] if c["type"] == "Validated"][0]
        assert validated["status"] == "False" and validated["reason"] == "SpecInvalid"

        wait_for(lambda: api.get(f"{JOBS}/news-train"), what="training Job")
        finish_job(api, "news-train", container="trainer", message=json.dumps(done))
        wait_phase(api, "Succeeded", "news")
        api.create(FTJ_PATH, ftj("other-base", train=INLINE, baseModel="meta-llama/Llama-3.2-1B",
                                 startFrom=start_from("news")))
        st = wait_phase(api, "Failed", "other-base")

    assert st["reason"] == "SpecInvalid" and "spec.startFrom.fineTuneJob" in st["message"]
    assert "meta-llama/Llama-3.2-1B" in st["message"]
    assert job_posts(api, "after-broken-train") == [] and job_posts(api, "other-base-train") == []
    assert api.get(f"{CMS}/after-broken-config") is None
