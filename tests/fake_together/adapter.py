"""Archives like the ones Together serves from ``/v1/finetune/download``, for the fake server.

``build_peft_adapter(dir)`` saves a real PEFT LoRA adapter of a tiny random Llama (hidden 32, one
layer) with ``save_pretrained`` (imports torch/transformers/peft: a few seconds, once per session).
``make_tar(entries, compression)`` packs ``{name: bytes}`` (plus optional raw TarInfo entries for the
hostile cases) as ``gz``, ``zst`` or plain tar.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Optional, Union


def build_peft_adapter(out_dir: str) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(out_dir)
    return out_dir


def dir_entries(root: str, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                out[prefix + name] = f.read()
    return out


Entry = Union[bytes, tarfile.TarInfo]


def make_tar(entries: dict[str, Entry], compression: Optional[str] = "gz") -> bytes:
    """``entries``: name -> file bytes, or a TarInfo (symlinks, devices...) added as is."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, value in entries.items():
            if isinstance(value, tarfile.TarInfo):
                tar.addfile(value)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(value)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(value))
    raw = buf.getvalue()
    if compression == "gz":
        import gzip

        return gzip.compress(raw)
    if compression == "zst":
        import zstandard

        return zstandard.ZstdCompressor().compress(raw)
    return raw


def link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def special(name: str, kind: bytes = tarfile.CHRTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info
