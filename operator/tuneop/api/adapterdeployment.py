"""AdapterDeployment: serve a base model with many LoRA adapters from vLLM pods (multi-LoRA).

The single source of truth for the CRD in crds/adapterdeployments.yaml (`tuneop crds`).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Optional

from pydantic import Field, field_validator, model_validator

from . import storage as storage_api
from .common import Condition, Model, PvcRef, SecretKeyRef, Toleration
from .servingdefaults import VLLM_LORA_RANKS, ServingStatus

KIND = "AdapterDeployment"
PLURAL = "adapterdeployments"
SINGULAR = "adapterdeployment"
SHORT_NAMES = ["ad"]

# DNS-label-like: what reaches vLLM as a served model name and into pod paths.
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_ADAPTER_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)


def valid_adapter_name(name: str) -> bool:
    return bool(_ADAPTER_NAME_RE.match(name)) and name.isascii()


class FineTuneJobRef(Model):
    """A FineTuneJob in the same namespace; its adapter is served once it has Succeeded."""

    name: str = Field(min_length=1, max_length=253, description="Name of the FineTuneJob.")


class AdapterSource(Model):
    """Where adapter files are: exactly one of pvc or url."""

    pvc: Optional[PvcRef] = Field(
        default=None, description="A directory in a PVC holding a PEFT adapter (adapter_config.json + weights)."
    )
    url: Optional[str] = Field(
        default=None,
        pattern=r"^(https?|s3)://",
        max_length=2048,
        description="An HTTP(S) URL of a .tar.gz / .tar.zst archive of a PEFT adapter (extracted safely by an init "
        "container), or s3://bucket/prefix of an adapter tuneop uploaded (output.s3: every file checked against its "
        "tuneop-manifest.json) or of such an archive (read with spec.storage.s3).",
    )
    sha256: Optional[str] = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected sha256 of adapter_model.safetensors (else taken from tuneop-manifest.json when present).",
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        ("[has(self.pvc), has(self.url)].filter(x, x).size() == 1", "exactly one of pvc or url must be set")
    ]

    @model_validator(mode="after")
    def _exactly_one(self) -> "AdapterSource":
        if (self.pvc is None) == (self.url is None):
            raise ValueError("exactly one of pvc or url must be set")
        return self


class AdapterRef(Model):
    """One adapter to serve, under `name` (the `model` field of OpenAI-style requests)."""

    name: str = Field(
        pattern=ADAPTER_NAME_PATTERN,
        max_length=63,
        description="Served model name of the adapter: lowercase letters, digits and '-', at most 63.",
    )
    fine_tune_job_ref: Optional[FineTuneJobRef] = Field(
        default=None, description="Serve the adapter of this FineTuneJob (waits until it Succeeded)."
    )
    source: Optional[AdapterSource] = Field(default=None, description="Serve adapter files from a PVC or URL.")
    allow_base_model_mismatch: Optional[bool] = Field(
        default=None,
        description="Serve the adapter even though the base model it records (tuneop-manifest.json's baseModel "
        "and baseModelInfo, else adapter_config.json's base_model_name_or_path) is not baseModel: by default "
        "an adapter is refused (status reason BaseModelMismatch) unless the names match or, when they differ, "
        "its recorded architecture, hidden size and layer count equal the served model's.",
    )
    allow_unverified: Optional[bool] = Field(
        default=None,
        description="Serve the adapter although its directory has no tuneop-manifest.json listing every file "
        "with its sha256 (an adapter made by another tool): by default such an adapter is refused (reason "
        "unverified). Either way vLLM loads a private copy the guard made, never the volume's files.",
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "[has(self.fineTuneJobRef), has(self.source)].filter(x, x).size() == 1",
            "exactly one of fineTuneJobRef or source must be set",
        )
    ]

    @field_validator("name")
    @classmethod
    def _ascii(cls, v: str) -> str:
        if not valid_adapter_name(v):
            raise ValueError(f"adapter name {v!r} must be a DNS label (a-z, 0-9, '-')")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "AdapterRef":
        if (self.fine_tune_job_ref is None) == (self.source is None):
            raise ValueError("exactly one of fineTuneJobRef or source must be set")
        return self


# --------------------------------------------------------------------------- vllm.extraArgs
# The vLLM flags spec.vllm.extraArgs must not carry, each with why: the one list behind both the
# model's validator (refused_vllm_arg) and the CRD's CEL rule (REFUSED_VLLM_ARG_REGEX). vLLM's parser
# (FlexibleArgumentParser, an argparse.ArgumentParser with allow_abbrev on) also accepts
# `--flag=value`, `--flag_with_underscores`, `--flag.key value` (JSON fields) and any unambiguous
# abbreviation (`--lora-mod`), so an argument is refused when its flag name, underscores read as
# dashes, is a refused flag or a prefix of one; and single-dash (short) options are refused
# altogether (`-tp` is --tensor-parallel-size; write the long form).
_HTTP = "the pods serve plain HTTP on port 8000 at / (probes, Service, the operator's admin calls)"
_CORS = "the API's cross-origin policy is tuneop's (none: clients are in the cluster)"
_ENGINE_PORTS = "opens engine ports that the admin guard does not see (one pod is one vLLM server)"
_CODE = "runs Python code named by the argument"
REFUSED_VLLM_FLAGS: dict[str, str] = {
    # rendered by tuneop (adapterdeployment/vllm.py server_args): set the spec field instead
    "--model": "tuneop sets it from spec.baseModel and spec.modelVolume",
    "--served-model-name": "tuneop sets it from spec.baseModel",
    "--host": _HTTP,
    "--port": _HTTP,
    "--enable-lora": "tuneop always turns LoRA on",
    "--no-enable-lora": "tuneop always turns LoRA on",
    "--max-loras": "use spec.vllm.maxLoras",
    "--max-lora-rank": "use spec.vllm.maxLoraRank",
    "--max-cpu-loras": "use spec.vllm.maxCpuLoras",
    "--max-model-len": "use spec.vllm.maxModelLen",
    "--dtype": "use spec.vllm.dtype",
    "--gpu-memory-utilization": "use spec.vllm.gpuMemoryUtilization",
    "--device-memory-utilization": "use spec.vllm.gpuMemoryUtilization",  # vLLM's alias of the above
    "--tensor-parallel-size": "use spec.vllm.tensorParallelSize",
    "--trust-remote-code": "use spec.vllm.trustRemoteCode",
    "--no-trust-remote-code": "use spec.vllm.trustRemoteCode",
    "--middleware": "tuneop's admin guard is the pods' middleware",
    # adapters are loaded only by the operator, through the admin guard
    "--lora-modules": "it loads adapters at start-up without the admin guard, from any path: list them in spec.adapters",
    "--default-mm-loras": "it loads LoRA adapters from any path without the admin guard",
    # credentials never go into arguments (anyone who can read the pod spec reads them)
    "--api-key": "use spec.auth.apiKeySecretRef",
    "--hf-token": "use spec.hfTokenSecretRef",
    # the pods' HTTP contract
    "--root-path": _HTTP,
    "--uds": _HTTP,
    "--grpc": _HTTP,
    "--grpc-port": "it serves a gRPC API that the admin guard does not see",
    "--headless": _HTTP,
    "--ssl-keyfile": _HTTP,
    "--ssl-certfile": _HTTP,
    "--ssl-ca-certs": _HTTP,
    "--ssl-cert-reqs": _HTTP,
    "--ssl-ciphers": _HTTP,
    "--enable-ssl-refresh": _HTTP,
    "--no-enable-ssl-refresh": _HTTP,
    "--allowed-origins": _CORS,
    "--allowed-methods": _CORS,
    "--allowed-headers": _CORS,
    "--allow-credentials": _CORS,
    "--no-allow-credentials": _CORS,
    "--data-parallel-address": _ENGINE_PORTS,
    "--data-parallel-rpc-port": _ENGINE_PORTS,
    "--data-parallel-supervisor-port": _ENGINE_PORTS,
    "--master-port": _ENGINE_PORTS,
    "--nnodes": _ENGINE_PORTS,
    "--node-rank": _ENGINE_PORTS,
    "--kv-transfer-config": _ENGINE_PORTS,
    "--kv-events-config": _ENGINE_PORTS,
    "--ec-transfer-config": _ENGINE_PORTS,
    # files of the pod and code
    "--config": "a file of more vLLM flags could carry any refused one",
    "--chat-template": "it reads any file of the pod (the admin token too) into prompts; the model's own "
                       "template is used",
    "--allowed-local-media-path": "it lets requests read the pod's files",
    "--download-dir": "model files go to the cache volume (HF_HOME), never into a directory of tuneop's",
    "--tool-parser-plugin": _CODE,
    "--reasoning-parser-plugin": _CODE,
    "--log-config-file": "a logging dictConfig calls any Python callable it names",
    "--logging-config": "a logging dictConfig calls any Python callable it names",
}
# Real vLLM flags that are prefixes of refused ones (so not abbreviations of them): accepted as written.
VLLM_FLAGS_NOT_ABBREVIATIONS = frozenset({"--reasoning-parser"})
EXTRA_ARG_MAX_LENGTH = 512
# With the refusal rule's regex, 32 items of 512 characters cost about 6 M of the API server's 10 M
# estimated-cost budget for a CRD rule (64 x 1024 was refused by kube-apiserver 1.36: 2.4x over).
EXTRA_ARGS_MAX_ITEMS = 32


def _flag_name(arg: str) -> str:
    """The flag of a long option as vLLM's parser reads it: `--a_b.c=v` -> `--a-b`."""
    return "--" + arg[2:].split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def refused_vllm_arg(arg: str) -> Optional[str]:
    """Why one element of vllm.extraArgs is refused (None: accepted), naming the flag."""
    if arg.startswith("-") and not arg.startswith("--"):
        if len(arg) > 1 and arg[1].isascii() and arg[1].isalpha():
            return f"{arg!r}: short options are refused (vLLM's -tp, -q, -O ...): write the long form"
        return None  # a value such as -1
    if not arg.startswith("--"):
        return None  # a value
    flag = _flag_name(arg)
    if flag in VLLM_FLAGS_NOT_ABBREVIATIONS:
        return None
    if flag == "--":
        return f"{arg!r}: an empty flag name (a bare '--' ends vLLM's options) is refused"
    if flag in REFUSED_VLLM_FLAGS:
        return f"{arg!r}: {flag} is refused: {REFUSED_VLLM_FLAGS[flag]}"
    hits = sorted(f for f in REFUSED_VLLM_FLAGS if f.startswith(flag))
    if len(hits) == 1:
        return (f"{arg!r}: {flag} abbreviates {hits[0]} (vLLM's parser accepts abbreviations), which is "
                f"refused: {REFUSED_VLLM_FLAGS[hits[0]]}")
    if hits:
        more = f" and {len(hits) - 3} more" if len(hits) > 3 else ""
        return f"{arg!r}: {flag} may abbreviate refused flags ({', '.join(hits[:3])}{more}): write the whole flag"
    return None


