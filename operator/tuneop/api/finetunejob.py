"""FineTuneJob: train a LoRA / QLoRA / full / DPO adapter of a base model on a dataset.

These models are the single source of truth: the CRD in crds/finetunejobs.yaml is generated from
them (`tuneop crds`), the operator parses every object with them, and the trainer reads the
resolved spec with them.
"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, ClassVar, Optional

from pydantic import Field, field_validator, model_validator

from . import storage as storage_api
from .common import (
    Condition,
    ConfigMapKeyRef,
    Model,
    PvcRef,
    SecretKeyRef,
    Toleration,
)
from .cost import CostStatus
from .startfrom import StartedFrom, StartFrom
from .tracking import TrackingSpec, TrackingStatus

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]


class Backend(str, Enum):
    """The built-in backends (tuneop.backends); a FineTuneJob may name any registered one."""

    kubernetes = "kubernetes"
    together = "together"


# The names `spec.backend` accepts: the registered backends (``tuneop.backends.register`` adds a
# plug-in's name here). The CRD's enum is generated from it.
BACKEND_NAMES: list[str] = [b.value for b in Backend]


def _backend_enum(schema: dict[str, Any]) -> None:
    rest = {k: v for k, v in schema.items() if k not in ("enum", "type")}
    schema.clear()
    schema.update({"enum": list(BACKEND_NAMES), "type": "string", **rest})


class Method(str, Enum):
    sft = "sft"
    dpo = "dpo"


class AdapterType(str, Enum):
    lora = "lora"
    qlora = "qlora"
    full = "full"


class DatasetFormat(str, Enum):
    auto = "auto"
    messages = "messages"
    prompt_completion = "prompt-completion"
    text = "text"
    preference = "preference"


class LrScheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Phase(str, Enum):
    pending = "Pending"
    validating = "Validating"
    running = "Running"
    evaluating = "Evaluating"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


class DataSource(Model):
    """Where a dataset file lives: exactly one of pvc, url or configMap."""

    pvc: Optional[PvcRef] = Field(default=None, description="A JSONL file inside a PVC.")
    url: Optional[str] = Field(
        default=None,
        pattern=r"^(https?|s3)://",
        max_length=2048,
        description="An HTTP(S) URL of a JSONL file, or s3://bucket/key (read with spec.storage.s3).",
    )
    config_map: Optional[ConfigMapKeyRef] = Field(
        default=None, description="A key of a ConfigMap holding JSONL (small datasets)."
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "[has(self.pvc), has(self.url), has(self.configMap)].filter(x, x).size() == 1",
            "exactly one of pvc, url or configMap must be set",
        )
    ]

    @model_validator(mode="after")
    def _exactly_one(self) -> "DataSource":
        n = sum(x is not None for x in (self.pvc, self.url, self.config_map))
        if n != 1:
            raise ValueError("exactly one of pvc, url or configMap must be set")
        return self

    def describe(self) -> str:
        if self.pvc is not None:
            return f"pvc {self.pvc.claim_name}:{self.pvc.path}"
        if self.config_map is not None:
            return f"configMap {self.config_map.name}/{self.config_map.key}"
        return f"url {self.url}"


class Dataset(Model):
    """The training data and optional validation and test splits (JSONL, one example a line)."""

    format: DatasetFormat = Field(
        default=DatasetFormat.auto,
        description="Row format. auto detects it from the first row; every row must match.",
    )
    train: DataSource = Field(description="Training data.")
    validation: Optional[DataSource] = Field(default=None, description="Validation data.")
    validation_split: Optional[float] = Field(
        default=None,
        gt=0,
        le=0.5,
        description="Hold out this fraction of train for validation (instead of validation).",
    )
    test: Optional[DataSource] = Field(
        default=None,
        description="Test data: base model and adapter are evaluated on it (exact match).",
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "!(has(self.validation) && has(self.validationSplit))",
            "set validation or validationSplit, not both",
        )
    ]

    @model_validator(mode="after")
    def _one_validation(self) -> "Dataset":
        if self.validation is not None and self.validation_split is not None:
            raise ValueError("set validation or validationSplit, not both")
        return self


class AdapterSpec(Model):
    """What is trained: a LoRA adapter, a QLoRA adapter on a 4-bit base, or all weights."""

    type: AdapterType = Field(
        default=AdapterType.lora,
        description="lora, qlora (4-bit NF4 base, needs CUDA GPUs) or full fine-tuning.",
    )
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        max_length=64,
        description="Module names to adapt; 'all-linear' adapts every linear layer.",
    )
    layers: list[Annotated[int, Field(ge=-1024, le=1023)]] = Field(
        default_factory=list,
        max_length=1024,
        description=(
            "Decoder layers to adapt, by index: 0 is the first, -1 the last (so [-4, -3, -2, -1] is the "
            "top four of any model). Empty adapts every layer. Layers below the lowest one adapted need "
            "no backward pass: training the top layers only is much faster. lora and qlora only."
        ),
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "self.type != 'full' || !has(self.layers) || size(self.layers) == 0",
            "layers: full fine-tuning trains every layer; layers is for lora and qlora",
        )
    ]

    @model_validator(mode="after")
    def _layers(self) -> "AdapterSpec":
        if self.layers and self.type == AdapterType.full:
            raise ValueError("layers: full fine-tuning trains every layer; layers is for lora and qlora")
        seen = [i for n, i in enumerate(self.layers) if i in self.layers[:n]]
        if seen:
            raise ValueError(f"layers: {seen[0]} is listed twice")
        return self


class Hyperparameters(Model):
    """Training hyperparameters shared by every backend."""

    epochs: float = Field(default=3, gt=0, le=100, description="Passes over the training data.")
    max_steps: Optional[int] = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    max_train_seconds: Optional[int] = Field(
        default=None,
        ge=10,
        le=30 * 24 * 3600,
        description=(
            "Training time budget in seconds: training stops before the training loop (steps, "
            "checkpoint saves, validation) would run longer; model loading and the test evaluation are "
            "not counted. The LR schedule and warmup follow the share of the budget spent instead of the "
            "steps. Whichever of the budget, maxSteps or epochs comes first ends training; a resumed run "
            "keeps what its checkpoint had spent."
        ),
    )
    learning_rate: float = Field(default=2.0e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    lr_scheduler: LrScheduler = Field(default=LrScheduler.cosine, description="LR schedule.")
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=1, description="Fraction of steps spent warming up the LR."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_seq_length: int = Field(
        default=1024, ge=16, le=131072, description="Longer examples are truncated."
    )
    packing: bool = Field(
        default=False,
        description="Pack examples into full sequences (padding-free batching).",
    )
    train_on_inputs: bool = Field(
        default=False,
        description="Also compute loss on prompts/user turns (default: completion only).",
    )
    seed: int = Field(default=42, ge=0, description="Random seed.")
    dpo_beta: float = Field(default=0.1, gt=0, le=10, description="DPO beta (method: dpo).")
    precision: Precision = Field(
        default=Precision.auto,
        description="auto picks bf16 where the hardware supports it, else fp32.",
    )
    gradient_checkpointing: Optional[bool] = Field(
        default=None,
        description="Trade compute for memory. Unset: decided from model size and device memory.",
    )


class OutputSpec(Model):
    """Where the adapter is written: <path>/adapter in the volume, plus checkpoints and progress."""

    pvc: PvcRef = Field(description="Output volume and directory.")
    s3: Optional[storage_api.S3Output] = Field(
        default=None,
        description="Also upload the finished adapter here (with spec.storage.s3); the volume keeps checkpoints.",
    )


class Resources(Model):
    """Compute for the training pods."""

    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per node (0 runs on CPU).")
    nodes: int = Field(default=1, ge=1, le=256, description="Nodes; >1 runs an Indexed Job.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPUs."
    )
    cpu: Optional[str] = Field(default=None, description="CPU request and limit, e.g. '8'.")
    memory: Optional[str] = Field(default=None, description="Memory request and limit, e.g. 64Gi.")
    shm_size: Optional[str] = Field(
        default="8Gi", description="Size of /dev/shm (memory-backed) for data loaders and NCCL."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for GPU node taints."
    )


class EvaluationSpec(Model):
    """Evaluation of base model and adapter on the test split."""

    enabled: bool = Field(default=True, description="Evaluate when a test split is given.")
    max_samples: Optional[int] = Field(default=None, ge=1, description="Evaluate at most this many rows.")
    max_new_tokens: int = Field(default=32, ge=1, le=4096, description="Generation length.")


class TogetherSpec(Model):
    """Settings for backend: together (Together AI fine-tuning API)."""

    api_key_secret_ref: SecretKeyRef = Field(description="Secret holding the Together API key.")
    model: Optional[str] = Field(
        default=None, description="Together model name; defaults to a mapping from baseModel."
    )
    suffix: Optional[str] = Field(
        default=None, max_length=40, description="Suffix of the fine-tuned model name."
    )
    n_checkpoints: Optional[int] = Field(default=None, ge=1)
    n_evals: Optional[int] = Field(default=None, ge=0)
    lora_trainable_modules: Optional[str] = None
    from_checkpoint: Optional[str] = Field(
        default=None,
        description="A Together job id or checkpoint (ft-...[:step]) to continue from: the same as "
        "startFrom.togetherCheckpoint (set one of the two); status.startedFrom records it.",
    )


class FineTuneJobSpec(Model):
    """Desired state of a FineTuneJob."""

    backend: str = Field(
        default=Backend.kubernetes.value,
        description="kubernetes: a training Job on this cluster; together: the Together AI API.",
        json_schema_extra=_backend_enum,
    )
    base_model: str = Field(
        min_length=1,
        max_length=512,
        description=(
            "Hugging Face model id, a directory or .gguf file (inside modelVolume when set), "
            "or pkg://<python package>/<file> for a model shipped in an installed package."
        ),
    )
    method: Method = Field(default=Method.sft, description="sft or dpo.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec, description="What is trained.")
    dataset: Dataset = Field(description="Training, validation and test data.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    output: OutputSpec = Field(description="Where the adapter is written.")
    storage: Optional[storage_api.Storage] = Field(default=None, description="Object storage of s3:// URIs.")
    resources: Resources = Field(default_factory=Resources)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    image: Optional[str] = Field(
        default=None, description="Trainer image; defaults to the operator's configured image."
    )
    model_volume: Optional[PvcRef] = Field(
        default=None,
        description="PVC holding the base model; baseModel is then a path inside it.",
    )
    hf_token_secret_ref: Optional[SecretKeyRef] = Field(
        default=None, description="Secret with a Hugging Face token for gated models."
    )
    max_retries: int = Field(
        default=2, ge=0, le=20,
        description="Pod restarts before the job fails (resumes from checkpoint). With resources.nodes > 1: "
        "restarts of every rank after one failed (status.restarts).",
    )
    active_deadline_seconds: Optional[int] = Field(
        default=None, ge=60, description="Fail the training Job after this long."
    )
    termination_grace_period_seconds: Optional[int] = Field(
        default=None,
        ge=30,
        le=24 * 3600,
        description=(
            "Seconds the training pods get after SIGTERM (suspend, eviction, node drain) to finish the "
            "current step and write a checkpoint before they are killed. Unset: 300. Raise it for "
            "full fine-tuning of large models, whose checkpoints take longer to write."
        ),
    )
    suspend: bool = Field(
        default=False, description="Stop the job (its pods are deleted); unset to resume."
    )
    together: Optional[TogetherSpec] = Field(default=None, description="backend: together only.")
    start_from: Optional[StartFrom] = Field(
        default=None, description="Continue from earlier work: another FineTuneJob's adapter, an adapter or "
        "checkpoint in a PVC, or a Together checkpoint.",
    )
    max_cost_usd: Optional[float] = Field(
        default=None, alias="maxCostUSD", gt=0, le=10_000_000,
        description=(
            "Refuse to start when the cost estimate (status.cost) is over this many USD, or when there is "
            "no estimate; backend together also cancels a job whose cost at Together passes it. Changing "
            "it does not restart anything."
        ),
    )
    tracking: Optional[TrackingSpec] = Field(
        default=None, description="Experiment tracking (MLflow, Weights & Biases) of the training run."
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "!has(self.adapter) || !has(self.adapter.type) || self.adapter.type != 'qlora' "
            "|| !has(self.backend) || self.backend == 'kubernetes'",
            "adapter.type qlora requires backend kubernetes",
        ),
        (
            "!has(self.backend) || self.backend != 'together' || has(self.together)",
            "backend together requires the together block",
        ),
        (
            "!has(self.method) || self.method != 'dpo' || !has(self.dataset.format) "
            "|| self.dataset.format in ['auto', 'preference']",
            "method dpo requires dataset.format preference (or auto)",
        ),
        (
            "!has(self.startFrom) || !has(self.startFrom.togetherCheckpoint) "
            "|| (has(self.backend) && self.backend == 'together')",
            "startFrom.togetherCheckpoint requires backend together",
        ),
        (
            "!has(self.startFrom) || !has(self.together) || !has(self.together.fromCheckpoint)",
            "set startFrom or together.fromCheckpoint, not both",
        ),
        (
            "!has(self.startFrom) || !has(self.adapter) || !has(self.adapter.type) || self.adapter.type != 'full'",
            "startFrom continues a LoRA adapter; for adapter.type full set baseModel to the earlier model",
        ),
    ]

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, value: str) -> str:
        if value not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {value!r}: one of {', '.join(BACKEND_NAMES)}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> "FineTuneJobSpec":
        if self.adapter.type == AdapterType.qlora and self.backend != Backend.kubernetes:
            raise ValueError("adapter.type qlora requires backend kubernetes")
        if self.backend == Backend.together and self.together is None:
            raise ValueError("backend together requires the together block")
        if self.method == Method.dpo and self.dataset.format not in (
            DatasetFormat.auto,
            DatasetFormat.preference,
        ):
            raise ValueError("method dpo requires dataset.format preference (or auto)")
        if self.start_from is not None:
            if self.start_from.together_checkpoint is not None and self.backend != Backend.together:
                raise ValueError("startFrom.togetherCheckpoint requires backend together")
            if self.together is not None and self.together.from_checkpoint:
                raise ValueError("set startFrom or together.fromCheckpoint, not both")
            if self.adapter.type == AdapterType.full:
                raise ValueError(
                    "startFrom continues a LoRA adapter; for adapter.type full set baseModel to the earlier model"
                )
        return self


class EvaluationProgress(Model):
    """The test evaluation after training (phase Evaluating)."""

    stage: Optional[str] = Field(default=None, description="base or adapter: the model being scored.")
    done: Optional[int] = Field(default=None, description="Test rows scored in this stage.")
    total: Optional[int] = Field(default=None, description="Test rows to score in this stage.")
    eta_seconds: Optional[int] = None


class Progress(Model):
    step: int = 0
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None
    eval_loss: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None
    eta_seconds: Optional[int] = None
    last_checkpoint_step: Optional[int] = Field(
        default=None, description="Step of the newest checkpoint written (the resume point)."
    )
    evaluation: Optional[EvaluationProgress] = None
    updated_at: Optional[str] = None


class BaseModelInfo(Model):
    """The base model an adapter was trained on, as the trainer loaded it."""

    model_config = Model.model_config | {"extra": "ignore"}

    architecture: Optional[str] = None
    model_type: Optional[str] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    vocab_size: Optional[int] = None


class AdapterStatus(Model):
    location: str = Field(description="Where the adapter is, e.g. pvc://adapters/news/adapter.")
    uri: Optional[str] = Field(default=None, description="The s3:// prefix it was uploaded to (output.s3).")
    sha256: str = Field(description="sha256 of adapter_model.safetensors (or model weights).")
    manifest_sha256: Optional[str] = None
    size_bytes: Optional[int] = None
    base_model: Optional[str] = Field(default=None, description="The base model it was trained on.")
    base_model_info: Optional[BaseModelInfo] = None
    reused: Optional[bool] = Field(
        default=None,
        description="True when the adapter already on the volume was trained for this very spec and data "
        "and was kept instead of training again.",
    )


class EvaluationStatus(Model):
    metric: str = "exact_match"
    samples: int = 0
    base: Optional[float] = None
    adapter: Optional[float] = None


class DatasetStatus(Model):
    format: Optional[str] = None
    train_rows: Optional[int] = None
    validation_rows: Optional[int] = None
    test_rows: Optional[int] = None
    estimated_tokens: Optional[int] = None


class TogetherStatus(Model):
    """backend: together: the Together fine-tuning job this FineTuneJob created or adopted."""

    model_config = Model.model_config | {"extra": "ignore"}

    suffix: Optional[str] = Field(
        default=None,
        description="Suffix put on the Together job (recorded before it is created, so a restarted "
        "operator adopts the job instead of creating a second one).",
    )
    job_id: Optional[str] = Field(default=None, description="Together fine-tune id (ft-...).")
    status: Optional[str] = Field(default=None, description="Together's status of the job.")
    training_file: Optional[str] = Field(default=None, description="Uploaded training file id.")
    validation_file: Optional[str] = Field(default=None, description="Uploaded validation file id.")
    dataset_format: Optional[str] = None
    event_cursor: Optional[int] = Field(
        default=None, description="Number of Together job events already mirrored as Events."
    )
    model_output_name: Optional[str] = Field(
        default=None, description="Name of the fine-tuned model hosted by Together."
    )
    token_count: Optional[int] = None
    cost_usd: Optional[float] = Field(
        default=None, alias="costUSD", description="Price of the job so far, in USD."
    )
    cancel_requested: Optional[bool] = Field(
        default=None, description="The operator cancelled the job (spec.suspend)."
    )
    stale_job_ids: Optional[list[str]] = Field(
        default=None,
        description="Jobs of an older spec that still have to be cancelled.",
    )
    retry_at: Optional[str] = Field(
        default=None,
        description="Together asked to wait (Retry-After, clamped to 5..600 s): no poll or create "
        "before this time.",
    )


class FineTuneJobStatus(Model):
    model_config = Model.model_config | {"extra": "ignore"}

    phase: Optional[Phase] = None
    observed_generation: Optional[int] = None
    reason: Optional[str] = Field(
        default=None, description="Machine-readable reason of the current phase (CamelCase)."
    )
    message: Optional[str] = None
    spec_hash: Optional[str] = Field(
        default=None,
        description="Hash of the spec (without suspend) that the phase and children belong to.",
    )
    conditions: list[Condition] = Field(default_factory=list)
    progress: Optional[Progress] = None
    dataset: Optional[DatasetStatus] = None
    adapter: Optional[AdapterStatus] = None
    evaluation: Optional[EvaluationStatus] = None
    job_name: Optional[str] = None
    restarts: Optional[int] = Field(
        default=None, description="resources.nodes > 1: times every rank was restarted from the newest "
        "checkpoint after one failed (at most spec.maxRetries).",
    )
    together: Optional[TogetherStatus] = Field(default=None, description="backend: together only.")
    started_from: Optional[StartedFrom] = Field(
        default=None, description="What the job started from (spec.startFrom), pinned with its sha256."
    )
    cost: Optional[CostStatus] = Field(default=None, description="Estimated and actual cost.")
    tracking: Optional[TrackingStatus] = Field(default=None, description="Where the run was tracked.")
    start_time: Optional[str] = None
    completion_time: Optional[str] = None


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Backend", "type": "string", "jsonPath": ".spec.backend"},
    {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel", "priority": 0},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec)
