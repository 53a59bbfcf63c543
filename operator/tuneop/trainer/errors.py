"""Errors the trainer reports in its termination message, with their exit codes."""
from __future__ import annotations

DATASET_INVALID = "DatasetInvalid"
CONFIG_INVALID = "ConfigInvalid"
UNSUPPORTED_HARDWARE = "UnsupportedHardware"
TRAINING_ERROR = "TrainingError"

USER_ERRORS = {DATASET_INVALID, CONFIG_INVALID, UNSUPPORTED_HARDWARE}


class TrainerError(Exception):
    """A failure with a reason for the operator. User errors exit 2 (not retried), others 1."""

    def __init__(self, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = details or {}

    @property
    def exit_code(self) -> int:
        return 2 if self.reason in USER_ERRORS else 1