def _prefix_regex(names: list[str], exact_ok: frozenset[str]) -> str:
    """RE2 (no lookaround) matching every prefix, the empty one too, of `names` except the names in
    `exact_ok`; '-' in a name also matches '_'."""
    trie: dict[str, Any] = {}
    for n in names:
        node = trie
        for ch in n:
            node = node.setdefault(ch, {})

    def alt(node: dict[str, Any], path: str) -> str:
        parts = []
        for ch in sorted(node):
            sub, here = node[ch], path + ch
            piece = "[-_]" if ch == "-" else ch
            if sub:
                piece += f"(?:{alt(sub, here)})" + ("" if here in exact_ok else "?")
            parts.append(piece)
        return "|".join(parts)

    return f"(?:{alt(trie, '')})?"


# What the CEL rule refuses: the same arguments as refused_vllm_arg (tests/unit check both agree).
REFUSED_VLLM_ARG_REGEX = "^(?:-[A-Za-z]|--{}(?:[=.]|$))".format(
    _prefix_regex([f[2:] for f in REFUSED_VLLM_FLAGS], frozenset(f[2:] for f in VLLM_FLAGS_NOT_ABBREVIATIONS))
)
_EXTRA_ARGS_DOC = (
    "More vLLM flags, appended as given. Refused (the flags tuneop renders from the fields above, or "
    "that would bypass the admin guard, load adapters from elsewhere, change the pods' HTTP contract or "
    "run code named by an argument): " + ", ".join(REFUSED_VLLM_FLAGS)
    + "; also their `--flag=value`, `--flag_with_underscores` and abbreviated forms, and every "
    "single-dash short option (write the long form)."
)


