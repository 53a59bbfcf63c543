"""The adapter directory: manifest, hashes, atomic replacement."""
from __future__ import annotations

import hashlib
import json

import pytest

from tuneop.trainer import manifest as M


def fields():
    return {"base_model": "Qwen/Qwen3-8B", "method": "sft", "adapter_type": "lora",
            "metrics": {"train_loss": 0.5}, "evaluation": None}


def test_build_manifest():
    m = M.build_manifest("b", "dpo", "lora", {"z": "1", "a": "2"}, {"steps": 3}, None, created_at="T")
    assert m == {"baseModel": "b", "method": "dpo", "adapterType": "lora", "files": {"a": "2", "z": "1"},
                 "metrics": {"steps": 3}, "evaluation": None, "createdAt": "T"}
    assert M.utc_now().endswith("Z")


def test_write_adapter_dir(tmp_path):
    def save(d):
        with open(f"{d}/adapter_model.safetensors", "wb") as f:
            f.write(b"weights")
        with open(f"{d}/adapter_config.json", "w") as f:
            f.write("{}")
        import os

        os.makedirs(f"{d}/sub")
        with open(f"{d}/sub/x.txt", "w") as f:
            f.write("x")

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "progress.json").write_text("{}")
    info = M.write_adapter_dir(str(tmp_path), save, fields())
    adapter = tmp_path / "adapter"
    manifest = json.loads((adapter / M.MANIFEST).read_text())
    assert manifest["files"] == {
        "adapter_config.json": hashlib.sha256(b"{}").hexdigest(),
        "adapter_model.safetensors": hashlib.sha256(b"weights").hexdigest(),
        "sub/x.txt": hashlib.sha256(b"x").hexdigest(),
    }
    assert info["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert info["manifestSha256"] == hashlib.sha256((adapter / M.MANIFEST).read_bytes()).hexdigest()
    assert info["sizeBytes"] == sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file())
    assert oct((adapter / "adapter_model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoints", "progress.json"]

    # A second run replaces the adapter; a crash while saving leaves the old one in place.
    def broken(d):
        open(f"{d}/adapter_model.safetensors", "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        M.write_adapter_dir(str(tmp_path), broken, fields())
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter-tmp")]
    (tmp_path / ".adapter-tmp-99999").mkdir()  # left by a killed run: cleaned up next time

    def save2(d):
        open(f"{d}/model.safetensors", "wb").write(b"full")

    info2 = M.write_adapter_dir(str(tmp_path), save2, {**fields(), "adapter_type": "full"})
    assert sorted(p.name for p in adapter.iterdir()) == sorted([M.MANIFEST, "model.safetensors"])
    assert info2["sha256"] == hashlib.sha256(b"full").hexdigest()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter-old")]


def make_dir(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)


@pytest.mark.parametrize("exchange", ["real", "unsupported"])
def test_swap_into_place_never_shows_a_partial_adapter(tmp_path, exchange, monkeypatch):
    """The new directory replaces the old one whole. With RENAME_EXCHANGE (the normal case on local
    filesystems) `adapter/` exists at every instant; without it (NFS), the fallback renames the old one
    aside and the new one in, leaving no trace."""
    final, tmp = tmp_path / "adapter", tmp_path / ".adapter-tmp-1"
    make_dir(final, {"w": "old", "m": "old"})
    make_dir(tmp, {"w": "new", "m": "new"})
    renames = []
    real_replace = M.os.replace

    def replace(src, dst):
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(M.os, "replace", replace)
    if exchange == "real":
        exchanges = []

        def exch(a, b):
            exchanges.append((a, b))
            return M._exchange(a, b)

        M.swap_into_place(str(tmp), str(final), exchange=exch)
        assert exchanges == [(str(tmp), str(final))] and renames == []  # one atomic step, final never absent
    else:
        M.swap_into_place(str(tmp), str(final), exchange=lambda a, b: False)
        assert renames == [(str(final), str(tmp) + "-old"), (str(tmp), str(final))]
    assert (final / "w").read_text() == "new" and (final / "m").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # the first adapter: a plain rename
    other = tmp_path / "fresh"
    make_dir(tmp, {"w": "x"})
    M.swap_into_place(str(tmp), str(other), exchange=lambda a, b: pytest.fail("nothing to exchange with"))
    assert (other / "w").read_text() == "x"


def test_base_model_info():
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 2, "vocab_size": 320, "torch_dtype": "float32"}
    assert M.base_model_info(config, config) == {
        "architecture": "LlamaForCausalLM", "modelType": "llama", "hiddenSize": 64, "numLayers": 2, "vocabSize": 320}
    # multimodal: the architecture of the whole model, the sizes of its language model
    top = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": {}}
    text = {"model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34, "vocab_size": 262208}
    assert M.base_model_info(top, text) == {
        "architecture": "Gemma3ForConditionalGeneration", "modelType": "gemma3_text", "hiddenSize": 2560,
        "numLayers": 34, "vocabSize": 262208}
    # no architectures recorded (a GGUF): the model type stands for it
    assert M.base_model_info({"model_type": "qwen2"})["architecture"] == "qwen2"
    assert M.base_model_info({}) == {"architecture": None, "modelType": None, "hiddenSize": None,
                                     "numLayers": None, "vocabSize": None}


def test_reuse_decision():
    files = {"adapter_model.safetensors": "1" * 64, "adapter_config.json": "2" * 64}
    manifest = {"trainingFingerprint": "fp", "files": files}
    assert M.reuse_decision(manifest, "fp", dict(files))["reuse"] is True
    assert M.reuse_decision(None, "fp", files) == {"reuse": False, "reason": "no adapter manifest"}
    assert M.reuse_decision({**manifest, "trainingFingerprint": "other"}, "fp", files)["reuse"] is False
    assert M.reuse_decision({"files": files}, "fp", files)["reuse"] is False  # an older trainer's adapter
    changed = M.reuse_decision(manifest, "fp", {**files, "adapter_model.safetensors": "3" * 64})
    assert changed["reuse"] is False and "adapter_model.safetensors" in changed["reason"]
    assert M.reuse_decision(manifest, "fp", {"adapter_config.json": "2" * 64})["reuse"] is False  # a file gone
    assert M.reuse_decision(manifest, "fp", {**files, "extra.bin": "4" * 64})["reuse"] is False  # one added
    assert M.reuse_decision({**manifest, "files": {}}, "fp", {})["reuse"] is False


def test_adapter_block_names_the_base_model_and_fingerprint(tmp_path):
    info = {"architecture": "LlamaForCausalLM", "modelType": "llama", "hiddenSize": 64, "numLayers": 2,
            "vocabSize": 320}

    def save(d):
        open(f"{d}/adapter_model.safetensors", "wb").write(b"w")

    block = M.write_adapter_dir(str(tmp_path), save, {**fields(), "extra": {"trainingFingerprint": "fp",
                                                                             "baseModelInfo": info}})
    manifest = M.read_manifest(str(tmp_path / "adapter"))
    assert manifest["trainingFingerprint"] == "fp" and manifest["baseModelInfo"] == info
    assert block["baseModel"] == "Qwen/Qwen3-8B" and block["baseModelInfo"] == info
    assert block["trainingFingerprint"] == "fp"
    assert M.describe_adapter(str(tmp_path / "adapter")) == block
    assert M.read_manifest(str(tmp_path / "missing")) is None
