"""Is an adapter trained on the base model an AdapterDeployment serves? The operator's side. Pure.

The decision itself is :func:`tuneop.serving.guard.check_base_model`, which the guard applies in
every vLLM pod when it loads an adapter (it knows the served model's shape). The operator applies
the same rule earlier, without asking a pod, where it can:

- :func:`early_refusals`: a ``fineTuneJobRef`` adapter whose FineTuneJob recorded another base
  model name and no ``baseModelInfo`` (an older trainer) cannot be told compatible by anyone, so
  it is not even sent to the pods. With ``baseModelInfo`` the guard decides (it knows the shape).
- :func:`held`: after a pod's guard refused an adapter for its base model, it is not sent again
  until what the refusal depended on changes (path, sha256, allowBaseModelMismatch, baseModel)
  or ``RETRY_AFTER_S`` passed (files replaced in place on a PVC), so a refusal is no hot loop.

``allowBaseModelMismatch: true`` on an adapter skips both (and the guard's check).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..api.adapterdeployment import AdapterDeploymentSpec
from ..serving import guard

REASON = "BaseModelMismatch"  # status.adapters[].reason and the Event's reason
GUARD_REASON = guard.BASE_MISMATCH  # the guard's refusal reason (its metric label)
RETRY_AFTER_S = 300.0


def allowed(spec: AdapterDeploymentSpec) -> dict[str, bool]:
    """Adapter name -> allowBaseModelMismatch."""
    return {a.name: bool(a.allow_base_model_mismatch) for a in spec.adapters}


def early_refusals(
    spec: AdapterDeploymentSpec,
    finetunejobs: Mapping[str, Optional[Mapping[str, Any]]],
    desired: Optional[Sequence[Mapping[str, Any]]] = None,
) -> dict[str, str]:
    """Adapter name -> why it is refused without asking a pod (see the module docstring). Only
    ``fineTuneJobRef`` adapters that are ready to load (``desired``'s ``ready``, when given)."""
    ready = None if desired is None else {d["name"] for d in desired if d.get("ready")}
    out: dict[str, str] = {}
    for a in spec.adapters:
        if a.fine_tune_job_ref is None or a.allow_base_model_mismatch:
            continue
        if ready is not None and a.name not in ready:
            continue
        ftj = finetunejobs.get(a.fine_tune_job_ref.name) or {}
        recorded = ((ftj.get("status") or {}).get("adapter") or {})
        info = recorded.get("baseModelInfo") if isinstance(recorded.get("baseModelInfo"), dict) else None
        if info and all(info.get(f) is not None for f in guard.SHAPE_FIELDS):
            continue  # the guard compares the recorded shape with the served model's
        name = recorded.get("baseModel") or (ftj.get("spec") or {}).get("baseModel")
        why = guard.check_base_model({"name": name, "info": info}, {"names": [spec.base_model], "info": None})
        if why:
            out[a.name] = (f"FineTuneJob {a.fine_tune_job_ref.name}: {why}; set allowBaseModelMismatch: true "
                           "on the adapter to serve it anyway")
    return out


def fingerprint(spec: AdapterDeploymentSpec, desired: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a base model refusal of this adapter depends on."""
    name = desired["name"]
    return (desired.get("path"), desired.get("sha256"), allowed(spec).get(name, False), spec.base_model)


def held(memo: Optional[tuple[tuple[Any, ...], str, float]], fp: tuple[Any, ...], now: float,
         retry_after: float = RETRY_AFTER_S) -> Optional[str]:
    """The remembered refusal message while it still stands (same fingerprint, younger than
    retry_after): do not load again. None: try to load. memo: (fingerprint, message, when)."""
    if memo is None:
        return None
    old_fp, message, at = memo
    if old_fp != fp or now - at >= retry_after:
        return None
    return message
