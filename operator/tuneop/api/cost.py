"""``status.cost`` of a FineTuneJob: what it is expected to cost before anything runs, and what it
cost at the end (``spec.maxCostUSD`` is checked against the estimate; see ``tuneop/cost.py``)."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from .common import Model


class CostStatus(Model):
    """The cost of a FineTuneJob: an estimate before anything is created, the actual cost at the end."""

    model_config = Model.model_config | {"extra": "ignore"}

    estimate_usd: Optional[float] = Field(
        default=None, alias="estimateUSD",
        description="Estimated cost in USD before anything was created (none: see basis).",
    )
    estimated_gpu_hours: Optional[float] = Field(
        default=None, description="backend kubernetes: estimated GPU-hours (all GPUs of all nodes)."
    )
    estimated_tokens: Optional[int] = Field(
        default=None, description="Tokens the estimate counts (training tokens x epochs, plus evaluation at Together)."
    )
    source: Optional[str] = Field(
        default=None,
        description="Where the estimate comes from: together (Together's own estimate-price) or "
        "throughput (dataset tokens / the trainer's measured tokens per second x the operator's GPU price).",
    )
    basis: Optional[str] = Field(
        default=None, description="How the estimate was made, or why there is no USD figure."
    )
    actual_usd: Optional[float] = Field(
        default=None, alias="actualUSD",
        description="What the job cost: Together's total_price, or the training Job's GPU time x the GPU price.",
    )
    actual_gpu_hours: Optional[float] = Field(
        default=None, description="backend kubernetes: the training Job's run time x its GPUs, in hours."
    )
    cancelled_over_limit: Optional[bool] = Field(
        default=None, description="backend together: the job was cancelled because its cost passed maxCostUSD."
    )
