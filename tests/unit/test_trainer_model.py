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
    from jinja2 import nodes
    from jinja2.ext import Extension

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


def tiny_llama(layers: int = 3):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def lora_modules(model) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_lora_config_on_chosen_layers():
    """adapter.layers: only those decoder layers get LoRA, 'all-linear' there meaning every linear layer
    but the head (PEFT refuses the string with layers_to_transform), negative indices from the top."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(3)
    c = M.lora_config(AdapterSpec(r=4, alpha=8, layers=[-1, 0]), model)
    assert c.layers_to_transform == [0, 2]
    assert c.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapted = lora_modules(peft.get_peft_model(model, c))
    assert len(adapted) == 14 and all(".layers.0." in n or ".layers.2." in n for n in adapted), adapted

    model = tiny_llama(3)
    c = M.lora_config(AdapterSpec(target_modules=["q_proj", "v_proj"], layers=[1]), model)
    adapted = lora_modules(peft.get_peft_model(model, c))
    assert {n.split(".layers.")[1] for n in adapted} == {"1.self_attn.q_proj", "1.self_attn.v_proj"}


def test_lora_config_names_bad_layers():
    pytest.importorskip("peft")
    with pytest.raises(TrainerError, match=r"adapter.layers: the model has no layer 3: it has 3 decoder layers"):
        M.lora_config(AdapterSpec(layers=[3]), tiny_llama(3))
    with pytest.raises(TrainerError, match=r"adapter.layers: layer 2 is listed twice \(as 2 and -1\)"):
        M.lora_config(AdapterSpec(layers=[2, -1]), tiny_llama(3))


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
