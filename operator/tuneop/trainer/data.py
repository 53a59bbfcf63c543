"""Datasets: checks (--validate-only), loading, the seeded validation hold-out. No torch here."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from ..api.finetunejob import Method
from ..dataset import DatasetError, check_file, read_rows
from .config import JobConfig
from .errors import DATASET_INVALID, TrainerError
from .paths import is_url, local_data_path, redact_url

MAX_REPORTED_ERRORS = 5
EVALUABLE_FORMATS = ("prompt-completion", "messages", "preference")


@dataclass
class Splits:
    format: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)
    test_format: Optional[str] = None


def display(path: str) -> str:
    return redact_url(path) if is_url(path) else path


_Row = TypeVar("_Row")


def holdout_split(rows: list[_Row], fraction: float, seed: int) -> tuple[list[_Row], list[_Row]]:
    """Seeded hold-out of `fraction` of rows (at least one, never all) -> (train, validation)."""
    if not fraction or len(rows) < 2:
        return list(rows), []
    n_val = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held]
    val = [r for i, r in enumerate(rows) if i in held]
    return train, val


def check_method_format(method: Method | str, fmt: str) -> None:
    if Method(method) == Method.dpo and fmt != "preference":
        raise TrainerError(
            DATASET_INVALID, f"method dpo needs preference rows (prompt, chosen, rejected); the training data is {fmt}"
        )
    if Method(method) == Method.sft and fmt == "preference":
        raise TrainerError(
            DATASET_INVALID, "preference rows (prompt, chosen, rejected) need method dpo, not sft"
        )


def _error_lines(errors: Any) -> list[str]:
    return [str(e) for e in list(errors or [])[:MAX_REPORTED_ERRORS]]


def _declared(cfg: JobConfig) -> str:
    return cfg.spec.dataset.format.value


def validate(cfg: JobConfig, local: dict[str, Optional[str]]) -> dict[str, Any]:
    """check_file on train/validation/test -> the dataset report; TrainerError(DatasetInvalid) if bad."""

    declared = _declared(cfg)
    reports: dict[str, Any] = {}
    problems: list[str] = []
    for split in ("train", "validation", "test"):
        path = local.get(split)
        if path is None:
            continue
        report = check_file(path, declared)
        reports[split] = report
        if not report.ok:
            shown = display(getattr(cfg.paths, split) or path)
            problems += [f"{split} ({shown}): {e}" for e in _error_lines(report.errors)]
    if problems:
        raise TrainerError(
            DATASET_INVALID,
            "; ".join(problems[:MAX_REPORTED_ERRORS]),
            details={"errors": problems[:MAX_REPORTED_ERRORS]},
        )
    train = reports["train"]
    fmt = train.format
    check_method_format(cfg.spec.method, fmt)
    val = reports.get("validation")
    if val is not None and val.format != fmt:
        raise TrainerError(DATASET_INVALID, f"validation rows are {val.format} but training rows are {fmt}")
    train_rows, val_rows = train.rows, (val.rows if val is not None else 0)
    if cfg.spec.dataset.validation_split and val is None:
        val_rows = len(holdout_split(list(range(train.rows)), cfg.spec.dataset.validation_split, 0)[1])
        train_rows -= val_rows
    test = reports.get("test")
    tokens = sum(int(getattr(r, "estimated_tokens", 0) or 0) for r in reports.values())
    return {
        "format": fmt,
        "trainRows": train_rows,
        "validationRows": val_rows,
        "testRows": test.rows if test is not None else 0,
        "estimatedTokens": tokens,
    }


def local_paths(cfg: JobConfig) -> dict[str, Optional[str]]:
    out = cfg.paths.output
    return {
        "train": local_data_path(cfg.paths.train, out),
        "validation": local_data_path(cfg.paths.validation, out),
        "test": local_data_path(cfg.paths.test, out),
    }


def _read(path: str, declared: str, split: str, shown: str) -> tuple[str, list[dict[str, Any]]]:
    try:
        fmt, rows = read_rows(path, declared)
    except DatasetError as e:
        raise TrainerError(DATASET_INVALID, f"{split} ({shown}): {e}") from None
    except OSError as e:
        raise TrainerError(DATASET_INVALID, f"{split} ({shown}): {e.strerror or e}") from None
    if not rows:
        raise TrainerError(DATASET_INVALID, f"{split} ({shown}): no rows")
    return fmt, list(rows)


def load(cfg: JobConfig, local: dict[str, Optional[str]]) -> Splits:
    declared = _declared(cfg)
    train_path = local["train"]
    assert train_path is not None  # paths.train is required: local_paths maps it to a file
    fmt, train = _read(train_path, declared, "train", display(cfg.paths.train))
    check_method_format(cfg.spec.method, fmt)
    validation: list[dict[str, Any]] = []
    validation_path = local.get("validation")
    if validation_path:
        vfmt, validation = _read(validation_path, declared, "validation",
                                 display(cfg.paths.validation or validation_path))
        if vfmt != fmt:
            raise TrainerError(DATASET_INVALID, f"validation rows are {vfmt} but training rows are {fmt}")
    elif cfg.spec.dataset.validation_split:
        train, validation = holdout_split(train, cfg.spec.dataset.validation_split, cfg.spec.hyperparameters.seed)
    test: list[dict[str, Any]] = []
    test_fmt = None
    test_path = local.get("test")
    if test_path:
        test_fmt, test = _read(test_path, declared, "test", display(cfg.paths.test or test_path))
    return Splits(format=fmt, train=train, validation=validation, test=test, test_format=test_fmt)


def trl_rows(rows: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """Keep only the columns TRL reads for this format."""
    keys = {
        "prompt-completion": ("prompt", "completion"),
        "messages": ("messages",),
        "text": ("text",),
        "preference": ("prompt", "chosen", "rejected"),
    }[fmt]
    return [{k: r[k] for k in keys} for r in rows]
