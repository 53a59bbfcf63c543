"""vLLM LoRA settings derived from the adapters an AdapterDeployment serves (servingdefaults, pure)."""
from __future__ import annotations

import json
import re
import site
from pathlib import Path
from typing import Any, Optional

import pytest
from pydantic import ValidationError

from tuneop.adapterdeployment import builders as b
from tuneop.adapterdeployment import servingdefaults as sd
from tuneop.adapterdeployment.handlers import rank_refusals
from tuneop.adapterdeployment.reconcile import reduce_status
from tuneop.adapterdeployment.vllm import server_args
from tuneop.api.adapterdeployment import AdapterDeploymentSpec
from tuneop.api.servingdefaults import VLLM_LORA_RANKS, ServingStatus


def spec(adapters: Optional[list[dict[str, Any]]] = None, **vllm: Any) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate({"baseModel": "Qwen/Qwen3-8B", "adapters": adapters or [],
                                                 "vllm": vllm})


def ref(name: str) -> dict[str, Any]:
    return {"name": name, "fineTuneJobRef": {"name": name}}


def pvc(name: str) -> dict[str, Any]:
    return {"name": name, "source": {"pvc": {"claimName": "adapters", "path": name}}}


def ftj(r: Optional[int] = None, type_: Optional[str] = None) -> dict[str, Any]:
    adapter: dict[str, Any] = {}
    if r is not None:
        adapter["r"] = r
    if type_ is not None:
        adapter["type"] = type_
    return {"spec": {"adapter": adapter} if adapter else {}}


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_vllm_ranks_are_vllms_own():
    # the one list of ranks vLLM accepts, read from the installed vLLM's source when it is there
    for root in site.getsitepackages():
        src = Path(root) / "vllm" / "config" / "lora.py"
        if src.exists():
            m = re.search(r"MaxLoRARanks = Literal\[([0-9, ]+)\]", src.read_text())
            assert m is not None
            assert tuple(int(x) for x in m.group(1).split(",")) == VLLM_LORA_RANKS
            break
    else:
        pytest.skip("vLLM is not installed here")


@pytest.mark.parametrize("rank,want", [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (64, 64), (65, 128),
                                       (300, 320), (321, 512), (512, 512), (1024, 512)])
def test_supported_rank_is_the_smallest_vllm_rank_not_below(rank, want):
    assert sd.supported_rank(rank) == want


def test_rank_from_vllms_refusal_only():
    msg = ("400 Call to add_lora method failed: Worker failed with error 'LoRA rank 64 is greater than "
           "max_lora_rank 16.', please check the stack trace above")
    assert sd.rank_from_error(msg) == 64
    assert sd.rank_from_error("500 CUDA hiccup") is None
    assert sd.rank_from_error("") is None
    assert rank_refusals({"a": f"load on pod p failed: {msg}", "b": "load on pod p failed: 500 CUDA hiccup",
                          "c": {"message": "refused by pod p: base model", "reason": "BaseModelMismatch"}}) == {"a": 64}


def test_finetunejob_rank_from_its_spec_default_and_full():
    assert sd.finetunejob_rank(ftj(32)) == 32
    assert sd.finetunejob_rank(ftj()) == 16  # FineTuneJob's default adapter.r
    assert sd.finetunejob_rank(ftj(8, "qlora")) == 8
    assert sd.finetunejob_rank(ftj(32, "full")) is None  # not a LoRA adapter
    assert sd.finetunejob_rank(None) is None
    assert sd.finetunejob_rank({"spec": {"adapter": {"r": "x"}}}) is None


def test_ranks_from_finetunejobs_pods_and_unknown():
    s = spec([ref("a"), ref("missing"), pvc("p"), pvc("q")])
    previous = {"derivedFrom": [{"name": "p", "rank": 32, "source": "pod"},
                                {"name": "a", "rank": 8, "source": "pod"},  # below its job's: the job's counts
                                {"name": "gone", "rank": 512, "source": "pod"}]}
    ranks = sd.adapter_ranks(s, {"a": ftj(16)}, previous, refused={"q": 64})
    assert ranks == [
        {"name": "a", "rank": 16, "source": "fineTuneJob"},
        {"name": "missing", "source": "unknown"},
        {"name": "p", "rank": 32, "source": "pod"},
        {"name": "q", "rank": 64, "source": "pod"},
    ]
    # a pod that found a FineTuneJob's adapter bigger than its spec says: the larger counts
    assert sd.adapter_ranks(spec([ref("a")]), {"a": ftj(16)}, None, {"a": 128}) == \
        [{"name": "a", "rank": 128, "source": "pod"}]


