"""Object storage settings shared by both resources: ``spec.storage.s3`` (any S3-compatible endpoint)
and the ``s3://`` output of a FineTuneJob. The pods read ``s3://`` objects with these settings as
environment variables (``tuneop.s3``); the credentials reach them only as ``secretKeyRef`` env."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from .common import Model

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"


class S3CredentialsSecretRef(Model):
    """A Secret in the same namespace holding an access key pair."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    access_key_id_key: str = Field(
        default="accessKeyId", min_length=1, max_length=253, description="Key of the access key id."
    )
    secret_access_key_key: str = Field(
        default="secretAccessKey", min_length=1, max_length=253, description="Key of the secret access key."
    )


class S3Storage(Model):
    """Where and how s3:// URIs are read and written."""

    endpoint: Optional[str] = Field(
        default=None,
        pattern=r"^https?://[^/?#\s]+/?$",
        max_length=512,
        description="Endpoint of an S3-compatible server (MinIO, Ceph, R2, ...), addressed path-style; "
        "unset: AWS S3 of the region.",
    )
    region: Optional[str] = Field(
        default=None, pattern=r"^[a-z0-9-]{1,64}$", description="Region named in the signature (default us-east-1)."
    )
    credentials_secret_ref: Optional[S3CredentialsSecretRef] = Field(
        default=None,
        description="Secret with the access key pair, given to the pods as environment variables from the "
        "Secret; unset: requests are unsigned (public buckets).",
    )


class Storage(Model):
    """Object storage used by s3:// dataset, output and adapter URIs."""

    s3: Optional[S3Storage] = Field(default=None, description="S3 (any S3-compatible endpoint).")


class S3Output(Model):
    """An S3 prefix the finished adapter is uploaded to (its files, tuneop-manifest.json last)."""

    uri: str = Field(
        pattern=S3_URI_PATTERN,
        max_length=1024,
        description="s3://bucket/prefix: the adapter's files go to <prefix>/<file>; the manifest, written "
        "last, marks the upload complete.",
    )
