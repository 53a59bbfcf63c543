"""The resolved job config: a FineTuneJob's spec plus the concrete paths the trainer reads.

Pure functions. The operator resolves against the pod's mount layout; `tuneop run` against local
directories. The trainer only ever sees paths.
"""
from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any, Callable, Optional

from .api.common import API_VERSION
from .api.finetunejob import DataSource, FineTuneJobSpec

PVC_MOUNT_ROOT = "/mnt/pvc"
CONFIGMAP_MOUNT_ROOT = "/mnt/configmap"
CONFIG_KEY = "job.json"


def pod_pvc_dir(claim: str) -> str:
    return f"{PVC_MOUNT_ROOT}/{claim}"


def pod_configmap_dir(name: str) -> str:
    return f"{CONFIGMAP_MOUNT_ROOT}/{name}"


def _join(root: str, path: str) -> str:
    return posixpath.join(root, path) if path else root


def source_path(
    src: Optional[DataSource],
    pvc_dir: Callable[[str], str],
    configmap_dir: Callable[[str], str],
) -> Optional[str]:
    if src is None:
        return None
    if src.pvc is not None:
        return _join(pvc_dir(src.pvc.claim_name), src.pvc.path)
    if src.config_map is not None:
        return _join(configmap_dir(src.config_map.name), src.config_map.key)
    return src.url


def pvc_location(claim: str, path: str) -> str:
    return f"pvc://{claim}/{path}".rstrip("/")


def parse_location(location: str) -> Optional[tuple[str, str]]:
    """``pvc://claim/path`` -> (claim, path); None for anything else."""
    if not isinstance(location, str) or not location.startswith("pvc://"):
        return None
    claim, _, path = location[len("pvc://"):].partition("/")
    if not claim or path.startswith("/") or ".." in path.split("/"):
        return None
    return claim, path


def trainer_start(pin: Optional[dict[str, Any]], pvc_dir: Callable[[str], str]) -> Optional[dict[str, Any]]:
    """``startFrom`` of the resolved job config from a pin (status.startedFrom): the directory the
    trainer loads, its location, and the sha256 it must have (when known)."""
    parsed = parse_location(str((pin or {}).get("location") or ""))
    if pin is None or parsed is None:
        return None
    claim, path = parsed
    out: dict[str, Any] = {"path": _join(pvc_dir(claim), path), "location": pin["location"]}
    if pin.get("sha256"):
        out["sha256"] = pin["sha256"]
    return out


def resolve(
    metadata: dict[str, Any],
    spec: FineTuneJobSpec,
    pvc_dir: Callable[[str], str] = pod_pvc_dir,
    configmap_dir: Callable[[str], str] = pod_configmap_dir,
    start: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Spec + metadata -> the JSON document given to `python -m tuneop.trainer --config`.
    `start`: the pinned status.startedFrom (spec.startFrom.fineTuneJob needs it; a startFrom.pvc is
    resolved from the spec when it is absent)."""
    model = spec.base_model
    if spec.model_volume is not None:
        model = _join(_join(pvc_dir(spec.model_volume.claim_name), spec.model_volume.path), model)
    paths = {
        "model": model,
        "train": source_path(spec.dataset.train, pvc_dir, configmap_dir),
        "validation": source_path(spec.dataset.validation, pvc_dir, configmap_dir),
        "test": source_path(spec.dataset.test, pvc_dir, configmap_dir),
        "output": _join(pvc_dir(spec.output.pvc.claim_name), spec.output.pvc.path),
    }
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {
            k: metadata[k] for k in ("name", "namespace", "uid", "generation") if k in metadata
        },
        "spec": spec.to_dict(),
        "paths": paths,
    }
    sf = spec.start_from
    if start is None and sf is not None and sf.pvc is not None:
        start = {"location": pvc_location(sf.pvc.claim_name, sf.pvc.path)}
        if sf.pvc.sha256:
            start["sha256"] = sf.pvc.sha256
    resolved_start = trainer_start(start, pvc_dir)
    if resolved_start is not None:
        doc["startFrom"] = resolved_start
    return doc


def local_pvc_resolver(
    yaml_dir: Path, overrides: dict[str, str], scratch: Path
) -> Callable[[str], str]:
    """`tuneop run`: claim X -> --volume X=DIR, else <yaml dir>/volumes/X if it exists, else scratch/X."""

    def resolve_claim(claim: str) -> str:
        if claim in overrides:
            return str(Path(overrides[claim]).resolve())
        beside = yaml_dir / "volumes" / claim
        if beside.is_dir():
            return str(beside.resolve())
        return str((scratch / claim).resolve())

    return resolve_claim