class VllmSpec(Model):
    """vLLM server settings. Changing any of them rolls the Deployment; adapters change live."""

    image: Optional[str] = Field(
        default=None, description="vLLM image; defaults to the operator's (upstream vllm/vllm-openai)."
    )
    max_loras: Optional[int] = Field(
        default=None, ge=1, le=256,
        description="Adapters in one batch (--max-loras). Unset: derived from maxLoraRank (status.serving).",
    )
    max_lora_rank: Optional[int] = Field(
        default=None,
        description="Largest adapter rank (--max-lora-rank), one vLLM accepts. Unset: the smallest one that "
        "holds every adapter served (their FineTuneJobs' adapter.r, or the rank a pod found), never lowered "
        "(status.serving).",
        json_schema_extra={"enum": list(VLLM_LORA_RANKS)},
    )
    max_cpu_loras: Optional[int] = Field(
        default=None, ge=1, le=4096, description="Adapters cached in CPU memory (--max-cpu-loras)."
    )
    max_model_len: Optional[int] = Field(default=None, ge=16, le=1048576, description="--max-model-len.")
    dtype: str = Field(
        default="auto", json_schema_extra={"enum": ["auto", "bfloat16", "float16", "float32"]}, description="--dtype."
    )
    gpu_memory_utilization: Optional[float] = Field(
        default=None, gt=0, le=1, description="--gpu-memory-utilization."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="--tensor-parallel-size (GPUs per pod).")
    trust_remote_code: bool = Field(
        default=False,
        description="--trust-remote-code: run the Python code shipped with the base model (its repository or "
        "directory) inside the vLLM server, which holds the admin credential. Only for models whose code you "
        "trust; refused in extraArgs.",
    )
    extra_args: list[Annotated[str, Field(max_length=EXTRA_ARG_MAX_LENGTH)]] = Field(
        default_factory=list, max_length=EXTRA_ARGS_MAX_ITEMS, description=_EXTRA_ARGS_DOC
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            f"!has(self.extraArgs) || self.extraArgs.all(a, !a.matches('{REFUSED_VLLM_ARG_REGEX}'))",
            "vllm.extraArgs must not contain a flag tuneop renders or one that bypasses the admin guard "
            "(--lora-modules, --api-key, --middleware, --host, --port, --root-path, --model, ...: the list is in "
            "the field's description), an abbreviation or --flag_with_underscores form of one, or a short option",
        )
    ]

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"{v} is not a rank vLLM accepts ({', '.join(map(str, VLLM_LORA_RANKS))})")
        return v

    @field_validator("extra_args")
    @classmethod
    def _refused_flags(cls, v: list[str]) -> list[str]:
        why = [f"extraArgs[{i}] {msg}" for i, a in enumerate(v) if (msg := refused_vllm_arg(a)) is not None]
        if why:
            raise ValueError("; ".join(why))
        return v


