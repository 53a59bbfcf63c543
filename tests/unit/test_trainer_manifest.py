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
