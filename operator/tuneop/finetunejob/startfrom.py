"""spec.startFrom: what a FineTuneJob continues from, decided once per spec and pinned.

Pure: the FineTuneJob's spec, the pin already in its status, and (for ``startFrom.fineTuneJob``)
the referenced FineTuneJob as read -> a :class:`Resolution`: pinned (the new
``status.startedFrom``), waiting (the referenced job has not succeeded yet) or invalid (a message
naming the field). Both reducers call :func:`resolve` after a new spec has reset the status and
before they create anything; the pin is then the input of the children (a mount and
``startFrom`` in the resolved job config) and of Together's ``from_checkpoint``.

Combinations:

=====================  ==========================  ===========================================
this job's backend     startFrom                   continues from
=====================  ==========================  ===========================================
kubernetes             fineTuneJob (kubernetes)    its ``<output>/adapter`` (sha256 pinned)
kubernetes             fineTuneJob (together)      the adapter its download Job wrote (pinned)
kubernetes             pvc                         the directory (sha256 from the spec, else
                                                   recorded by the trainer)
together               fineTuneJob (together)      its Together job id (``from_checkpoint``)
together               togetherCheckpoint          that id (as ``together.fromCheckpoint``)
together               fineTuneJob (kubernetes)    refused: Together cannot load an adapter
                                                   from this cluster's volumes
together               pvc                         refused: same reason
kubernetes             togetherCheckpoint          refused by the schema (CEL)
=====================  ==========================  ===========================================
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from ..api.finetunejob import FineTuneJobSpec
from ..jobconfig import CONFIG_KEY, parse_location, pvc_location

WAITING_FOR_START = "WaitingForStartFrom"
FIELD_JOB = "spec.startFrom.fineTuneJob"
FIELD_PVC = "spec.startFrom.pvc"


@dataclass(frozen=True)
class Resolution:
    """``pinned``: the status.startedFrom to keep (None: nothing to start from); ``waiting`` or
    ``invalid``: a message (invalid names the field)."""

    pinned: Optional[dict[str, Any]] = None
    waiting: Optional[str] = None
    invalid: Optional[str] = None


def referenced_job(spec: FineTuneJobSpec) -> Optional[str]:
    sf = spec.start_from
    return sf.fine_tune_job.name if sf is not None and sf.fine_tune_job is not None else None


def pinned_for(status: Optional[dict[str, Any]], spec_hash: Optional[str]) -> Optional[dict[str, Any]]:
    """The pin of the current spec in `status` (None when there is none, or it is of an older spec)."""
    st = status or {}
    pin = st.get("startedFrom")
    return dict(pin) if isinstance(pin, dict) and pin and spec_hash is not None and st.get("specHash") == spec_hash else None


def needs_source(spec: FineTuneJobSpec, status: Optional[dict[str, Any]], spec_hash: Optional[str]) -> Optional[str]:
    """The FineTuneJob the reconcile must read: the referenced one while nothing is pinned for this spec."""
    name = referenced_job(spec)
    if name is None or pinned_for(status, spec_hash) is not None:
        return None
    return name


def start_claim(pin: Optional[dict[str, Any]]) -> Optional[str]:
    """The PVC the training pods mount (read-only) to read the pinned starting adapter."""
    parsed = parse_location(str((pin or {}).get("location") or ""))
    return parsed[0] if parsed else None


def spec_pin(spec: FineTuneJobSpec) -> Optional[dict[str, Any]]:
    """The pin that needs nothing but the spec (pvc, togetherCheckpoint, together.fromCheckpoint)."""
    sf = spec.start_from
    if sf is None:
        if spec.together is not None and spec.together.from_checkpoint:
            return {"togetherCheckpoint": spec.together.from_checkpoint}
        return None
    if sf.pvc is not None:
        pin: dict[str, Any] = {"location": pvc_location(sf.pvc.claim_name, sf.pvc.path)}
        if sf.pvc.sha256:
            pin["sha256"] = sf.pvc.sha256
        return pin
    if sf.together_checkpoint is not None:
        return {"togetherCheckpoint": sf.together_checkpoint}
    return None


def _phase(job: dict[str, Any]) -> str:
    return str((job.get("status") or {}).get("phase") or "Pending")


def resolve(
    spec: FineTuneJobSpec, *, own_name: str, pinned: Optional[dict[str, Any]],
    source: Optional[dict[str, Any]], now: str,
) -> Resolution:
    """What `spec` starts from. `pinned`: the pin already in the status for this spec (kept as is);
    `source`: the FineTuneJob ``startFrom.fineTuneJob`` names, as read (None: absent). A starting
    adapter where this job writes its own is refused: the new adapter would replace it."""
    res = _resolve(spec, own_name=own_name, pinned=pinned, source=source, now=now)
    location = (res.pinned or {}).get("location")
    if pinned is None and location is not None and spec.backend != "together":
        out = spec.output.pvc
        own = pvc_location(out.claim_name, f"{out.path}/adapter" if out.path else "adapter")
        if str(location).rstrip("/") == own:
            field = FIELD_JOB if res.pinned and res.pinned.get("fineTuneJob") else FIELD_PVC
            return Resolution(invalid=f"{field}: the starting adapter is {location}, where this job writes its "
                                      "own (spec.output): the new adapter would replace it; use another output path")
    return res


def _resolve(
    spec: FineTuneJobSpec, *, own_name: str, pinned: Optional[dict[str, Any]],
    source: Optional[dict[str, Any]], now: str,
) -> Resolution:
    if pinned is not None:
        return Resolution(pinned=pinned)
    sf = spec.start_from
    if sf is not None and sf.pvc is not None and spec.backend == "together":
        return Resolution(invalid=f"{FIELD_PVC}: backend together trains at Together, which cannot read this "
                                  "cluster's volumes; use startFrom.fineTuneJob (a together job) or "
                                  "startFrom.togetherCheckpoint")
    name = referenced_job(spec)
    if name is None:
        own = spec_pin(spec)
        return Resolution(pinned={**own, "pinnedAt": now} if own else None)
    if name == own_name:
        return Resolution(invalid=f"{FIELD_JOB}: a FineTuneJob cannot start from itself")
    if source is None:
        return Resolution(waiting=f"waiting for FineTuneJob {name} to exist and succeed ({FIELD_JOB})")
    src_spec = source.get("spec") or {}
    src_status = source.get("status") or {}
    src_backend = str(src_spec.get("backend") or "kubernetes")
    phase = _phase(source)
    if phase == "Failed":
        why = src_status.get("reason") or "Failed"
        return Resolution(invalid=f"{FIELD_JOB}: FineTuneJob {name} failed ({why}): there is no adapter to "
                                  "continue from")
    if src_spec.get("baseModel") != spec.base_model:
        return Resolution(invalid=f"{FIELD_JOB}: FineTuneJob {name} trains baseModel {src_spec.get('baseModel')!r}, "
                                  f"this job's baseModel is {spec.base_model!r}: an adapter only continues on "
                                  "the base model it was trained on")
    if (src_spec.get("adapter") or {}).get("type") == "full":
        return Resolution(invalid=f"{FIELD_JOB}: FineTuneJob {name} trains all weights (adapter.type full), not "
                                  "an adapter; set baseModel to its output instead")
    if spec.backend == "together" and src_backend != "together":
        return Resolution(invalid=f"{FIELD_JOB}: FineTuneJob {name} has backend {src_backend}; backend together "
                                  "continues only from a together FineTuneJob (Together cannot load an adapter "
                                  "from this cluster's volumes)")
    meta = source.get("metadata") or {}
    current = meta.get("generation") is None or src_status.get("observedGeneration") == meta.get("generation")
    if phase != "Succeeded" or not current:
        return Resolution(waiting=f"waiting for FineTuneJob {name} to succeed (phase {phase}; {FIELD_JOB})")
    adapter = src_status.get("adapter") or {}
    pin: dict[str, Any] = {"fineTuneJob": name, "baseModel": spec.base_model, "pinnedAt": now}
    if spec.backend == "together":
        job_id = (src_status.get("together") or {}).get("jobId")
        if not job_id:
            return Resolution(invalid=f"{FIELD_JOB}: FineTuneJob {name} succeeded without a Together job id")
        pin["togetherCheckpoint"] = str(job_id)
        if adapter.get("sha256"):
            pin["sha256"] = str(adapter["sha256"])
        return Resolution(pinned=pin)
    sha = str(adapter.get("sha256") or "")
    location = str(adapter.get("location") or "")
    if not sha or parse_location(location) is None:
        return Resolution(invalid=f"{FIELD_JOB}: FineTuneJob {name} succeeded without an adapter location and "
                                  "sha256 to pin")
    pin.update(location=location, sha256=sha)
    return Resolution(pinned=pin)


def pin_from_config(spec: FineTuneJobSpec, config_map: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The pin a ConfigMap ``<name>-config`` of this spec already carries (a reconcile that created it
    died before writing the status): the pods will load that one, so the status must say that one."""
    name = referenced_job(spec)
    if name is None or not config_map:
        return None
    try:
        doc = json.loads(((config_map.get("data") or {}).get(CONFIG_KEY)) or "{}")
    except ValueError:
        return None
    start = doc.get("startFrom") if isinstance(doc, dict) else None
    if not isinstance(start, dict) or not start.get("sha256") or parse_location(str(start.get("location"))) is None:
        return None
    return {"fineTuneJob": name, "location": str(start["location"]), "sha256": str(start["sha256"]),
            "baseModel": spec.base_model}


def describe(pin: dict[str, Any]) -> str:
    parts = []
    if pin.get("fineTuneJob"):
        parts.append(f"FineTuneJob {pin['fineTuneJob']}")
    if pin.get("location"):
        parts.append(str(pin["location"]))
    if pin.get("togetherCheckpoint"):
        parts.append(f"Together checkpoint {pin['togetherCheckpoint']}")
    if pin.get("sha256"):
        parts.append(f"sha256 {str(pin['sha256'])[:12]}")
    return ", ".join(parts)
