"""Building blocks shared by both resources.

Every model is frozen, rejects unknown fields and uses camelCase on the wire; the field
descriptions become `kubectl explain` text through the generated CRD.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "tuneop.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )
    # CEL rules placed on this object's schema in the CRD: list of (rule, message).
    cel_rules: ClassVar[list[tuple[str, str]]] = []

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SecretKeyRef(Model):
    """A key of a Secret in the same namespace as the resource."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, description="Key within the Secret.")


class PvcRef(Model):
    """A path inside a PersistentVolumeClaim in the same namespace."""

    claim_name: str = Field(
        min_length=1, max_length=253, description="Name of the PersistentVolumeClaim."
    )
    path: str = Field(
        default="",
        max_length=1024,
        description="Path inside the volume (relative, no '..').",
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        ("!self.path.startsWith('/')", "path must be relative to the volume root"),
        ("!self.path.contains('..')", "path must not contain '..'"),
    ]

    @model_validator(mode="after")
    def _relative(self) -> "PvcRef":
        if self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError(f"path {self.path!r} must be relative to the volume root, without '..'")
        return self


class ConfigMapKeyRef(Model):
    """A key of a ConfigMap in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="Key within the ConfigMap.")


class Toleration(Model):
    """A pod toleration, as in the Kubernetes Pod spec."""

    key: Optional[str] = None
    operator: Optional[str] = Field(default=None, json_schema_extra={"enum": ["Exists", "Equal"]})
    value: Optional[str] = None
    effect: Optional[str] = Field(
        default=None, json_schema_extra={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}
    )
    toleration_seconds: Optional[int] = None


class Condition(Model):
    """A condition in the Kubernetes API convention."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )
    type: str
    status: str = Field(json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str = ""
    message: str = ""
    last_transition_time: Optional[str] = None
    observed_generation: Optional[int] = None
