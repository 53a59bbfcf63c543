"""spec.vllm.extraArgs: the flags tuneop renders itself or that would undo the admin guard are
refused by the model (VllmSpec's validator) and by the CRD (its CEL rule), both from
api/adapterdeployment.py REFUSED_VLLM_FLAGS, in every form vLLM's parser accepts."""
from __future__ import annotations

import math
from typing import Any

import celpy
import pytest
import re2
from pydantic import ValidationError

from tuneop.adapterdeployment import vllm
from tuneop.api import adapterdeployment as api
from tuneop.api import crdcheck
from tuneop.api.crdgen import all_crds

AD_CRD = all_crds()["adapterdeployments.yaml"]


def ad(*extra: str, **vllm_spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": "qwen"},
        "spec": {"baseModel": "Qwen/Qwen3-8B", "vllm": {"extraArgs": list(extra), **vllm_spec}},
    }


def model_refuses(*extra: str) -> str:
    with pytest.raises(ValidationError) as e:
        api.AdapterDeploymentSpec.model_validate(ad(*extra)["spec"])
    return str(e.value)


REFUSED = [
    # the issue's cases: an adapter from anywhere at start-up, the guard's own settings
    ("--lora-modules", "evil=/anywhere"),
    ("--lora-modules=evil=/anywhere",),
    ("--api-key", "k"),
    ("--middleware", "other.Middleware"),
    ("--root-path=/x",),
    ("--host", "127.0.0.1"),
    ("--port=9000",),
    # vLLM's parser reads underscores as dashes, `--flag.key` as JSON fields, and abbreviations
    ("--lora_modules", "evil=/anywhere"),
    ("--lora-mod", "evil=/anywhere"),
    ("--lora_mod=evil=/anywhere",),
    ("--lora-modules.name", "evil"),
    ("--api_key=k",),
    ("--middle", "x.Y"),
    ("--default-mm-loras", '{"image": "/anywhere"}'),
    # what server_args renders from spec fields
    ("--model", "other"), ("--served-model-name", "x"), ("--enable-lora",), ("--no-enable-lora",),
    ("--max-loras", "4"), ("--max-lora-rank=8",), ("--max-cpu-loras", "9"), ("--max-model-len", "9"),
    ("--dtype", "half"), ("--gpu-memory-utilization", "0.5"), ("--tensor-parallel-size", "2"),
    ("--trust-remote-code",), ("--trust_remote",),
    # HTTP contract, credentials, files and code
    ("--ssl-keyfile", "/k"), ("--uds", "/s"), ("--grpc",), ("--allowed-origins", '["*"]'), ("--allow-credentials",),
    ("--hf-token", "x"), ("--config", "/c.yaml"), ("--chat-template", "/etc/tuneop/admin/token"),
    ("--allowed-local-media-path", "/"), ("--tool-parser-plugin", "/p.py"), ("--log-config-file", "/l.json"),
    ("--kv-transfer-config", "{}"), ("--download-dir", "/tmp/tuneop-verified"),
    # short options (-tp is --tensor-parallel-size) and a bare end of options
    ("-tp", "2"), ("-O3",), ("-q", "awq"), ("--",),
]


@pytest.mark.parametrize("extra", REFUSED, ids=[" ".join(x) for x in REFUSED])
def test_model_and_crd_refuse_each_form(extra: tuple[str, ...]) -> None:
    message = model_refuses("--enforce-eager", *extra)
    assert "extraArgs[1]" in message  # the offending element, by index
    errors = crdcheck.check(ad("--enforce-eager", *extra), AD_CRD)
    assert errors and "vllm.extraArgs must not contain" in errors[0]


def test_the_message_names_the_flag_and_what_to_do() -> None:
    msg = model_refuses("--lora_mod=evil=/anywhere")
    assert "--lora-mod abbreviates --lora-modules" in msg and "spec.adapters" in msg
    assert "--max-loras is refused: use spec.vllm.maxLoras" in model_refuses("--max-loras", "2")
    assert "--api-key is refused: use spec.auth.apiKeySecretRef" in model_refuses("--api-key=k")
    assert "short options are refused" in model_refuses("-tp", "2")
    assert "--max-loras" in model_refuses("--max-lora")  # ambiguous: both candidates named
    assert "--max-lora-rank" in model_refuses("--max-lora")


ACCEPTED = [
    ["--max-num-seqs", "16"], ["--enforce-eager"], ["--enable-prefix-caching"], ["--disable-log-stats"],
    ["--reasoning-parser", "qwen3"],  # a real flag although a prefix of the refused --reasoning-parser-plugin
    ["--reasoning-parser=qwen3"], ["--reasoning_parser", "qwen3"],
    ["--chat-template-content-format", "openai"], ["--seed", "-1"], ["--max-num-batched-tokens=8192"],
    ["--compilation-config", '{"level": 3}'], ["--compilation-config.level", "3"], ["--lora-dtype", "auto"],
    ["--override-generation-config", '{"stop": "--lora-modules"}'],  # a value, not a flag
]


