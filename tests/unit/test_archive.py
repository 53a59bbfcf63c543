"""tuneop.archive: safe extraction of tar.gz / tar.zst archives and the adapter layout."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fake_together.adapter import link, make_tar, special  # noqa: E402
from tuneop.api.finetunejob import parse_spec  # noqa: E402
from tuneop.archive import (
    DEFAULT_MAX_BYTES,
    EXTRA_FILES_BYTES,
    ArchiveError,
    adapter_summary,
    detect_format,
    find_adapter_dir,
    model_params,
    safe_extract,
    size_limit,
    write_adapter_layout,
)
from tuneop.backends.together.pod import archive_limit  # noqa: E402

CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                     "base_model_name_or_path": "tiny"}).encode()
RANDOM = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(700))  # incompressible
WEIGHTS = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":{}}'.ljust(16)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def write(tmp_path: Path, data: bytes, name: str = "archive.bin") -> str:
    p = tmp_path / "in" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return str(p)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    (w / "keep.txt").write_text("untouched")
    return w


@pytest.mark.parametrize("compression, fmt", [("gz", "gzip"), ("zst", "zstd"), (None, "tar")])
def test_extract_formats_by_magic_not_name(tmp_path, work, compression, fmt):
    data = make_tar({"model/adapter_config.json": CONFIG, "model/adapter_model.safetensors": WEIGHTS},
                    compression)
    path = write(tmp_path, data, name="misleading.txt")
    assert detect_format(path) == fmt
    files = safe_extract(path, str(work / "out"))
    assert files == ["model/adapter_config.json", "model/adapter_model.safetensors"]
    assert (work / "out" / "model" / "adapter_config.json").read_bytes() == CONFIG
    assert tree(work) == ["keep.txt", "out", "out/model", "out/model/adapter_config.json",
                          "out/model/adapter_model.safetensors"]


def assert_nothing_written(work: Path) -> None:
    assert tree(work) == ["keep.txt"], tree(work)


@pytest.mark.parametrize(
    "entries, match",
    [
        ({"/etc/evil": b"x"}, "absolute"),
        ({"a/../../evil": b"x"}, r"'\.\.'"),
        ({"../evil": b"x"}, r"'\.\.'"),
        ({"ok.txt": b"x", "link": link("link", "/etc/passwd")}, "outside"),
        ({"ok.txt": b"x", "link": link("a/link", "../../etc/passwd")}, "outside"),
        ({"ok.txt": b"x", "hl": link("hl", "../outside", hard=True)}, "outside"),
        ({"ok.txt": b"x", "dev": special("dev/null")}, "device"),
        ({"ok.txt": b"x", "fifo": special("pipe", tarfile.FIFOTYPE)}, "device"),
    ],
)
def test_hostile_members_rejected_and_nothing_written(tmp_path, work, entries, match):
    path = write(tmp_path, make_tar(entries, "gz"))
    with pytest.raises(ArchiveError, match=match):
        safe_extract(path, str(work / "out"))
    assert_nothing_written(work)


def test_symlink_then_write_through_is_impossible(tmp_path, work):
    # a symlink to a directory inside, then a file "through" it: the link is never created on disk
    entries = {"d/x": b"1", "lnk": link("lnk", "d"), "lnk/y": b"2"}
    path = write(tmp_path, make_tar(entries, "gz"))
    files = safe_extract(path, str(work / "out"))
    assert "d/x" in files
    assert not any(os.path.islink(os.path.join(dp, n)) for dp, ds, fs in os.walk(work) for n in ds + fs)
    assert not (work / "out" / "d" / "y").exists()


def test_inside_links_become_copies(tmp_path, work):
    entries = {"a.txt": b"hello", "b.txt": link("b.txt", "a.txt"), "c.txt": link("c.txt", "a.txt", hard=True)}
    path = write(tmp_path, make_tar(entries, "zst"))
    assert safe_extract(path, str(work / "out")) == ["a.txt", "b.txt", "c.txt"]
    assert (work / "out" / "c.txt").read_bytes() == b"hello" and not os.path.islink(work / "out" / "b.txt")


def test_size_and_count_caps(tmp_path, work):
    path = write(tmp_path, make_tar({"big": b"x" * 5000}, "gz"))
    with pytest.raises(ArchiveError, match="size limit"):
        safe_extract(path, str(work / "out"), max_bytes=4096)
    assert_nothing_written(work)
    path = write(tmp_path, make_tar({f"f{i}": b"x" for i in range(20)}, "zst"))
    with pytest.raises(ArchiveError, match="more than 10"):
        safe_extract(path, str(work / "out"), max_files=10)
    assert_nothing_written(work)


@pytest.mark.parametrize("name, params", [
    ("meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", 8e9),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56e9),
    ("Qwen/Qwen2.5-72B-Instruct", 72e9),
    ("gpt2", None), ("org/model-v2", None), ("", None), (None, None),
])
def test_model_params_from_the_name(name, params):
    assert model_params(name) == params


def test_size_limit_from_rank_model_size_and_free_space():
    limit, source = size_limit(adapter_type="lora", lora_r=16, models=["Qwen/Qwen2.5-7B-Instruct"])
    # 2 x (7e9 params x 2*16/512 of them as LoRA weights x 4 bytes) + 256 MiB of tokenizer/config
    assert limit == 2 * 7e9 * 32 / 512 * 4 + EXTRA_FILES_BYTES
    assert "LoRA rank 16" in source and "7B-parameter base model Qwen/Qwen2.5-7B-Instruct" in source
    # the bound follows the rank and the model, and stays far below the old fixed 64 GiB
    assert size_limit(adapter_type="lora", lora_r=64, models=["Qwen/Qwen2.5-7B-Instruct"])[0] > limit
    assert size_limit(adapter_type="lora", lora_r=16, models=["Qwen/Qwen2.5-0.5B"])[0] < limit
    assert size_limit(adapter_type="lora", lora_r=64, models=["x/Llama-3.1-8B"])[0] < DEFAULT_MAX_BYTES / 4
    # the first model whose name states a size counts (together.model before baseModel)
    assert size_limit(adapter_type="lora", lora_r=16, models=[None, "custom/ft-model", "Qwen/Qwen2.5-7B"]) == (
        limit, source.replace("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"))
    full, fsource = size_limit(adapter_type="full", lora_r=16, models=["meta-llama/Llama-3.2-1B-Instruct"])
    assert full == 1.25 * 1e9 * 4 + EXTRA_FILES_BYTES and "full weights" in fsource
    assert size_limit(adapter_type="lora", lora_r=8, models=["my/own-model"]) == (
        DEFAULT_MAX_BYTES, "the default limit: the base model's size is unknown")
    small, ssource = size_limit(adapter_type="lora", lora_r=16, models=["Qwen/Qwen2.5-7B"], free_bytes=1 << 30)
    assert small == 1 << 30 and ssource.startswith("the free space of the output volume")
    assert "3.5 GiB" in ssource
    assert size_limit(adapter_type="lora", lora_r=16, models=["Qwen/Qwen2.5-7B"], free_bytes=1 << 50)[0] == limit


def test_archive_limit_of_a_together_download():
    spec = parse_spec({
        "backend": "together", "baseModel": "meta-llama/Llama-3.1-8B-Instruct",
        "dataset": {"train": {"pvc": {"claimName": "d", "path": "t.jsonl"}}},
        "output": {"pvc": {"claimName": "o", "path": "x"}}, "adapter": {"r": 32},
        "together": {"apiKeySecretRef": {"name": "t", "key": "k"}, "model": "acct/custom-ref"},
    })
    limit, source = archive_limit(spec, {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"}, None)
    assert limit == 2 * 8e9 * 64 / 512 * 4 + EXTRA_FILES_BYTES and "LoRA rank 32" in source
    assert archive_limit(spec, {"model": ["odd"]}, 10 << 20)[0] == 10 << 20


def test_small_archive_expanding_past_the_limit_is_refused_while_streaming(tmp_path, work):
    # ~24 KiB of gzip that expands to 24 MiB; each member alone fits the 16 MiB limit
    data = make_tar({f"adapter/shard-{i}.bin": b"\0" * (6 << 20) for i in range(4)}, "gz")
    assert len(data) < 256 << 10
    limit, source = size_limit(adapter_type="lora", lora_r=8, models=["my/own-model"], free_bytes=16 << 20)
    path = write(tmp_path, data)
    with pytest.raises(ArchiveError) as e:
        safe_extract(path, str(work / "out"), max_bytes=limit, limit_source=source)
    assert "size limit of 16.0 MiB" in str(e.value) and "free space of the output volume" in str(e.value)
    assert_nothing_written(work)
    assert safe_extract(path, str(work / "out"), max_bytes=32 << 20)  # within a larger limit: fine


@pytest.mark.parametrize("data", [
    b"not an archive at all" * 30,
    b"",
    make_tar({"a": RANDOM}, "gz")[:5000],           # truncated gzip
    make_tar({"a": RANDOM}, "zst")[:5000],          # truncated zstd
    b"\x1f\x8b" + b"\x00" * 100,                      # gzip magic, garbage
    b"\x28\xb5\x2f\xfd" + b"\xff" * 100,              # zstd magic, garbage
])
def test_malformed_archives(tmp_path, work, data):
    path = write(tmp_path, data)
    with pytest.raises(ArchiveError):
        safe_extract(path, str(work / "out"))
    assert_nothing_written(work)


def test_empty_archive_is_an_error(tmp_path, work):
    path = write(tmp_path, make_tar({}, "gz"))
    with pytest.raises(ArchiveError, match="no files"):
        safe_extract(path, str(work / "out"))
    assert_nothing_written(work)


def test_reextract_replaces_the_old_dir(tmp_path, work):
    safe_extract(write(tmp_path, make_tar({"old.txt": b"1"}, "gz")), str(work / "out"))
    safe_extract(write(tmp_path, make_tar({"new.txt": b"2"}, "gz")), str(work / "out"))
    assert tree(work) == ["keep.txt", "out", "out/new.txt"]


def test_find_adapter_dir_nested(tmp_path):
    root = tmp_path / "x"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "adapter_config.json").write_bytes(CONFIG)
    (root / "a" / "checkpoint" / "deep").mkdir(parents=True)
    (root / "a" / "checkpoint" / "deep" / "adapter_config.json").write_bytes(CONFIG)
    assert find_adapter_dir(str(root)) == str(root / "a" / "b")
    with pytest.raises(ArchiveError, match="no adapter_config.json"):
        find_adapter_dir(str(tmp_path / "none"))


def test_write_adapter_layout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_bytes(CONFIG)
    (src / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (src / "README.md").write_text("hi")
    (src / "sub").mkdir()
    (src / "sub" / "ignored.bin").write_bytes(b"x")
    out = tmp_path / "out"
    manifest = write_adapter_layout(str(src), str(out), base_model="meta-llama/Llama-3.1-8B-Instruct",
                                    method="sft", adapter_type="lora",
                                    extra={"together": {"jobId": "ft-1"}})
    adir = out / "adapter"
    assert sorted(os.listdir(adir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "tuneop-manifest.json"]
    assert manifest["files"] == {n: hashlib.sha256((src / n).read_bytes()).hexdigest()
                                 for n in ("README.md", "adapter_config.json", "adapter_model.safetensors")}
    assert manifest["baseModel"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert (manifest["method"], manifest["adapterType"], manifest["source"]) == ("sft", "lora", "together")
    assert manifest["metrics"] == {} and manifest["evaluation"] is None and manifest["createdAt"]
    assert manifest["together"] == {"jobId": "ft-1"}
    assert json.loads((adir / "tuneop-manifest.json").read_text()) == manifest
    summary = adapter_summary(str(adir))
    assert summary["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert summary["manifestSha256"] == hashlib.sha256((adir / "tuneop-manifest.json").read_bytes()).hexdigest()
    assert summary["sizeBytes"] == sum(p.stat().st_size for p in adir.iterdir())
    assert not [n for n in os.listdir(out) if n.startswith(".")]


@pytest.mark.parametrize("files, match", [
    ({"adapter_config.json": CONFIG}, "adapter_model.safetensors"),
    ({"adapter_config.json": b"{not json", "adapter_model.safetensors": WEIGHTS}, "not valid JSON"),
    ({"adapter_config.json": b"[1]", "adapter_model.safetensors": WEIGHTS}, "not a JSON object"),
])
def test_write_adapter_layout_refuses_half_adapters(tmp_path, files, match):
    src = tmp_path / "src"
    src.mkdir()
    for n, b in files.items():
        (src / n).write_bytes(b)
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match=match):
        write_adapter_layout(str(src), str(out), base_model="b", method="sft", adapter_type="lora")
    assert not (out / "adapter").exists()
