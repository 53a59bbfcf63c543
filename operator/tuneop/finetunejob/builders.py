"""Manifests of a FineTuneJob's children (backend: kubernetes). Pure: dict in, dict out.

Children, all named from the owner and adopted by it (ownerReferences, controller, so that
deleting the FineTuneJob garbage-collects them):

- ConfigMap ``<name>-config``: key ``job.json`` = the resolved job config (``jobconfig.resolve``).
- Job ``<name>-validate``: CPU-only ``python -m tuneop.trainer --config ... --validate-only`` with
  the same data mounts, read-only. Created only when a dataset lives in a PVC or at a URL.
- Job ``<name>-train``: the trainer; ``torchrun`` when gpus > 1 or nodes > 1; an Indexed Job
  plus the headless Service ``<name>-train`` (pod DNS ``<name>-train-<i>.<name>-train``) when
  nodes > 1, with ``backoffLimit: 0``: a failed rank fails the Job and the operator restarts the
  whole gang (``finetunejob/gang.py``).

Every child carries the ``tuneop.dev/spec-hash`` annotation: a hash of the spec without
``suspend``. The reducer in ``finetunejob/reconcile.py`` uses it to tell children of the current spec from
children of an older one (a suspend toggle changes the generation, not the children).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Optional

from .. import objects as common
from ..api.common import API_VERSION
from ..api.finetunejob import KIND, FineTuneJobSpec, parse_spec
from ..jobconfig import CONFIG_KEY, pod_configmap_dir, pod_pvc_dir, resolve
from . import startfrom as sf

DEFAULT_IMAGE = "ghcr.io/tuneop/trainer:latest"
CONFIG_DIR = "/etc/tuneop"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
TERMINATION_LOG = "/dev/termination-log"
TRAINER_CONTAINER = "trainer"
VALIDATOR_CONTAINER = "validate"
RDZV_PORT = 29500
RUN_AS_USER = 10001  # the uid of images/trainer (useradd --uid 10001)

MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
OWNER_LABEL = "tuneop.dev/finetunejob"
GENERATION_LABEL = "tuneop.dev/generation"
SPEC_HASH_ANNOTATION = "tuneop.dev/spec-hash"
JOB_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# Seconds a training pod gets after SIGTERM to finish its step and write a checkpoint
# (spec.terminationGracePeriodSeconds; Kubernetes' own default of 30 s is short for large models).
DEFAULT_GRACE_SECONDS = 300
GRACE_ENV = "TUNEOP_TERMINATION_GRACE_SECONDS"
# The trainer's exit code after SIGTERM once its checkpoint is written (128 + 15).
SIGTERM_EXIT_CODE = 143

VALIDATE_RESOURCES = common.SMALL_POD_RESOURCES
VALIDATE_BACKOFF_LIMIT = 1
VALIDATE_DEADLINE_SECONDS = 1800


# ---------------------------------------------------------------------------------- names


def config_map_name(name: str) -> str:
    return f"{name}-config"


def validation_job_name(name: str) -> str:
    return f"{name}-validate"


def training_job_name(name: str) -> str:
    return f"{name}-train"


def service_name(name: str) -> str:
    return f"{name}-train"


# ---------------------------------------------------------------------------------- helpers


def _spec_of(ftj: dict[str, Any], spec: Optional[FineTuneJobSpec]) -> FineTuneJobSpec:
    return spec if spec is not None else parse_spec(ftj.get("spec") or {})


def spec_hash(spec: FineTuneJobSpec | dict[str, Any]) -> str:
    """Hash of everything in the spec that changes what is trained (i.e. all but ``suspend`` and
    ``maxCostUSD``: raising the limit lets a refused job start, it restarts nothing)."""
    data = spec.to_dict() if isinstance(spec, FineTuneJobSpec) else dict(spec)
    data.pop("suspend", None)
    data.pop("maxCostUSD", None)
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def labels(ftj: dict[str, Any], component: str) -> dict[str, str]:
    meta = ftj.get("metadata") or {}
    return {
        MANAGED_BY: "tuneop",
        APP_NAME: "tuneop",
        COMPONENT: component,
        OWNER_LABEL: meta["name"],
        GENERATION_LABEL: str(meta.get("generation", 1)),
    }


def owner_reference(ftj: dict[str, Any]) -> dict[str, Any]:
    return common.owner_reference(ftj, api_version=API_VERSION, kind=KIND)


def _metadata(
    ftj: dict[str, Any], name: str, component: str, spec: FineTuneJobSpec
) -> dict[str, Any]:
    meta = ftj.get("metadata") or {}
    out: dict[str, Any] = {
        "name": name,
        "labels": labels(ftj, component),
        "annotations": {SPEC_HASH_ANNOTATION: spec_hash(spec)},
        "ownerReferences": [owner_reference(ftj)],
    }
    if meta.get("namespace"):
        out["namespace"] = meta["namespace"]
    return out


def start_pin(ftj: dict[str, Any]) -> Optional[dict[str, Any]]:
    """status.startedFrom as the reducer pinned it for this spec (spec.startFrom)."""
    pin = (ftj.get("status") or {}).get("startedFrom")
    return pin if isinstance(pin, dict) and pin else None


def resolved_config(ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None) -> dict[str, Any]:
    return resolve(ftj.get("metadata") or {}, _spec_of(ftj, spec), start=start_pin(ftj))


def output_dir(spec: FineTuneJobSpec) -> str:
    p = spec.output.pvc
    return posixpath.join(pod_pvc_dir(p.claim_name), p.path) if p.path else pod_pvc_dir(p.claim_name)


def adapter_location(spec: FineTuneJobSpec) -> str:
    """``pvc://<claim>/<path>/adapter``: where the adapter ends up (status.adapter.location)."""
    p = spec.output.pvc
    path = posixpath.join(p.path, "adapter") if p.path else "adapter"
    return f"pvc://{p.claim_name}/{path}"


