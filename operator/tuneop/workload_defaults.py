"""Platform defaults for the pods tuneop creates (pure: dict in, dict out).

A platform team sets them once for the operator (chart value ``workloads.<kind>``, passed as the
JSON of ``--workload-defaults`` / ``$TUNEOP_WORKLOAD_DEFAULTS``) instead of asking every tenant to
repeat node selectors, tolerations and sizes in each resource::

    {"trainer": {"nodeSelector": {...}, "tolerations": [...], "cpu": "8", "memory": "64Gi"},
     "vllm":    {"nodeSelector": {...}, "tolerations": [...], "cpu": "4", "memory": "32Gi"}}

``trainer`` applies to the training pods of ``backend: kubernetes`` FineTuneJobs, ``vllm`` to the
vLLM pods of AdapterDeployments. A default fills a field only where the resource leaves it empty
(``spec.resources.nodeSelector`` {}, ``tolerations`` [], ``cpu`` / ``memory`` unset): what a user
writes always wins, field by field. Defaults are applied to the spec before the children are
built, so the FineTuneJob's own spec (and its spec hash) never changes: a running Job is never
replaced because the operator's defaults changed; a vLLM pod template that changes rolls as usual.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from .api.common import Toleration

KINDS = ("trainer", "vllm")
FIELDS = ("nodeSelector", "tolerations", "cpu", "memory")
ENV = "TUNEOP_WORKLOAD_DEFAULTS"


class DefaultsError(ValueError):
    pass


def parse(raw: Optional[str | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Validate the operator's defaults (JSON text or a mapping). Unknown kinds or fields and
    wrong types are errors that name the field, so a typo in the chart values fails at start-up."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise DefaultsError(f"workload defaults are not JSON: {e}") from None
    else:
        data = dict(raw)
    if not isinstance(data, dict):
        raise DefaultsError("workload defaults must be an object with the keys trainer and/or vllm")
    out: dict[str, dict[str, Any]] = {}
    for kind, block in data.items():
        if kind not in KINDS:
            raise DefaultsError(f"workload defaults: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        if block is None:
            continue
        if not isinstance(block, dict):
            raise DefaultsError(f"workload defaults: {kind} must be an object")
        clean: dict[str, Any] = {}
        for key, value in block.items():
            where = f"workload defaults: {kind}.{key}"
            if key not in FIELDS:
                raise DefaultsError(f"{where}: unknown field (expected one of {', '.join(FIELDS)})")
            if value in (None, "", {}, []):
                continue
            if key == "nodeSelector":
                if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in value.items()):
                    raise DefaultsError(f"{where}: must map label names to strings")
            elif key == "tolerations":
                if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                    raise DefaultsError(f"{where}: must be a list of tolerations")


                for i, t in enumerate(value):
                    for f, allowed in (("operator", ("Exists", "Equal")),
                                       ("effect", ("NoSchedule", "PreferNoSchedule", "NoExecute"))):
                        if t.get(f) is not None and t[f] not in allowed:
                            raise DefaultsError(f"{where}[{i}].{f}: must be one of {', '.join(allowed)}")
                    try:
                        Toleration.model_validate(t)
                    except ValidationError as e:
                        err = e.errors()[0]
                        loc = ".".join(str(x) for x in err["loc"])
                        raise DefaultsError(f"{where}[{i}].{loc}: {err['msg']}") from None
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise DefaultsError(f"{where}: must be a quantity such as '8' or '64Gi'")
            else:
                value = str(value)
            clean[key] = value
        if clean:
            out[kind] = clean
    return out


def apply(spec: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """The resource's spec (camelCase, as in the object) with ``defaults[kind]`` filled into
    ``spec.resources`` where it is empty. Returns a new dict; the input is not changed."""
    out = json.loads(json.dumps(dict(spec)))
    block = defaults.get(kind) or {}
    if not block:
        return out
    res = out.get("resources")
    res = dict(res) if isinstance(res, dict) else {}
    for key, value in block.items():
        if res.get(key) in (None, "", {}, []):
            res[key] = json.loads(json.dumps(value))
    out["resources"] = res
    return out


def apply_to_pod(pod_spec: dict[str, Any], block: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Fill a built pod spec (in place, and returned) with one kind's defaults where it is empty:
    ``nodeSelector``, ``tolerations``, and cpu / memory as request and limit of its first
    container (the trainer's convention). Used on the training Job's pod template after it was
    built, so the Job's spec-hash annotation (the FineTuneJob's own spec) is not affected."""
    if not block:
        return pod_spec
    if block.get("nodeSelector") and not pod_spec.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(block["nodeSelector"])
    if block.get("tolerations") and not pod_spec.get("tolerations"):
        pod_spec["tolerations"] = json.loads(json.dumps(block["tolerations"]))
    containers = pod_spec.get("containers") or []
    if containers:
        res = containers[0].setdefault("resources", {})
        for key in ("cpu", "memory"):
            if block.get(key) and key not in (res.get("requests") or {}):
                res.setdefault("requests", {})[key] = block[key]
                res.setdefault("limits", {}).setdefault(key, block[key])
        if not res:
            containers[0].pop("resources")
    return pod_spec
