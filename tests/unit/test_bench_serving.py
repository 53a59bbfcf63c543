"""Pure helpers of benchmarks/serving.py (the --curve variants, targets, summary, flag diff)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tuneop.adapterdeployment.vllm import server_args
from tuneop.api.adapterdeployment import AdapterDeploymentSpec

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"
_spec = importlib.util.spec_from_file_location("bench_serving", _PATH)
b = importlib.util.module_from_spec(_spec)
_env = dict(os.environ)
try:  # the benchmark sets OMP_NUM_THREADS for its servers: keep it out of this process
    _spec.loader.exec_module(b)
finally:
    os.environ.clear()
    os.environ.update(_env)


def test_default_variant_is_tuneops_former_defaults():
    # maxLoras 8, maxLoraRank 64 were the defaults before they were derived from the adapters (#18)
    vllm = b.variant_vllm("default", rank=16, dtype="float32", max_len=512)
    spec = AdapterDeploymentSpec.model_validate({"baseModel": "/mnt/models/m", "vllm": vllm})
    assert (spec.vllm.max_loras, spec.vllm.max_lora_rank) == (8, 64)
    assert (spec.vllm.dtype, spec.vllm.max_model_len) == ("float32", 512)


@pytest.mark.parametrize("variant,expect", [
    ("rank", {"maxLoras": 8, "maxLoraRank": 16, "maxModelLen": 512}),
    ("loras2", {"maxLoras": 2, "maxLoraRank": 16, "maxModelLen": 512}),
    ("nolen", {"maxLoras": 8, "maxLoraRank": 16}),
    ("seqs16", {"maxLoras": 8, "maxLoraRank": 16, "maxModelLen": 512, "extraArgs": ["--max-num-seqs", "16"]}),
])
def test_variants_render(variant, expect):
    vllm = b.variant_vllm(variant, rank=16, dtype="float32", max_len=512)
    assert vllm == {"dtype": "float32", **expect}
    args = server_args(AdapterDeploymentSpec.model_validate({"baseModel": "/mnt/models/m", "vllm": vllm}))
    assert args[args.index("--max-lora-rank") + 1] == str(expect["maxLoraRank"])
    assert ("--max-model-len" in args) == ("maxModelLen" in expect)


def test_every_variant_validates():
    for v in b.VARIANTS:
        AdapterDeploymentSpec.model_validate(
            {"baseModel": "/mnt/models/m", "vllm": b.variant_vllm(v, rank=8, dtype="float32", max_len=128)})


def test_curve_targets_never_mix_base_and_adapters():
    names = [f"a{i}" for i in range(8)]
    targets = b.curve_targets("base-model", names, [1, 4, 8])
    assert targets == [("base", ["base-model"]), ("1 adapter", ["a0"]),
                       ("4 adapters", names[:4]), ("8 adapters", names)]
    for _label, models in targets[1:]:
        assert "base-model" not in models


def test_summarize_curve_ratio_to_base():
    run = lambda t: {"tokens_per_s": t, "tokens_per_cpu_s": t / 2}  # noqa: E731
    out = b.summarize_curve({"base": [run(200), run(180), run(220)], "1 adapter": [run(40), run(50)]})
    assert out["base"]["median_tokens_per_s"] == 200
    assert out["base"]["ratio_vs_base"] == 1.0
    assert out["1 adapter"]["median_tokens_per_s"] == 45
    assert out["1 adapter"]["ratio_vs_base"] == 0.225
    assert out["1 adapter"]["median_tokens_per_cpu_s"] == 22.5
    assert "x base" in b.curve_table({"default": {"targets": out}})


def test_flag_differences_names_only_the_guard():
    tuneop = ["--model", "m", "--port", "1", "--enable-lora", "--middleware", "g.AdminGuard", "--dtype", "float32"]
    hand = ["--model", "m", "--port", "2", "--enable-lora", "--dtype", "float32"]
    assert b.flag_differences(tuneop, hand) == ["--middleware g.AdminGuard"]
    assert b.flag_differences(hand, tuneop) == []


def test_server_facts_keeps_kv_and_concurrency_lines():
    log = ("(EngineCore pid=1) INFO 11-26 [kv_cache_utils.py:1] CPU KV cache size: 1,000 tokens, "
           "Maximum concurrency for 128 tokens per request: 8.00x\n"
           "(APIServer pid=2) INFO 11-26 [serving.py:2] Loaded new LoRA adapter: name 'x'\n")
    assert b.server_facts(log) == ["CPU KV cache size: 1,000 tokens, Maximum concurrency for 128 tokens per request: 8.00x"]
