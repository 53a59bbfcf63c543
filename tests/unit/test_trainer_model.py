"""Model-side helpers that need no model: templates, LoRA config, QLoRA gate, main's helpers."""
from __future__ import annotations

import json

import pytest

from tuneop.api.finetunejob import AdapterSpec
from tuneop.trainer import main as main_mod
from tuneop.trainer import model as M
from tuneop.trainer.errors import TrainerError


def test_generation_markers():
    assert M.has_generation_markers(M.CHATML_TEMPLATE)
    assert M.has_generation_markers("{%- generation -%}x{%- endgeneration -%}")
    assert M.has_generation_markers({"default": "{% generation %}"})
    assert not M.has_generation_markers("{{ messages }}") and not M.has_generation_markers(None)


class FakeTokenizer:
    def __init__(self, template):
        self.chat_template = template


def test_ensure_chat_template():
    tok = FakeTokenizer("{% generation %}ok")
    assert M.ensure_chat_template(tok, True, assistant_only=True) is None
    tok = FakeTokenizer(None)
    assert "ChatML" in M.ensure_chat_template(tok, True, assistant_only=False)
    assert tok.chat_template == M.CHATML_TEMPLATE
    tok = FakeTokenizer("{{ 'plain' }}")
    assert M.ensure_chat_template(tok, True, assistant_only=False) is None  # own template is fine
    assert M.ensure_chat_template(tok, False, assistant_only=True) is None
    assert tok.chat_template == "{{ 'plain' }}"


def test_is_conversational():
    assert M.is_conversational([{"messages": []}])
    assert M.is_conversational([{"prompt": [{"role": "user", "content": "x"}], "chosen": [], "rejected": []}])
    assert not M.is_conversational([{"prompt": "x", "completion": "y"}]) and not M.is_conversational([])


def test_chatml_template_renders_with_masks():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.ext import Extension
    from jinja2 import nodes

    class Generation(Extension):  # what transformers provides when rendering for masks
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = jinja2.Environment(extensions=[Generation])
    out = env.from_string(M.CHATML_TEMPLATE).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], add_generation_prompt=False
    )
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_lora_config():
    pytest.importorskip("peft")
    c = M.lora_config(AdapterSpec(r=4, alpha=8, dropout=0.1))
    assert c.target_modules == "all-linear" and c.r == 4 and c.lora_alpha == 8 and c.lora_dropout == 0.1
    c = M.lora_config(AdapterSpec(target_modules=["q_proj", "v_proj"]))
    assert set(c.target_modules) == {"q_proj", "v_proj"}


def test_qlora_gate_without_gpu(monkeypatch):
    monkeypatch.setattr(M, "nvidia_device_present", lambda: False)
    M.check_qlora_hardware("lora", gguf=False)  # nothing to check
    with pytest.raises(TrainerError) as e:
        M.check_qlora_hardware("qlora", gguf=False)
    assert e.value.reason == "UnsupportedHardware" and e.value.exit_code == 2


def test_loss_scope():
    assert main_mod.loss_scope(main_mod.Method.sft, "prompt-completion", False) == "completion"
    assert main_mod.loss_scope(main_mod.Method.sft, "messages", False) == "assistant"
    assert main_mod.loss_scope(main_mod.Method.sft, "messages", True) == "all"
    assert main_mod.loss_scope(main_mod.Method.sft, "text", False) == "all"
    assert main_mod.loss_scope(main_mod.Method.dpo, "preference", False) == "preference"


def test_main_reports_config_errors(tmp_path, monkeypatch, capsys):
    term = tmp_path / "term"
    monkeypatch.setenv("TUNEOP_TERMINATION_LOG", str(term))
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"spec": {"baseModel": "m"}, "paths": {}}))
    assert main_mod.main(["--config", str(cfg)]) == 2
    msg = json.loads(term.read_text())
    assert msg["event"] == "error" and msg["reason"] == "ConfigInvalid"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == msg


def test_rank_info():
    assert main_mod.rank_info({}) == (0, 0, 1)
    assert main_mod.rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == (3, 1, 4)
