"""status.serving of an AdapterDeployment: the vLLM LoRA settings its pods run with and where they
come from (explicit in spec.vllm, or derived from the adapters it serves).

The derivation itself is in ``adapterdeployment/servingdefaults.py``.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from .common import Model

# The ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py MaxLoRARanks, vLLM 0.32.0).
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterRank(Model):
    """The LoRA rank of one served adapter, as far as tuneop knows it."""

    model_config = Model.model_config | {"extra": "ignore"}

    name: str
    rank: Optional[int] = Field(default=None, description="Its rank; absent while unknown.")
    source: str = Field(
        description="fineTuneJob: spec.adapter.r of its FineTuneJob; pod: a vLLM pod refused it for its rank "
        "(the rank its adapter_config.json has); unknown: not known until a pod loads it.",
        json_schema_extra={"enum": ["fineTuneJob", "pod", "unknown"]},
    )


class ServingStatus(Model):
    """The vLLM LoRA settings the pods run with. Derived ones only grow: a new adapter of a higher rank
    rolls the pods, removing adapters never does."""

    model_config = Model.model_config | {"extra": "ignore"}

    max_lora_rank: int = Field(description="--max-lora-rank of the pods.")
    max_lora_rank_from: str = Field(
        description="spec (vllm.maxLoraRank) or adapters (the smallest rank vLLM accepts that is at least "
        "the largest known adapter rank, never lower than before).",
        json_schema_extra={"enum": ["spec", "adapters"]},
    )
    max_loras: int = Field(description="--max-loras of the pods.")
    max_loras_from: str = Field(
        description="spec (vllm.maxLoras) or maxLoraRank (as many slots as the former default's LoRA memory, "
        "8 x rank 64, holds at maxLoraRank: 512 / maxLoraRank, 1 to 32, at most vllm.maxCpuLoras).",
        json_schema_extra={"enum": ["spec", "maxLoraRank"]},
    )
    derived_from: list[AdapterRank] = Field(default_factory=list, description="The rank of each adapter served.")
    message: Optional[str] = None
