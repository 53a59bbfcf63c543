"""Manifests of an AdapterDeployment's children. Pure: dict in, dict out.

All three are named ``<name>-vllm``, labelled ``app.kubernetes.io/managed-by: tuneop`` +
``tuneop.dev/adapterdeployment: <name>`` and owned by the AdapterDeployment (controller):

- Deployment: upstream vLLM image, ``python3 -m vllm.entrypoints.openai.api_server`` +
  :func:`tuneop.serving.vllm.server_args`; no adapter in the arguments: every adapter is loaded
  through vLLM's runtime API by the operator (``serving/admin.py``). Every PVC holding adapters
  (``source.pvc`` claims, output PVCs of referenced FineTuneJobs) and the model volume are mounted
  read-only at ``/mnt/pvc/<claim>``; URL adapters are fetched by init containers
  (``python -m tuneop.serving.fetch``, trainer image) into the emptyDir ``/adapters``.
- Service: the OpenAI-compatible API on ``spec.service.port``.
- HorizontalPodAutoscaler (only with ``autoscaling.enabled``): Pods metric
  ``vllm:num_requests_waiting`` (needs a Prometheus adapter serving it as a pod metric).

The pod template carries ``tuneop.dev/template-hash``: a hash of the template itself, which is
built only from what needs a restart (base model, vLLM settings, image, resources, mounted claims,
URL adapters). Adding or removing an adapter from an already-mounted PVC (or a FineTuneJob whose
output PVC is already mounted) leaves the template, hence the hash, unchanged: no rollout.

Security context: the upstream vLLM image runs as root and writes caches (HF, torch compile,
triton) under ``/root/.cache`` and elsewhere, so the vLLM container gets no ``runAsNonRoot`` and
no read-only root filesystem; it does get ``allowPrivilegeEscalation: false``, all capabilities
dropped and the RuntimeDefault seccomp profile. The fetch init containers (trainer image, uid
10001) run fully restricted.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Mapping, Optional

from ..api.adapterdeployment import KIND, AdapterDeploymentSpec
from ..api.common import API_VERSION
from ..jobconfig import pod_pvc_dir
from ..serving import adapters as sa
from ..serving import vllm
from . import common
from .finetunejob import DEFAULT_IMAGE as DEFAULT_TRAINER_IMAGE
from .finetunejob import RUN_AS_USER

MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
OWNER_LABEL = "tuneop.dev/adapterdeployment"
TEMPLATE_HASH_ANNOTATION = "tuneop.dev/template-hash"
URL_ADAPTERS_ANNOTATION = "tuneop.dev/url-adapters"
COMPONENT_VLLM = "vllm"
CONTAINER = "vllm"
CONTAINER_PORT = 8000
URL_ROOT = sa.URL_ADAPTER_ROOT
HF_HOME = "/root/.cache/huggingface"
FETCH_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}

child_name = sa.child_name


def parse_spec(spec: Mapping[str, Any]) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate(dict(spec))


def _spec_of(ad: Mapping[str, Any], spec: Optional[AdapterDeploymentSpec]) -> AdapterDeploymentSpec:
    return spec if spec is not None else parse_spec(ad.get("spec") or {})


def selector_labels(name: str) -> dict[str, str]:
    """The Deployment's selector (immutable: never add to it) and the Service's."""
    return {OWNER_LABEL: name, COMPONENT: COMPONENT_VLLM}


def labels(name: str) -> dict[str, str]:
    return {MANAGED_BY: "tuneop", APP_NAME: "tuneop", **selector_labels(name)}


def owner_reference(ad: Mapping[str, Any]) -> dict[str, Any]:
    return common.owner_reference(ad, api_version=API_VERSION, kind=KIND)


def _metadata(ad: Mapping[str, Any]) -> dict[str, Any]:
    meta = ad.get("metadata") or {}
    out: dict[str, Any] = {
        "name": child_name(meta["name"]),
        "labels": labels(meta["name"]),
        "ownerReferences": [owner_reference(ad)],
    }
    if meta.get("namespace"):
        out["namespace"] = meta["namespace"]
    return out


def model_path(spec: AdapterDeploymentSpec) -> Optional[str]:
    """Where the base model is inside the pod when it lives in modelVolume (else None: an HF id)."""
    mv = spec.model_volume
    if mv is None:
        return None
    return posixpath.join(pod_pvc_dir(mv.claim_name), mv.path, spec.base_model.lstrip("/"))


def mounted_claims(
    spec: AdapterDeploymentSpec, finetunejobs: Mapping[str, Optional[Mapping[str, Any]]]
) -> list[str]:
    """Every PVC the vLLM pods mount, sorted: adapter claims and the model volume."""
    claims = set(sa.adapter_claims(spec, finetunejobs))
    if spec.model_volume is not None:
        claims.add(spec.model_volume.claim_name)
    return sorted(claims)


def gpus(spec: AdapterDeploymentSpec) -> int:
    return spec.resources.gpus if spec.resources.gpus is not None else spec.vllm.tensor_parallel_size


def _resources(spec: AdapterDeploymentSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if r.cpu:
        requests["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = limits["memory"] = r.memory
    n = gpus(spec)
    if n > 0:
        limits[r.gpu_resource_name] = n
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def fetch_command(name: str, url: str, sha256: Optional[str]) -> list[str]:
    cmd = ["python", "-m", "tuneop.serving.fetch", "--url", url, "--dest", posixpath.join(URL_ROOT, name)]
    if sha256:
        cmd += ["--sha256", sha256]
    return cmd


def _restricted() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _vllm_security_context() -> dict[str, Any]:
    # The upstream image runs as root and writes caches: see the module docstring.
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def template_hash(template: Mapping[str, Any]) -> str:
    data = json.loads(json.dumps(template))
    (data.get("metadata") or {}).get("annotations", {}).pop(TEMPLATE_HASH_ANNOTATION, None)
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_pod_template(
    ad: Mapping[str, Any],
    spec: Optional[AdapterDeploymentSpec] = None,
    *,
    finetunejobs: Optional[Mapping[str, Optional[Mapping[str, Any]]]] = None,
    image: str = vllm.DEFAULT_IMAGE,
    trainer_image: str = DEFAULT_TRAINER_IMAGE,
) -> dict[str, Any]:
    spec = _spec_of(ad, spec)
    name = ad["metadata"]["name"]
    ftjs = finetunejobs or {}
    env = [{"name": k, "value": v} for k, v in sorted(vllm.server_env(spec).items())]
    env.append({"name": "HF_HOME", "value": HF_HOME})
    if spec.hf_token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    if spec.auth.api_key_secret_ref is not None:
        env.append(_secret_env("VLLM_API_KEY", spec.auth.api_key_secret_ref))

    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": "/root/.cache"},
    ]
    for i, claim in enumerate(mounted_claims(spec, ftjs)):
        vol = f"pvc-{i}"
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": vol, "mountPath": pod_pvc_dir(claim), "readOnly": True})
    urls = sa.url_adapters(spec)
    init: list[dict[str, Any]] = []
    if urls:
        volumes.append({"name": "adapters", "emptyDir": {}})
        mounts.append({"name": "adapters", "mountPath": URL_ROOT, "readOnly": True})
        for i, (aname, url, sha) in enumerate(urls):
            init.append({
                "name": f"fetch-{i}",
                "image": trainer_image,
                "command": fetch_command(aname, url, sha),
                "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
                "resources": FETCH_RESOURCES,
                "volumeMounts": [
                    {"name": "adapters", "mountPath": URL_ROOT},
                    {"name": "fetch-tmp", "mountPath": "/tmp"},
                ],
                "securityContext": _restricted(),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            })
        volumes.append({"name": "fetch-tmp", "emptyDir": {}})

    def probe(**kw: int) -> dict[str, Any]:
        return {"httpGet": {"path": "/health", "port": "http"}, **kw}

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.vllm.image or image,
        "command": ["python3", "-m", vllm.API_SERVER_MODULE],
        "args": vllm.server_args(spec, model_path=model_path(spec), port=CONTAINER_PORT),
        "env": env,
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        # Model download + load + CUDA graphs can take long: up to 30 minutes to start.
        "startupProbe": probe(periodSeconds=10, failureThreshold=180, timeoutSeconds=5),
        "readinessProbe": probe(periodSeconds=5, failureThreshold=3, timeoutSeconds=5),
        "livenessProbe": probe(periodSeconds=15, failureThreshold=4, timeoutSeconds=10),
        "securityContext": _vllm_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    res = _resources(spec)
    if res:
        container["resources"] = res
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(CONTAINER_PORT),
        "prometheus.io/path": "/metrics",
    }
    if urls:
        annotations[URL_ADAPTERS_ANNOTATION] = ",".join(n for n, _, _ in urls)
    pod_spec: dict[str, Any] = {
        "securityContext": {
            "fsGroup": RUN_AS_USER, "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 60,
    }
    if init:
        pod_spec["initContainers"] = init
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in spec.resources.tolerations]
    template = {"metadata": {"labels": labels(name), "annotations": annotations}, "spec": pod_spec}
    annotations[TEMPLATE_HASH_ANNOTATION] = template_hash(template)
    return template


def build_deployment(
    ad: Mapping[str, Any],
    spec: Optional[AdapterDeploymentSpec] = None,
    *,
    finetunejobs: Optional[Mapping[str, Optional[Mapping[str, Any]]]] = None,
    image: str = vllm.DEFAULT_IMAGE,
    trainer_image: str = DEFAULT_TRAINER_IMAGE,
) -> dict[str, Any]:
    """Deployment ``<name>-vllm``. ``replicas`` is left out when the HPA owns it."""
    spec = _spec_of(ad, spec)
    name = ad["metadata"]["name"]
    template = build_pod_template(ad, spec, finetunejobs=finetunejobs, image=image, trainer_image=trainer_image)
    dspec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(name)},
        # One extra pod at a time, never fewer ready pods than asked for.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 3,
        "template": template,
    }
    if not spec.autoscaling.enabled:
        dspec["replicas"] = spec.replicas
    meta = _metadata(ad)
    meta["annotations"] = {TEMPLATE_HASH_ANNOTATION: template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": dspec}


def build_service(ad: Mapping[str, Any], spec: Optional[AdapterDeploymentSpec] = None) -> dict[str, Any]:
    spec = _spec_of(ad, spec)
    name = ad["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ad),
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _quantity(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{int(round(x * 1000))}m"


def build_hpa(ad: Mapping[str, Any], spec: Optional[AdapterDeploymentSpec] = None) -> Optional[dict[str, Any]]:
    """autoscaling/v2 HPA on the average ``vllm:num_requests_waiting`` per pod; None when off."""
    spec = _spec_of(ad, spec)
    a = spec.autoscaling
    if not a.enabled:
        return None
    name = ad["metadata"]["name"]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(ad),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": child_name(name)},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": "vllm:num_requests_waiting"},
                    "target": {"type": "AverageValue", "averageValue": _quantity(a.target_waiting_requests)},
                },
            }],
        },
    }


def build_all(
    ad: Mapping[str, Any],
    spec: Optional[AdapterDeploymentSpec] = None,
    *,
    finetunejobs: Optional[Mapping[str, Optional[Mapping[str, Any]]]] = None,
    image: str = vllm.DEFAULT_IMAGE,
    trainer_image: str = DEFAULT_TRAINER_IMAGE,
) -> list[dict[str, Any]]:
    """Everything for ``tuneop render``: Deployment, Service, HPA (when enabled)."""
    spec = _spec_of(ad, spec)
    out = [
        build_deployment(ad, spec, finetunejobs=finetunejobs, image=image, trainer_image=trainer_image),
        build_service(ad, spec),
    ]
    hpa = build_hpa(ad, spec)
    if hpa is not None:
        out.append(hpa)
    return out
