"""spec.tracking of a FineTuneJob: experiment tracking in MLflow and Weights & Biases.

Only non-secret settings live here (they go into the job config ConfigMap); credentials are Secret
references the training pod receives as environment variables (``valueFrom.secretKeyRef``).
"""
from __future__ import annotations

from enum import Enum
from typing import ClassVar, Optional
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from .common import Model, SecretKeyRef


class MlflowCredentials(Model):
    """A Secret with MLflow credentials: a token, or a username and a password (MLflow's
    MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    token_key: Optional[str] = Field(
        default=None, min_length=1, max_length=253, description="Key holding a bearer token."
    )
    username_key: Optional[str] = Field(
        default=None, min_length=1, max_length=253, description="Key holding the username (basic auth)."
    )
    password_key: Optional[str] = Field(
        default=None, min_length=1, max_length=253, description="Key holding the password (basic auth)."
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "has(self.tokenKey) || (has(self.usernameKey) && has(self.passwordKey))",
            "credentialsSecretRef needs tokenKey, or usernameKey and passwordKey",
        ),
        (
            "has(self.usernameKey) == has(self.passwordKey)",
            "credentialsSecretRef: usernameKey and passwordKey go together",
        ),
    ]

    @model_validator(mode="after")
    def _keys(self) -> "MlflowCredentials":
        if (self.username_key is None) != (self.password_key is None):
            raise ValueError("credentialsSecretRef: usernameKey and passwordKey go together")
        if self.token_key is None and self.username_key is None:
            raise ValueError("credentialsSecretRef needs tokenKey, or usernameKey and passwordKey")
        return self


class MlflowTracking(Model):
    """Log the run to an MLflow tracking server: parameters, the loss curve (TRL/transformers'
    MLflow reporting), the test evaluation, the adapter's sha256 and its manifest."""

    tracking_uri: str = Field(
        min_length=1,
        max_length=2048,
        description="http(s):// URL of the MLflow tracking server, without credentials "
        "(those go in credentialsSecretRef).",
    )
    experiment: str = Field(min_length=1, max_length=500, description="Experiment name (created when missing).")
    run_name: Optional[str] = Field(
        default=None, min_length=1, max_length=250, description="Run name; defaults to the FineTuneJob's name."
    )
    credentials_secret_ref: Optional[MlflowCredentials] = Field(
        default=None, description="Secret with a token or a username and password for the server."
    )

    # The API server refuses a user part too, with a CEL rule: its message does not echo the value
    # (a schema pattern's error would quote the URL, password and all).
    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "self.trackingUri.matches('^https?://[^/@?#\\\\s]+([/?#].*)?$')",
            "trackingUri must be an http:// or https:// URL without credentials (put them in credentialsSecretRef)",
        ),
    ]

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"trackingUri must be an http:// or https:// URL, got {value.split('@')[-1]!r}")
        if parts.username is not None or parts.password is not None:
            # never echo it: the user part may be a password
            raise ValueError("trackingUri must not carry credentials: put them in a Secret (credentialsSecretRef)")
        return value


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"


class WandbTracking(Model):
    """Log the run to Weights & Biases (TRL/transformers' W&B reporting plus the evaluation and the
    adapter's sha256). offline: the run is written under <output>/wandb for a later `wandb sync`."""

    project: str = Field(min_length=1, max_length=128, description="W&B project.")
    entity: Optional[str] = Field(default=None, min_length=1, max_length=128, description="W&B entity (team or user).")
    run_name: Optional[str] = Field(
        default=None, min_length=1, max_length=128, description="Run name; defaults to the FineTuneJob's name."
    )
    api_key_secret_ref: Optional[SecretKeyRef] = Field(
        default=None, description="Secret with the W&B API key (WANDB_API_KEY); required when mode is online."
    )
    mode: WandbMode = Field(
        default=WandbMode.online, description="online, or offline where no W&B server is reachable."
    )

    cel_rules: ClassVar[list[tuple[str, str]]] = [
        (
            "(has(self.mode) && self.mode == 'offline') || has(self.apiKeySecretRef)",
            "wandb mode online requires apiKeySecretRef",
        ),
    ]

    @model_validator(mode="after")
    def _key(self) -> "WandbTracking":
        if self.mode == WandbMode.online and self.api_key_secret_ref is None:
            raise ValueError("wandb mode online requires apiKeySecretRef")
        return self


class TrackingSpec(Model):
    """Experiment tracking of the training run (backend: kubernetes and tuneop run)."""

    mlflow: Optional[MlflowTracking] = Field(default=None, description="MLflow tracking server.")
    wandb: Optional[WandbTracking] = Field(default=None, description="Weights & Biases.")


class TrackingStatus(Model):
    """Where the run was tracked (from the trainer's final event)."""

    model_config = Model.model_config | {"extra": "ignore"}

    mlflow_run_id: Optional[str] = Field(default=None, description="MLflow run id.")
    mlflow_experiment_id: Optional[str] = Field(default=None, description="MLflow experiment id.")
    mlflow_run_url: Optional[str] = Field(default=None, description="The run's page on the MLflow server.")
    wandb_run_id: Optional[str] = Field(default=None, description="W&B run id.")
    wandb_run_url: Optional[str] = Field(default=None, description="The run's W&B page (online runs).")
    wandb_mode: Optional[str] = Field(default=None, description="online or offline.")
