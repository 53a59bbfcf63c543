"""`tuneop export-model`: a base model saved as a plain Hugging Face directory that loads and answers the
same as the source (the tiny Llama; the quickstart's GGUF takes the same path in tests/images)."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tuneop.cli import main

pytestmark = pytest.mark.slow


def test_export_model_writes_a_loadable_readable_copy(tiny_model: Path, tmp_path: Path, capsys) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path / "out" / "tiny"
    assert main(["export-model", str(tiny_model), str(dest)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()
    for p in dest.rglob("*"):  # a model volume is read by another uid than the writer's
        assert p.stat().st_mode & stat.S_IROTH, p
    assert not list(dest.parent.glob(".tiny.tmp-*"))
    ids = AutoTokenizer.from_pretrained(tiny_model)("Word: kasu\nLabel:", return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)(ids).logits
    assert torch.allclose(want, got)
    # Not over an existing model; a missing source names itself.
    assert main(["export-model", str(tiny_model), str(dest)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export-model", "./nowhere/model.gguf", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