def pvc_claims(spec: FineTuneJobSpec) -> list[str]:
    """Every distinct PVC the pods mount, in a stable order (datasets, output, model)."""
    claims: list[str] = []
    for src in (spec.dataset.train, spec.dataset.validation, spec.dataset.test):
        if src is not None and src.pvc is not None:
            claims.append(src.pvc.claim_name)
    claims.append(spec.output.pvc.claim_name)
    if spec.model_volume is not None:
        claims.append(spec.model_volume.claim_name)
    if spec.start_from is not None and spec.start_from.pvc is not None:
        claims.append(spec.start_from.pvc.claim_name)
    return list(dict.fromkeys(claims))


def dataset_config_maps(spec: FineTuneJobSpec) -> list[str]:
    names = [
        src.config_map.name
        for src in (spec.dataset.train, spec.dataset.validation, spec.dataset.test)
        if src is not None and src.config_map is not None
    ]
    return list(dict.fromkeys(names))


def needs_validation_job(spec: FineTuneJobSpec) -> bool:
    """PVC and URL datasets are checked by the ``<name>-validate`` Job; ConfigMaps by the operator."""
    return any(
        src is not None and src.config_map is None
        for src in (spec.dataset.train, spec.dataset.validation, spec.dataset.test)
    )


def _volumes(
    ftj: dict[str, Any], spec: FineTuneJobSpec, *, read_only_output: bool, shm: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    name = ftj["metadata"]["name"]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(name)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    output_claim = spec.output.pvc.claim_name
    start = sf.start_claim(start_pin(ftj))
    for i, claim in enumerate(dict.fromkeys([*pvc_claims(spec), *([start] if start else [])])):
        writable = claim == output_claim and not read_only_output
        vol = f"pvc-{i}"
        volumes.append(
            {"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}}
        )
        mounts.append({"name": vol, "mountPath": pod_pvc_dir(claim), "readOnly": not writable})
    for i, cm in enumerate(dataset_config_maps(spec)):
        vol = f"dataset-cm-{i}"
        volumes.append({"name": vol, "configMap": {"name": cm}})
        mounts.append({"name": vol, "mountPath": pod_configmap_dir(cm), "readOnly": True})
    if shm:
        empty: dict[str, Any] = {"medium": "Memory"}
        if spec.resources.shm_size:
            empty["sizeLimit"] = spec.resources.shm_size
        volumes.append({"name": "dshm", "emptyDir": empty})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(spec: FineTuneJobSpec, *, hf_home: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "TUNEOP_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_HOME", "value": hf_home},
    ]
    if spec.hf_token_secret_ref is not None:
        env.append(common.secret_env("HF_TOKEN", spec.hf_token_secret_ref.name, spec.hf_token_secret_ref.key))
    env += common.storage_env(spec.storage)
    return env


def secret_key_refs(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """(Secret, key) of every secret the pods' environment reads (the training pod's is the whole of
    it): the HF token, spec.storage's and spec.tracking's credentials."""
    return common.secret_key_refs(_env(spec, hf_home="") + tracking_env(spec))


def tracking_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """spec.tracking's credentials as the environment MLflow and W&B read, each from its Secret key
    (never a value: the job config holds only the non-secret settings)."""
    env: list[dict[str, Any]] = []
    tracking = spec.tracking
    if tracking is None:
        return env
    creds = tracking.mlflow.credentials_secret_ref if tracking.mlflow is not None else None
    if creds is not None:
        if creds.token_key is not None:
            env.append(common.secret_env("MLFLOW_TRACKING_TOKEN", creds.name, creds.token_key))
        if creds.username_key is not None and creds.password_key is not None:
            env.append(common.secret_env("MLFLOW_TRACKING_USERNAME", creds.name, creds.username_key))
            env.append(common.secret_env("MLFLOW_TRACKING_PASSWORD", creds.name, creds.password_key))
    wandb = tracking.wandb
    if wandb is not None and wandb.api_key_secret_ref is not None:
        env.append(common.secret_env("WANDB_API_KEY", wandb.api_key_secret_ref.name, wandb.api_key_secret_ref.key))
    return env


def _exit_code_2_fails_job(container: str, *, sigterm_ignored: bool = False, gang: bool = False) -> dict[str, Any]:
    """Exit code 2 = user error (bad data/config/hardware): fail at once, don't retry.
    Evictions and preemptions (DisruptionTarget) don't count against backoffLimit, nor (training)
    a trainer that stopped on SIGTERM after writing its checkpoint (exit 143): the next pod resumes.
    gang (several nodes, ``backoffLimit: 0``): every other failure counts, so that any rank's failure
    fails the whole Job: one replaced rank cannot rejoin torchrun's static rendezvous
    (:mod:`tuneop.finetunejob.gang`: the operator restarts every rank)."""
    rules: list[dict[str, Any]] = [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": container, "operator": "In", "values": [2]},
        },
    ]
    if gang:
        return {"rules": rules}
    rules.append({
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    })
    if sigterm_ignored:
        rules.append({
            "action": "Ignore",
            "onExitCodes": {"containerName": container, "operator": "In", "values": [SIGTERM_EXIT_CODE]},
        })
    return {"rules": rules}


def grace_seconds(spec: FineTuneJobSpec) -> int:
    """The training pods' terminationGracePeriodSeconds."""
    value = spec.termination_grace_period_seconds
    return int(value) if value is not None else DEFAULT_GRACE_SECONDS


# ---------------------------------------------------------------------------------- builders


def build_config_map(
    ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None
) -> dict[str, Any]:
    """ConfigMap ``<name>-config`` holding the resolved job config as ``job.json``."""
    spec = _spec_of(ftj, spec)
    name = ftj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ftj, config_map_name(name), "config", spec),
        "data": {CONFIG_KEY: json.dumps(resolved_config(ftj, spec), indent=2, sort_keys=True)},
    }


