"""Manifests of a FineTuneJob's children for backend: together. Pure: dict in, dict out.

- ConfigMap ``<name>-config``: the resolved job config (the same builder as backend kubernetes).
- Job ``<name>-upload``: ``python -m tuneop.backends.together.pod upload --config /etc/tuneop/job.json``.
  Mounts the dataset volumes and ConfigMaps read-only, checks the data with tuneop's checker,
  uploads it to Together; the file ids come back in its termination message.
- Job ``<name>-download``: ``python -m tuneop.backends.together.pod download --config ... --job-id ft-...``.
  Mounts only the output volume (writable); writes ``<output>/adapter/`` + ``tuneop-manifest.json``;
  the adapter's sha256 comes back in its termination message.

Both get the API key only as ``TOGETHER_API_KEY`` from a ``secretKeyRef`` (never the value), no
GPU, small resources, and the security context of the training Job. Exit code 2 (a user error:
bad data, bad key, rejected file) fails the Job at once; anything else is retried
``backoffLimit`` times (Together unavailable, rate limited, network trouble).
"""
from __future__ import annotations

import re
from typing import Any, Optional

from ... import objects as common
from ...api.finetunejob import FineTuneJobSpec
from ...finetunejob import builders as b
from ...jobconfig import pod_configmap_dir, pod_pvc_dir

UPLOAD_CONTAINER = "upload"
DOWNLOAD_CONTAINER = "download"
API_KEY_ENV = "TOGETHER_API_KEY"
BASE_URL_ENV = "TOGETHER_BASE_URL"

POD_RESOURCES = common.SMALL_POD_RESOURCES
UPLOAD_BACKOFF_LIMIT = 3
UPLOAD_DEADLINE_SECONDS = 3600
DOWNLOAD_BACKOFF_LIMIT = 3
DOWNLOAD_DEADLINE_SECONDS = 6 * 3600
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,200}$")


def upload_job_name(name: str) -> str:
    return f"{name}-upload"


def download_job_name(name: str) -> str:
    return f"{name}-download"


def _env(spec: FineTuneJobSpec, base_url: Optional[str]) -> list[dict[str, Any]]:
    if spec.together is None:
        raise ValueError("backend together requires the together block")
    ref = spec.together.api_key_secret_ref
    env: list[dict[str, Any]] = [
        {"name": "TUNEOP_TERMINATION_LOG", "value": b.TERMINATION_LOG},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
        common.secret_env(API_KEY_ENV, ref.name, ref.key),
    ]
    if base_url:
        env.append({"name": BASE_URL_ENV, "value": base_url})
    return env


def _upload_volumes(
    ftj: dict[str, Any], spec: FineTuneJobSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The config, every dataset PVC and ConfigMap, all read-only (no output volume)."""
    name = ftj["metadata"]["name"]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": b.config_map_name(name)}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": b.CONFIG_DIR, "readOnly": True}]
    claims = [
        src.pvc.claim_name
        for src in (spec.dataset.train, spec.dataset.validation)
        if src is not None and src.pvc is not None
    ]
    for i, claim in enumerate(dict.fromkeys(claims)):
        vol = f"pvc-{i}"
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": vol, "mountPath": pod_pvc_dir(claim), "readOnly": True})
    cms = [
        src.config_map.name
        for src in (spec.dataset.train, spec.dataset.validation)
        if src is not None and src.config_map is not None
    ]
    for i, cm in enumerate(dict.fromkeys(cms)):
        vol = f"dataset-cm-{i}"
        volumes.append({"name": vol, "configMap": {"name": cm}})
        mounts.append({"name": vol, "mountPath": pod_configmap_dir(cm), "readOnly": True})
    return volumes, mounts


def _download_volumes(
    ftj: dict[str, Any], spec: FineTuneJobSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The config (read-only) and the output PVC (writable)."""
    name = ftj["metadata"]["name"]
    claim = spec.output.pvc.claim_name
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": b.config_map_name(name)}},
        {"name": "output", "persistentVolumeClaim": {"claimName": claim}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": b.CONFIG_DIR, "readOnly": True},
        {"name": "output", "mountPath": pod_pvc_dir(claim)},
    ]
    return volumes, mounts


def _job(
    ftj: dict[str, Any],
    spec: FineTuneJobSpec,
    *,
    job_name: str,
    component: str,
    container_name: str,
    command: list[str],
    image: str,
    base_url: Optional[str],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    backoff_limit: int,
    deadline: int,
    suspend: bool = False,
) -> dict[str, Any]:
    meta = b._metadata(ftj, job_name, component, spec)
    container = {
        "name": container_name,
        "image": spec.image or image,
        "command": command,
        "env": _env(spec, base_url),
        "resources": POD_RESOURCES,
        "volumeMounts": mounts,
    }
    return b.job_skeleton(meta, container, volumes, backoff_limit=backoff_limit,
                          job={"activeDeadlineSeconds": deadline, "suspend": bool(suspend)})


def build_upload_job(
    ftj: dict[str, Any],
    spec: Optional[FineTuneJobSpec] = None,
    *,
    image: str = b.DEFAULT_IMAGE,
    base_url: Optional[str] = None,
) -> dict[str, Any]:
    """Job ``<name>-upload``: check the datasets and upload them to Together."""
    spec = b._spec_of(ftj, spec)
    name = ftj["metadata"]["name"]
    volumes, mounts = _upload_volumes(ftj, spec)
    return _job(
        ftj, spec,
        job_name=upload_job_name(name), component="upload", container_name=UPLOAD_CONTAINER,
        command=["python", "-m", "tuneop.backends.together.pod", "upload", "--config", b.CONFIG_PATH],
        image=image, base_url=base_url, volumes=volumes, mounts=mounts,
        backoff_limit=UPLOAD_BACKOFF_LIMIT, deadline=UPLOAD_DEADLINE_SECONDS,
    )


def build_download_job(
    ftj: dict[str, Any],
    spec: Optional[FineTuneJobSpec] = None,
    *,
    job_id: str,
    image: str = b.DEFAULT_IMAGE,
    base_url: Optional[str] = None,
    suspend: bool = False,
) -> dict[str, Any]:
    """Job ``<name>-download``: download the adapter of Together job ``job_id`` into the output."""
    if not _JOB_ID.match(job_id or ""):
        raise ValueError(f"not a Together job id: {job_id!r}")
    spec = b._spec_of(ftj, spec)
    name = ftj["metadata"]["name"]
    volumes, mounts = _download_volumes(ftj, spec)
    return _job(
        ftj, spec,
        job_name=download_job_name(name), component="download", container_name=DOWNLOAD_CONTAINER,
        command=["python", "-m", "tuneop.backends.together.pod", "download", "--config", b.CONFIG_PATH,
                 "--job-id", job_id],
        image=image, base_url=base_url, volumes=volumes, mounts=mounts,
        backoff_limit=DOWNLOAD_BACKOFF_LIMIT, deadline=DOWNLOAD_DEADLINE_SECONDS, suspend=suspend,
    )


def build_children(
    ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None, *, image: str = b.DEFAULT_IMAGE,
    base_url: Optional[str] = None,
) -> list[dict[str, Any]]:
    """What ``tuneop render`` shows for backend together: the config and the upload Job (the
    download Job needs the Together job id, known only once the job was created)."""
    spec = b._spec_of(ftj, spec)
    return [b.build_config_map(ftj, spec), build_upload_job(ftj, spec, image=image, base_url=base_url)]
