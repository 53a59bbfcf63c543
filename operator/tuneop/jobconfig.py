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


def resolve(
    metadata: dict[str, Any],
    spec: FineTuneJobSpec,
    pvc_dir: Callable[[str], str] = pod_pvc_dir,
    configmap_dir: Callable[[str], str] = pod_configmap_dir,
) -> dict[str, Any]:
    """Spec + metadata -> the JSON document given to `python -m tuneop.trainer --config`."""
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
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {
            k: metadata[k] for k in ("name", "namespace", "uid", "generation") if k in metadata
        },
        "spec": spec.to_dict(),
        "paths": paths,
    }


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
