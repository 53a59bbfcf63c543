"""Pure pieces of handlers/finetunejob.py: which Job events are already accounted for, the
dataset check of ConfigMap datasets, concurrent reads."""
from __future__ import annotations

import asyncio
import json

import pytest

from tuneop import kube
from tuneop.handlers import finetunejob as h


def job(name: str, rv: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "resourceVersion": rv}}


def test_seen_jobs_match_name_and_exact_resource_version() -> None:
    async def main() -> None:
        seen = h.SeenJobs()
        assert not seen.seen("ns", "news", "news-train", "5")
        seen.remember("ns", "news", [None, job("news-train", "5"), {"metadata": {"name": "x"}}])
        assert seen.seen("ns", "news", "news-train", "5")
        assert not seen.seen("ns", "news", "news-train", "6")  # the Job changed since
        assert not seen.seen("ns", "news", "news-train", None)
        assert not seen.seen("ns", "other", "news-train", "5")
        assert not seen.seen("ns", "news", "x", None)
        # Each reconcile replaces what the previous one saw.
        seen.remember("ns", "news", [job("news-validate", "7")])
        assert not seen.seen("ns", "news", "news-train", "5")
        assert seen.seen("ns", "news", "news-validate", "7")
        seen.forget("ns", "news")
        assert not seen.seen("ns", "news", "news-validate", "7")

    asyncio.run(main())


def test_seen_jobs_are_per_event_loop() -> None:
    seen = h.SeenJobs()

    async def remember() -> None:
        seen.remember("ns", "news", [job("news-train", "5")])

    async def check() -> bool:
        return seen.seen("ns", "news", "news-train", "5")

    asyncio.run(remember())
    assert asyncio.run(check()) is False  # an operator restarted in a new loop sees nothing


@pytest.mark.parametrize("rows", [3, 4000])  # in the loop, and (over the size limit) in a thread
def test_inline_dataset_check_small_and_large(rows: int) -> None:
    lines = [json.dumps({"prompt": f"q{i}" * 5, "completion": f"a{i}"}) for i in range(rows)]
    text = "\n".join(lines)
    assert (len(text) > h.INLINE_CHECK_MAX_CHARS) == (rows > 100)
    report = asyncio.run(h.check_inline_dataset(text, "auto", "configMap d/train.jsonl"))
    assert report["ok"] is True and report["rows"] == rows
    bad = asyncio.run(h.check_inline_dataset(text + '\n{"prompt": ', "auto", "configMap d/train.jsonl"))
    assert bad["ok"] is False


def test_gather_waits_for_every_read_then_raises_the_first_error() -> None:
    done = []

    async def ok(delay: float, value: int) -> int:
        await asyncio.sleep(delay)
        done.append(value)
        return value

    async def fail() -> None:
        raise kube.ApiError(500, "InternalError", "boom")

    assert asyncio.run(h.gather(ok(0.01, 1), ok(0, 2))) == [1, 2]
    with pytest.raises(kube.ApiError):
        asyncio.run(h.gather(fail(), ok(0.02, 3)))
    assert 3 in done  # the slower read finished before the error was raised
