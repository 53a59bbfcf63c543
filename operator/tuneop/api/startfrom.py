"""spec.startFrom / status.startedFrom of a FineTuneJob: continue from earlier work.

A FineTuneJob may start from another FineTuneJob's adapter (same namespace; this job waits until
that one has Succeeded and pins its adapter's sha256), from an adapter or trainer checkpoint
directory in a PVC, or (backend: together) from a Together checkpoint id.
"""
from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field, model_validator

from .common import Model

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class FineTuneJobName(Model):
    """A FineTuneJob in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the FineTuneJob.")


class StartFromPvc(Model):
    """An adapter directory (adapter_config.json + adapter_model.safetensors) or a trainer
    checkpoint directory (checkpoint-N) inside a PVC of the same namespace."""

    claim_name: str = Field(min_length=1, max_length=253, description="Name of the PersistentVolumeClaim.")
    path: str = Field(
        default="", max_length=1024, description="Directory inside the volume (relative, no '..')."
    )
    sha256: Optional[str] = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="Expected sha256 of adapter_model.safetensors; the trainer refuses other weights. "
        "Unset: the trainer records the sha256 it loaded in status.startedFrom.",
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        ("!has(self.path) || !self.path.startsWith('/')", "path must be relative to the volume root"),
        ("!has(self.path) || !self.path.contains('..')", "path must not contain '..'"),
    ]

    @model_validator(mode="after")
    def _relative(self) -> "StartFromPvc":
        if self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError(f"path {self.path!r} must be relative to the volume root, without '..'")
        return self


class StartFrom(Model):
    """Continue from earlier work: exactly one of fineTuneJob, pvc or togetherCheckpoint. The
    starting adapter is trained further (its LoRA rank, alpha and target modules are the ones it
    was made with); optimizer state, LR schedule and step count start fresh."""

    fine_tune_job: Optional[FineTuneJobName] = Field(
        default=None,
        description="Another FineTuneJob of this namespace: this job waits until it has Succeeded, then "
        "pins its status.adapter (location and sha256) into status.startedFrom. One that failed, or "
        "trained another base model, makes this job fail as SpecInvalid. backend together continues "
        "only from a together FineTuneJob (its Together job id).",
    )
    pvc: Optional[StartFromPvc] = Field(
        default=None,
        description="An adapter or trainer checkpoint directory in a PVC (backend: kubernetes). A "
        "checkpoint directory is loaded as the adapter: its weights, not its optimizer state.",
    )
    together_checkpoint: Optional[str] = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="backend together: a Together job id or checkpoint (ft-...[:step]) to continue from.",
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "[has(self.fineTuneJob), has(self.pvc), has(self.togetherCheckpoint)].filter(x, x).size() == 1",
            "exactly one of fineTuneJob, pvc or togetherCheckpoint must be set",
        )
    ]

    @model_validator(mode="after")
    def _exactly_one(self) -> "StartFrom":
        n = sum(x is not None for x in (self.fine_tune_job, self.pvc, self.together_checkpoint))
        if n != 1:
            raise ValueError("exactly one of fineTuneJob, pvc or togetherCheckpoint must be set")
        return self


class StartedFrom(Model):
    """What this job started from, pinned once for its spec (later changes of the source do not
    move it)."""

    model_config = Model.model_config | {"extra": "ignore"}

    fine_tune_job: Optional[str] = Field(default=None, description="The FineTuneJob it continued.")
    location: Optional[str] = Field(
        default=None, description="Where the starting adapter is, e.g. pvc://adapters/news/adapter."
    )
    sha256: Optional[str] = Field(
        default=None, description="sha256 of the starting adapter's weights (adapter_model.safetensors)."
    )
    together_checkpoint: Optional[str] = Field(
        default=None, description="backend together: the Together job id or checkpoint it continued."
    )
    base_model: Optional[str] = Field(default=None, description="Base model of the starting adapter.")
    pinned_at: Optional[str] = Field(default=None, description="When the source was pinned.")