class Resources(Model):
    """Compute of each vLLM pod."""

    gpus: Optional[int] = Field(
        default=None, ge=0, le=64, description="GPUs per pod; default: vllm.tensorParallelSize."
    )
    gpu_resource_name: str = Field(default="nvidia.com/gpu")
    cpu: Optional[str] = None
    memory: Optional[str] = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class ServiceSpec(Model):
    port: int = Field(default=8000, ge=1, le=65535, description="Service port of the OpenAI-compatible API.")
    type: str = Field(default="ClusterIP", json_schema_extra={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]})


class AutoscalingSpec(Model):
    """A HorizontalPodAutoscaler on vLLM's queue (needs a Prometheus adapter serving pod metrics)."""

    enabled: bool = False
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    target_waiting_requests: float = Field(
        default=4, gt=0, description="Target average of vllm:num_requests_waiting per pod."
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        ("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
         "minReplicas must not exceed maxReplicas")
    ]

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class AuthSpec(Model):
    api_key_secret_ref: Optional[SecretKeyRef] = Field(
        default=None, description="Turn on vLLM's API key for inference (clients send 'Authorization: Bearer <key>')."
    )


class AdapterDeploymentSpec(Model):
    """Desired state of an AdapterDeployment."""

    base_model: str = Field(
        min_length=1, max_length=512, description="Hugging Face model id, or a path inside modelVolume."
    )
    model_volume: Optional[PvcRef] = Field(default=None, description="PVC holding the base model.")
    hf_token_secret_ref: Optional[SecretKeyRef] = Field(default=None, description="Token for gated models.")
    storage: Optional[storage_api.Storage] = Field(default=None, description="Object storage of s3:// adapter sources.")
    adapters: list[AdapterRef] = Field(
        default_factory=list, max_length=256, description="Adapters to serve; add or remove them live."
    )
    replicas: int = Field(default=1, ge=0, le=256, description="vLLM pods (ignored when autoscaling is on).")
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    resources: Resources = Field(default_factory=Resources)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "adapter names must be unique",
        ),
        (
            "!has(self.vllm) || !has(self.vllm.maxCpuLoras) || !has(self.vllm.maxLoras) "
            "|| self.vllm.maxCpuLoras >= self.vllm.maxLoras",
            "vllm.maxCpuLoras must be at least vllm.maxLoras",
        ),
    ]

    @model_validator(mode="after")
    def _unique(self) -> "AdapterDeploymentSpec":
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique: {', '.join(dupes)}")
        v = self.vllm
        if v.max_cpu_loras is not None and v.max_loras is not None and v.max_cpu_loras < v.max_loras:
            raise ValueError("vllm.maxCpuLoras must be at least vllm.maxLoras")
        return self