def test_derive_from_the_largest_rank_and_maxloras_from_the_rank():
    s = spec([ref("a"), ref("b")])
    out = sd.derive(s, sd.adapter_ranks(s, {"a": ftj(8), "b": ftj(12)}))
    assert (out["maxLoraRank"], out["maxLoraRankFrom"]) == (16, "adapters")
    assert (out["maxLoras"], out["maxLorasFrom"]) == (32, "maxLoraRank")
    assert "largest adapter rank is 12 (b)" in out["message"]
    ServingStatus.model_validate(out)  # the status model takes it as is
    for rank, loras in [(8, 32), (32, 16), (64, 8), (128, 4), (256, 2), (320, 1), (512, 1)]:
        got = sd.derive(s, [{"name": "a", "rank": rank, "source": "fineTuneJob"}])
        assert (got["maxLoraRank"], got["maxLoras"]) == (rank, loras)
        assert got["maxLoras"] * got["maxLoraRank"] <= 8 * 64  # never more LoRA memory than the former default


def test_nothing_known_gives_the_default_and_says_why():
    s = spec([pvc("p")])
    out = sd.derive(s, sd.adapter_ranks(s, {}))
    assert (out["maxLoraRank"], out["maxLoras"]) == (16, 32)
    assert "no adapter rank known" in out["message"] and "p" in out["message"]
    assert out["derivedFrom"] == [{"name": "p", "source": "unknown"}]


def test_derived_rank_only_grows():
    s = spec([ref("a")])
    first = sd.derive(s, sd.adapter_ranks(s, {"a": ftj(64)}))
    assert first["maxLoraRank"] == 64
    # a smaller adapter replaces it, or it is removed, or its job is gone: kept at 64
    for adapters, jobs in [([ref("b")], {"b": ftj(8)}), ([], {}), ([ref("a")], {})]:
        s2 = spec(adapters)
        again = sd.derive(s2, sd.adapter_ranks(s2, jobs, first), first)
        assert (again["maxLoraRank"], again["maxLoras"]) == (64, 8)
        assert "kept at 64" in again["message"]
    # a bigger one: up
    s3 = spec([ref("a"), ref("c")])
    up = sd.derive(s3, sd.adapter_ranks(s3, {"a": ftj(64), "c": ftj(100)}, first), first)
    assert (up["maxLoraRank"], up["maxLoras"]) == (128, 4)


def test_explicit_spec_values_win_and_are_no_floor():
    s = spec([ref("a")], maxLoraRank=16, maxLoras=3)
    out = sd.derive(s, sd.adapter_ranks(s, {"a": ftj(64)}))
    assert (out["maxLoraRank"], out["maxLoraRankFrom"], out["maxLoras"], out["maxLorasFrom"]) == \
        (16, "spec", 3, "spec")
    assert "vLLM refuses adapters of a higher rank: a (64)" in out["message"]
    # unset again: derived from the adapters, the spec's value is not a floor
    s2 = spec([ref("a")])
    back = sd.derive(s2, sd.adapter_ranks(s2, {"a": ftj(8)}, out), out)
    assert (back["maxLoraRank"], back["maxLoraRankFrom"]) == (8, "adapters")
    # only the rank set: maxLoras follows it, within maxCpuLoras
    s3 = spec([], maxLoraRank=32, maxCpuLoras=4)
    assert sd.derive(s3, [])["maxLoras"] == 4


def test_spec_refuses_ranks_vllm_does_not_accept():
    with pytest.raises(ValidationError, match="20 is not a rank vLLM accepts"):
        spec(maxLoraRank=20)
    with pytest.raises(ValidationError, match="maxCpuLoras must be at least"):
        spec(maxLoras=8, maxCpuLoras=4)
    assert spec(maxCpuLoras=4).vllm.max_loras is None


def test_resolved_spec_reaches_the_deployment_args():
    s = spec([ref("a")])
    serving = sd.derive(s, sd.adapter_ranks(s, {"a": ftj(32)}))
    ad = {"metadata": {"name": "qwen", "namespace": "ns", "uid": "u"}, "spec": {}}
    dep = b.build_deployment(ad, sd.resolved(s, serving), finetunejobs={"a": None})
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (arg(args, "--max-lora-rank"), arg(args, "--max-loras")) == ("32", "16")
    # without the operator (process tests, benchmarks): the spec's own values, else the defaults
    assert (arg(server_args(s), "--max-lora-rank"), arg(server_args(s), "--max-loras")) == ("16", "32")
    s2 = spec(maxLoraRank=8, maxLoras=2)
    assert (arg(server_args(s2), "--max-lora-rank"), arg(server_args(s2), "--max-loras")) == ("8", "2")


def test_status_serving_is_written_and_kept_on_spec_error():
    body = {"metadata": {"name": "qwen", "namespace": "ns", "generation": 1}, "spec": {},
            "status": {"serving": {"maxLoraRank": 64, "maxLoras": 8}}}
    s = spec([ref("a")])
    serving = sd.derive(s, sd.adapter_ranks(s, {"a": ftj(16)}))
    st = reduce_status(body, adapters=[], deployment=None, now="t", serving=serving)
    assert st["serving"]["maxLoraRank"] == 16
    assert reduce_status(body, adapters=[], deployment=None, now="t")["serving"]["maxLoraRank"] == 64
    bad = reduce_status(body, adapters=[], deployment=None, now="t", spec_error="vllm.maxLoraRank: bad")
    assert bad["serving"] == {"maxLoraRank": 64, "maxLoras": 8}
    json.dumps(st)