def job_skeleton(
    meta: dict[str, Any],
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    *,
    backoff_limit: int,
    sigterm_ignored: bool = False,
    gang: bool = False,
    pod: Optional[dict[str, Any]] = None,
    job: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The one Job every tuneop Job is made from (validation, training, Together upload and
    download): one container, restricted security contexts (Pod Security "restricted"), no
    service-account token (no tuneop pod talks to the API server), restartPolicy Never, the
    termination message the status reads, exit code 2 fails the Job at once (podFailurePolicy),
    the pod template labelled and annotated as the Job. ``pod`` and ``job`` add fields."""
    container = {
        **container,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security_context(),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": volumes,
        **(pod or {}),
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "podFailurePolicy": _exit_code_2_fails_job(container["name"], sigterm_ignored=sigterm_ignored, gang=gang),
        "template": {
            "metadata": {"labels": dict(meta["labels"]), "annotations": dict(meta["annotations"])},
            "spec": pod_spec,
        },
        **(job or {}),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def build_validation_job(
    ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None, *, image: str = DEFAULT_IMAGE
) -> dict[str, Any]:
    """Job ``<name>-validate``: CPU only, every mount read-only, small resources."""
    spec = _spec_of(ftj, spec)
    name = ftj["metadata"]["name"]
    meta = _metadata(ftj, validation_job_name(name), "validate", spec)
    volumes, mounts = _volumes(ftj, spec, read_only_output=True, shm=False)
    container = {
        "name": VALIDATOR_CONTAINER,
        "image": spec.image or image,
        "command": ["python", "-m", "tuneop.trainer", "--config", CONFIG_PATH, "--validate-only"],
        "env": _env(spec, hf_home="/tmp/hf-home"),
        "resources": VALIDATE_RESOURCES,
        "volumeMounts": mounts,
    }
    # No GPU and no nodeSelector/tolerations of the training pods: it must not wait for a GPU node.
    return job_skeleton(meta, container, volumes, backoff_limit=VALIDATE_BACKOFF_LIMIT,
                        job={"activeDeadlineSeconds": VALIDATE_DEADLINE_SECONDS})


def trainer_command(ftj: dict[str, Any], spec: FineTuneJobSpec) -> list[str]:
    """``python -m tuneop.trainer`` for one process; ``torchrun`` for several GPUs or nodes."""
    name = ftj["metadata"]["name"]
    nodes = spec.resources.nodes
    gpus = spec.resources.gpus
    tail = ["-m", "tuneop.trainer", "--config", CONFIG_PATH]
    if nodes <= 1 and gpus <= 1:
        return ["python", *tail]
    nproc = str(max(gpus, 1))
    if nodes <= 1:
        return ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", nproc, *tail]
    return [
        "torchrun",
        "--nnodes", str(nodes),
        "--nproc-per-node", nproc,
        "--node-rank", "$(JOB_COMPLETION_INDEX)",
        "--rdzv-backend", "static",
        "--master-addr", f"{training_job_name(name)}-0.{service_name(name)}",
        "--master-port", str(RDZV_PORT),
        *tail,
    ]


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if r.cpu:
        requests["cpu"] = limits["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = limits["memory"] = r.memory
    if r.gpus > 0:
        limits[r.gpu_resource_name] = r.gpus
    return common.resource_requirements(requests, limits)


def build_training_job(
    ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None, *, image: str = DEFAULT_IMAGE
) -> dict[str, Any]:
    """Job ``<name>-train`` (Indexed, one pod per node, when nodes > 1)."""
    spec = _spec_of(ftj, spec)
    name = ftj["metadata"]["name"]
    meta = _metadata(ftj, training_job_name(name), "train", spec)
    volumes, mounts = _volumes(ftj, spec, read_only_output=False, shm=True)
    nodes = spec.resources.nodes
    env = _env(spec, hf_home=posixpath.join(output_dir(spec), ".hf-home"))
    env.append({"name": GRACE_ENV, "value": str(grace_seconds(spec))})
    env.extend(tracking_env(spec))
    if nodes > 1:
        env.insert(
            0,
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX_ANNOTATION}']"}
                },
            },
        )
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or image,
        "command": trainer_command(ftj, spec),
        "env": env,
        "volumeMounts": mounts,
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    if nodes > 1:
        container["ports"] = [{"name": "rdzv", "containerPort": RDZV_PORT}]
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": grace_seconds(spec)}
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod["tolerations"] = [t.to_dict() for t in spec.resources.tolerations]
    if nodes > 1:
        pod["subdomain"] = service_name(name)
    job: dict[str, Any] = {"suspend": bool(spec.suspend)}
    if spec.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if nodes > 1:
        job.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes})
    # several nodes: the first failed rank fails the Job, the operator restarts the gang (finetunejob/gang.py)
    return job_skeleton(meta, container, volumes, backoff_limit=0 if nodes > 1 else spec.max_retries,
                        sigterm_ignored=True, gang=nodes > 1, pod=pod, job=job)


def build_headless_service(
    ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None
) -> Optional[dict[str, Any]]:
    """Headless Service ``<name>-train`` for the pods of a multi-node Job; None for one node."""
    spec = _spec_of(ftj, spec)
    if spec.resources.nodes <= 1:
        return None
    name = ftj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ftj, service_name(name), "train", spec),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {OWNER_LABEL: name, COMPONENT: "train"},
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }


def build_children(
    ftj: dict[str, Any], spec: Optional[FineTuneJobSpec] = None, *, image: str = DEFAULT_IMAGE
) -> list[dict[str, Any]]:
    """backend: kubernetes: config, validation Job (if needed), Service, training Job
    (``tuneop render`` renders any backend's: :func:`tuneop.backends.children`)."""
    spec = _spec_of(ftj, spec)
    out = [build_config_map(ftj, spec)]
    if needs_validation_job(spec):
        out.append(build_validation_job(ftj, spec, image=image))
    svc = build_headless_service(ftj, spec)
    if svc is not None:
        out.append(svc)
    out.append(build_training_job(ftj, spec, image=image))
    return out