class PodAdapterStatus(Model):
    pod: str
    since: Optional[str] = None


class AdapterStatus(Model):
    name: str
    state: str = Field(
        description="Waiting (FineTuneJob not Succeeded) | Pending | Loaded | Failed",
        json_schema_extra={"enum": ["Waiting", "Pending", "Loaded", "Failed"]},
    )
    message: Optional[str] = None
    reason: Optional[str] = Field(
        default=None, description="Why it is Failed, when tuneop knows: BaseModelMismatch (not trained on baseModel)."
    )
    path: Optional[str] = None
    sha256: Optional[str] = None
    pods: list[PodAdapterStatus] = Field(default_factory=list)


class AdapterDeploymentStatus(Model):
    model_config = Model.model_config | {"extra": "ignore"}

    observed_generation: Optional[int] = None
    phase: Optional[str] = None
    message: Optional[str] = None
    conditions: list[Condition] = Field(default_factory=list)
    replicas: Optional[int] = None
    ready_replicas: Optional[int] = None
    adapters_desired: Optional[int] = None
    adapters_ready: Optional[int] = None
    endpoint: Optional[str] = None
    adapters: list[AdapterStatus] = Field(default_factory=list)
    serving: Optional[ServingStatus] = Field(default=None, description="The vLLM LoRA settings of the pods.")


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Adapters", "type": "integer", "jsonPath": ".status.adaptersReady"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.adaptersDesired"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
