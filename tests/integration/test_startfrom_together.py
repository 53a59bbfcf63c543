"""spec.startFrom with backend: together, through the real kopf loop (kmock) and the fake Together
server driven by the real SDK: a together job continues another together job (its Together job id
becomes ``from_checkpoint``), or a Together checkpoint id; a together job cannot continue a
kubernetes one."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fake_together.server import FakeTogether  # noqa: E402
from kmockenv import FTJ_PATH, KMockThread, wait_for  # noqa: E402
from test_finetunejob_operator import JOBS, finish_job, status_of, wait_phase  # noqa: E402
from test_finetunejob_operator import ftj as k8s_ftj  # noqa: E402
from test_together_operator import (  # noqa: E402
    CREATE,
    SHA,
    cluster,
    fake,  # noqa: F401  (the fixture)
    ftj,
    job_id,
    posts,
    together_operator,
    upload_pod,
)


def test_a_together_job_continues_another_together_job(api: KMockThread, fake: FakeTogether, tmp_path: Path) -> None:  # noqa: F811
    cluster(api)
    api.create(FTJ_PATH, ftj("news"))
    api.create(FTJ_PATH, ftj("news-v2", startFrom={"fineTuneJob": {"name": "news"}}))
    with together_operator():
        wait_for(lambda: status_of(api, "news-v2").get("reason") == "WaitingForStartFrom", what="waiting")
        assert api.get(f"{JOBS}/news-v2-upload") is None

        wait_for(lambda: api.get(f"{JOBS}/news-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path, "news")
        first = wait_for(lambda: job_id(api, "news"), what="the first Together job")
        wait_for(lambda: api.get(f"{JOBS}/news-download"), timeout=60, what="download Job")
        done = {"event": "done", "adapter": {"path": "/mnt/pvc/adapters/news/adapter", "sha256": SHA},
                "together": {"jobId": first}}
        finish_job(api, "news-download", container="download", message=json.dumps(done))
        wait_phase(api, "Succeeded", "news")

        wait_for(lambda: api.get(f"{JOBS}/news-v2-upload"), what="the continued job's upload Job")
        upload_pod(api, fake, tmp_path, "news-v2")
        second = wait_for(lambda: job_id(api, "news-v2"), what="the continued Together job")
        st = status_of(api, "news-v2")

    assert second != first and posts(fake, CREATE) == 2
    body = fake.create_bodies[1]
    assert body["from_checkpoint"] == first and not body.get("model")
    pin = st["startedFrom"]
    assert pin["fineTuneJob"] == "news" and pin["togetherCheckpoint"] == first and pin["sha256"] == SHA


def test_a_together_checkpoint_id_and_a_refused_kubernetes_source(api: KMockThread, fake: FakeTogether, tmp_path: Path) -> None:  # noqa: F811
    cluster(api)
    api.create(FTJ_PATH, ftj("cont", startFrom={"togetherCheckpoint": "ft-0123:20"}))
    api.create(FTJ_PATH, k8s_ftj("local", baseModel="Qwen/Qwen2.5-7B-Instruct"))
    api.create(FTJ_PATH, ftj("from-local", startFrom={"fineTuneJob": {"name": "local"}}))
    with together_operator():
        wait_for(lambda: api.get(f"{JOBS}/cont-upload"), what="upload Job")
        upload_pod(api, fake, tmp_path, "cont")
        wait_for(lambda: job_id(api, "cont"), what="Together job")
        st = status_of(api, "cont")
        # a together job cannot load the adapter of a kubernetes one: refused, naming the field
        bad = wait_phase(api, "Failed", "from-local")

    assert fake.create_bodies[0]["from_checkpoint"] == "ft-0123:20" and not fake.create_bodies[0].get("model")
    assert st["startedFrom"]["togetherCheckpoint"] == "ft-0123:20"
    assert bad["reason"] == "SpecInvalid"
    assert bad["message"].startswith("spec.startFrom.fineTuneJob: FineTuneJob local has backend kubernetes")
    assert api.get(f"{JOBS}/from-local-upload") is None and posts(fake, CREATE) == 1
