"""vLLM's LoRA settings that fit what an AdapterDeployment serves (status.serving). Pure: no I/O.

vLLM reserves, for every LoRA-adapted layer, ``maxLoras`` slots of ``maxLoraRank``-wide weights, and
its CPU LoRA path costs in proportion to ``maxLoraRank`` (0.37x of the base model's throughput at the
former default 64 against 0.54x at the adapters' own 16: README, Benchmarks). So when
``spec.vllm.maxLoraRank`` / ``maxLoras`` are unset:

- ``maxLoraRank`` is the smallest rank vLLM accepts (``VLLM_LORA_RANKS``) that is at least the largest
  rank of the adapters served. A rank is known from the adapter's FineTuneJob (``spec.adapter.r``: known
  before it trained, so its adapter never waits for a roll), or learnt from a pod that refused the adapter
  for its rank (vLLM's ``LoRA rank N is greater than max_lora_rank M``: the ``r`` of its
  adapter_config.json, which only a pod reads); PVC and URL adapters are unknown until then. Nothing
  known: ``DEFAULT_RANK``.
- It only grows: the previous derived value (``status.serving``) is a floor. A new adapter of a higher
  rank rolls the pods once; a smaller one, removing adapters, an unknown rank or a lost FineTuneJob
  never lowers it (no roll). An adapter refused for its rank raises it once, and its rank is kept in
  ``status.serving.derivedFrom`` (source ``pod``), so the choice does not flap.
- ``maxLoras`` depends on ``maxLoraRank`` alone: ``LORA_BUDGET // maxLoraRank`` slots (the LoRA memory
  the former default, 8 slots x rank 64, reserved: never more), 1 to ``MAX_DERIVED_LORAS``, at most
  ``vllm.maxCpuLoras``. Not the number of adapters: vLLM serves more adapters than slots (they take
  turns per batch, cached in CPU memory), and a slot count following the adapters would roll the pods
  for every adapter added.

Explicit spec values win (``from: spec``), also when an adapter's rank is above them (the message says so).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

from ..api.adapterdeployment import AdapterDeploymentSpec
from ..api.finetunejob import AdapterSpec
from ..api.servingdefaults import VLLM_LORA_RANKS

DEFAULT_RANK = 16  # vLLM's own default and a FineTuneJob's default adapter.r
LORA_BUDGET = 8 * 64  # slots x rank the former defaults (maxLoras 8, maxLoraRank 64) reserved
MAX_DERIVED_LORAS = 32
FROM_SPEC, FROM_ADAPTERS, FROM_RANK = "spec", "adapters", "maxLoraRank"
FINETUNEJOB, POD, UNKNOWN = "fineTuneJob", "pod", "unknown"
_FTJ_DEFAULT_R = int(AdapterSpec.model_fields["r"].default)
# vLLM's refusal (vllm/lora/peft_helper.py PEFTHelper.validate_legal), as the load reply carries it.
_RANK_REFUSED = re.compile(r"LoRA rank (\d+) is greater than max_lora_rank")


def supported_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is at least ``rank`` (its largest when none is)."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def rank_from_error(message: str) -> Optional[int]:
    """The adapter's rank from vLLM's refusal of a load for its rank; None for any other error."""
    m = _RANK_REFUSED.search(message or "")
    return int(m.group(1)) if m else None


def finetunejob_rank(ftj: Optional[Mapping[str, Any]]) -> Optional[int]:
    """``spec.adapter.r`` of a FineTuneJob (its default when unset); None: no job, or full weights."""
    if not ftj:
        return None
    adapter = (ftj.get("spec") or {}).get("adapter") or {}
    if adapter.get("type") == "full":
        return None
    try:
        r = int(adapter.get("r") or _FTJ_DEFAULT_R)
    except (TypeError, ValueError):
        return None
    return r if r >= 1 else None


def adapter_ranks(
    spec: AdapterDeploymentSpec,
    finetunejobs: Mapping[str, Optional[Mapping[str, Any]]],
    previous: Optional[Mapping[str, Any]] = None,
    refused: Optional[Mapping[str, int]] = None,
) -> list[dict[str, Any]]:
    """``status.serving.derivedFrom``: per adapter, in spec order, ``{name, rank, source}``.

    previous: the last ``status.serving`` (the ranks pods reported stay known); refused: adapter ->
    rank a pod just refused it for. Of the ranks known for an adapter the largest counts."""
    learned: dict[str, int] = {}
    for entry in (previous or {}).get("derivedFrom") or []:
        if isinstance(entry, Mapping) and entry.get("source") == POD and isinstance(entry.get("rank"), int):
            learned[str(entry.get("name"))] = int(entry["rank"])
    for name, rank in (refused or {}).items():
        learned[name] = max(rank, learned.get(name, 0))
    out: list[dict[str, Any]] = []
    for a in spec.adapters:
        ftj_rank = finetunejob_rank(finetunejobs.get(a.fine_tune_job_ref.name)) if a.fine_tune_job_ref else None
        pod_rank = learned.get(a.name)
        if pod_rank is not None and pod_rank > (ftj_rank or 0):
            out.append({"name": a.name, "rank": pod_rank, "source": POD})
        elif ftj_rank is not None:
            out.append({"name": a.name, "rank": ftj_rank, "source": FINETUNEJOB})
        else:
            out.append({"name": a.name, "source": UNKNOWN})
    return out


def derive(
    spec: AdapterDeploymentSpec,
    ranks: Iterable[Mapping[str, Any]],
    previous: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """``status.serving``: the maxLoraRank and maxLoras the pods get, where each comes from, the
    adapters' ranks and a message (see the module docstring)."""
    v = spec.vllm
    prev = previous or {}
    ranks = [dict(r) for r in ranks]
    known = [r for r in ranks if r.get("rank")]
    top = max(known, key=lambda r: int(r["rank"]), default=None)
    notes: list[str] = []
    if v.max_lora_rank is not None:
        rank, rank_from = v.max_lora_rank, FROM_SPEC
        notes.append(f"maxLoraRank {rank} from spec.vllm")
        above = [f"{r['name']} ({r['rank']})" for r in known if int(r["rank"]) > rank]
        if above:
            notes.append(f"vLLM refuses adapters of a higher rank: {', '.join(above)}")
    else:
        rank_from = FROM_ADAPTERS
        if top is None:
            rank = DEFAULT_RANK
            notes.append(f"maxLoraRank {rank}: no adapter rank known yet")
        else:
            rank = supported_rank(int(top["rank"]))
            notes.append(f"maxLoraRank {rank}: the largest adapter rank is {top['rank']} ({top['name']})")
            if int(top["rank"]) > rank:
                notes.append(f"above vLLM's largest rank {rank}: vLLM refuses it")
        floor = prev.get("maxLoraRank")
        if prev.get("maxLoraRankFrom") == FROM_ADAPTERS and isinstance(floor, int) and floor in VLLM_LORA_RANKS \
                and floor > rank:
            rank = floor
            notes.append(f"kept at {floor}: a derived maxLoraRank never shrinks (no roll)")
    if v.max_loras is not None:
        loras, loras_from = v.max_loras, FROM_SPEC
    else:
        loras, loras_from = max(1, min(MAX_DERIVED_LORAS, LORA_BUDGET // rank)), FROM_RANK
        if v.max_cpu_loras is not None:
            loras = min(loras, v.max_cpu_loras)
        notes.append(f"maxLoras {loras}: {LORA_BUDGET} / maxLoraRank, 1 to {MAX_DERIVED_LORAS}")
    unknown = [r["name"] for r in ranks if not r.get("rank") and r.get("source") == UNKNOWN]
    if unknown and rank_from == FROM_ADAPTERS:
        notes.append(f"rank not known until a pod loads it: {', '.join(unknown)}")
    return {
        "maxLoraRank": rank, "maxLoraRankFrom": rank_from,
        "maxLoras": loras, "maxLorasFrom": loras_from,
        "derivedFrom": ranks,
        "message": "; ".join(notes),
    }


def resolved(spec: AdapterDeploymentSpec, serving: Mapping[str, Any]) -> AdapterDeploymentSpec:
    """``spec`` with ``vllm.maxLoraRank`` and ``vllm.maxLoras`` set to ``serving``'s (what the pods get)."""
    vllm = spec.vllm.model_copy(update={"max_lora_rank": int(serving["maxLoraRank"]),
                                        "max_loras": int(serving["maxLoras"])})
    return spec.model_copy(update={"vllm": vllm})


def settings(spec: AdapterDeploymentSpec) -> tuple[int, int]:
    """(maxLoraRank, maxLoras) of ``spec`` alone: its own values, else derived knowing no adapter rank
    (the vLLM server started outside the operator: tests, benchmarks, ``tuneop render`` without jobs)."""
    v = spec.vllm
    if v.max_lora_rank is not None and v.max_loras is not None:
        return v.max_lora_rank, v.max_loras
    s = derive(spec, [])
    return int(s["maxLoraRank"]), int(s["maxLoras"])
