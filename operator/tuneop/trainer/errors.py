"""Errors the trainer reports in its termination message, with their exit codes."""
from __future__ import annotations

DATASET_INVALID = "DatasetInvalid"
CONFIG_INVALID = "ConfigInvalid"
UNSUPPORTED_HARDWARE = "UnsupportedHardware"
TRAINING_ERROR = "TrainingError"
# output.s3: the adapter could not be uploaded (a missing bucket, bad credentials: exit 2; no answer: 1)
OUTPUT_UPLOAD_FAILED = "OutputUploadFailed"

USER_ERRORS = {DATASET_INVALID, CONFIG_INVALID, UNSUPPORTED_HARDWARE}


class TrainerError(Exception):
    """A failure with a reason for the operator. User errors exit 2 (not retried), others 1."""

    def __init__(self, reason: str, message: str, details: dict | None = None, user_error: bool | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = details or {}
        self.user_error = user_error

    @property
    def exit_code(self) -> int:
        user = self.reason in USER_ERRORS if self.user_error is None else self.user_error
        return 2 if user else 1