@pytest.mark.parametrize("extra", ACCEPTED, ids=[" ".join(x) for x in ACCEPTED])
def test_ordinary_flags_pass_both(extra: list[str]) -> None:
    spec = api.AdapterDeploymentSpec.model_validate(ad(*extra)["spec"])
    assert crdcheck.check(ad(*extra), AD_CRD) == []
    assert vllm.server_args(spec)[-len(extra):] == extra  # appended as given


def _forms() -> list[str]:
    """Every prefix of every refused flag (and of a few accepted ones), with underscores, =value
    and .key forms, short options and plain values."""
    out: set[str] = {"", "-", "--", "-1", "-0.5", "value", "/path", "---x", "-tp", "-O", "--=x", "--.x"}
    names = [f[2:] for f in api.REFUSED_VLLM_FLAGS] + ["reasoning-parser", "max-num-seqs", "enforce-eager",
                                                       "model-impl", "enable-prefix-caching", "seed"]
    for n in names:
        for k in range(1, len(n) + 2):
            p = n[:k]
            for q in {p, p.replace("-", "_"), p + "x"}:
                out |= {f"--{q}", f"--{q}=v", f"--{q}.k", f"--{q}=a=/b", f"-{q}"}
    return sorted(out)


def test_the_crd_regex_refuses_exactly_what_the_model_refuses() -> None:
    pattern = re2.compile(api.REFUSED_VLLM_ARG_REGEX)
    forms = _forms()
    assert len(forms) > 3000
    differ = [a for a in forms if bool(pattern.search(a)) != (api.refused_vllm_arg(a) is not None)]
    assert differ == []
    # and the rule as the API server evaluates it (celpy, RE2), on a sample
    rule = AD_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["vllm"][
        "x-kubernetes-validations"][0]["rule"]
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    for a in forms[::37] + ["--lora_mod", "--reasoning-parser", "--reasoning-parser-p", "-tp", "-1"]:
        ok = bool(program.evaluate({"self": celpy.json_to_cel({"extraArgs": [a]})}))
        assert ok == (api.refused_vllm_arg(a) is None), a


def test_the_rule_fits_the_api_servers_cost_budget() -> None:
    """The API server refuses a CRD whose rule's estimated cost exceeds 10^7 (StaticEstimatedCostLimit).
    The API server estimates `matches` as ceil(len(string) * 0.1) * len(regex) per element (calibrated on
    kube-apiserver 1.36, which refused 64 items of 1024 characters "by factor of 2.4x": this formula gives
    23.7 M for them); the items' maxLength bounds it (without one the estimate assumes a 3 MB string)."""
    vspec = AD_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["vllm"]
    items = vspec["properties"]["extraArgs"]
    assert items["items"]["maxLength"] == api.EXTRA_ARG_MAX_LENGTH
    def cost(max_items: int, max_length: int) -> int:
        return max_items * (math.ceil(max_length * 0.1) * len(api.REFUSED_VLLM_ARG_REGEX) + 10)

    assert 2.3e7 < cost(64, 1024) < 2.5e7  # what the real API server refused, 2.4x over the budget
    assert cost(items["maxItems"], items["items"]["maxLength"]) < 0.7 * 10_000_000  # headroom for more flags


def test_the_description_lists_every_refused_flag() -> None:
    desc = api.VllmSpec.model_fields["extra_args"].description or ""
    assert all(f in desc for f in api.REFUSED_VLLM_FLAGS)


def test_trust_remote_code_is_a_field_off_by_default() -> None:
    off = api.AdapterDeploymentSpec.model_validate({"baseModel": "m"})
    assert "--trust-remote-code" not in vllm.server_args(off)
    on = api.AdapterDeploymentSpec.model_validate({"baseModel": "m", "vllm": {"trustRemoteCode": True}})
    assert vllm.server_args(on).count("--trust-remote-code") == 1


def test_server_args_refuses_a_spec_that_skipped_validation() -> None:
    ok = api.AdapterDeploymentSpec.model_validate({"baseModel": "m"})
    bad = api.VllmSpec.model_construct(**{**ok.vllm.__dict__, "extra_args": ["--lora-modules", "x=/y"]})
    spec = api.AdapterDeploymentSpec.model_construct(**{**ok.__dict__, "vllm": bad})
    with pytest.raises(ValueError, match="--lora-modules is refused"):
        vllm.server_args(spec)


def test_an_overlong_argument_is_refused_by_both() -> None:
    long = "--override-generation-config=" + "x" * api.EXTRA_ARG_MAX_LENGTH
    with pytest.raises(ValidationError):
        api.AdapterDeploymentSpec.model_validate(ad(long)["spec"])
    assert crdcheck.check(ad(long), AD_CRD)
