"""The program of the short upload/download pods of backend: together.

``python -m tuneop.backends.together.pod upload --config /etc/tuneop/job.json``
    Reads the resolved job config (``jobconfig.resolve``), downloads URL datasets, checks the data
    with :mod:`tuneop.dataset` (DatasetInvalid on bad rows), converts rows to Together's formats
    (preference rows -> ``{"input", "preferred_output", "non_preferred_output"}``, conversational
    prompt/completion -> ``messages``; ``validationSplit`` is held out here with the spec's seed),
    writes them as ``.jsonl`` files and uploads them with the SDK, checking Together's validation
    report. Result::

        {"event": "uploaded", "trainingFile": "file-..", "validationFile": "file-.."|null,
         "format": "messages", "dataset": {"format", "trainRows", "validationRows", "estimatedTokens"}}

``python -m tuneop.backends.together.pod download --config FILE --job-id ft-...``
    Downloads the adapter (``checkpoint=adapter``; full weights for ``adapter.type: full``), safely
    extracts it (:mod:`tuneop.archive`) within :func:`tuneop.archive.size_limit` (from the LoRA
    rank, the base model's size and the output volume's free space: a small archive that would
    expand past it is refused with ArchiveInvalid before it fills the volume), and writes ``<paths.output>/adapter/`` with
    ``tuneop-manifest.json`` (``source: together``). Result::

        {"event": "done", "adapter": {"path", "sha256", "manifestSha256", "sizeBytes"},
         "together": {"jobId", "modelOutputName"}}

Both print the result as one JSON line on stdout and write it as the container's termination
message (``$TUNEOP_TERMINATION_LOG``, else ``/dev/termination-log`` when writable). Errors:
``{"event": "error", "reason", "message"}`` with exit 2 for user errors (ConfigInvalid,
DatasetInvalid, ArchiveInvalid, TogetherAuth, TogetherRejected, TogetherFileInvalid...) and exit 1
for the rest (TogetherUnavailable, TogetherRateLimited, unexpected errors; the Job may retry).

Environment: ``TOGETHER_API_KEY`` (from a secretKeyRef; never printed), ``TOGETHER_BASE_URL``
(optional, the host root such as ``https://api.together.xyz``: a trailing ``/v1`` is stripped;
tests point it at a fake server).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from typing import Any, Optional

from ...api.finetunejob import AdapterType, FineTuneJobSpec
from ...archive import (
    DEFAULT_MAX_FILES,
    ArchiveError,
    adapter_summary,
    find_adapter_dir,
    safe_extract,
    size_limit,
    write_adapter_layout,
)
from ...dataset import to_together_preference
from ...trainer import data as D
from ...trainer.config import load_config
from ...trainer.errors import CONFIG_INVALID, DATASET_INVALID, TRAINING_ERROR, TrainerError
from ...trainer.events import Emitter, shorten
from .client import TogetherBackendError, TogetherClient, TogetherUserError, download_checkpoint, redact

ARCHIVE_INVALID = "ArchiveInvalid"
TOGETHER_ERROR = "TogetherError"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tuneop.backends.together.pod", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="check, convert and upload the datasets")
    up.add_argument("--config", required=True, help="resolved job config (JSON)")
    down = sub.add_parser("download", help="download, extract and lay out the adapter")
    down.add_argument("--config", required=True, help="resolved job config (JSON)")
    down.add_argument("--job-id", required=True, help="Together fine-tune id (ft-...)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------- data conversion


def to_together_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A normalised row (``tuneop.dataset.normalize_row``) -> a row Together accepts."""
    if fmt == "preference":
        return to_together_preference(row)
    if fmt == "prompt-completion" and isinstance(row.get("prompt"), list):
        return {"messages": [dict(m) for m in row["prompt"]] + [dict(m) for m in row["completion"]]}
    return row


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _client():
    key = os.environ.get("TOGETHER_API_KEY", "").strip()
    if not key:
        raise TogetherUserError("ConfigInvalid", "TOGETHER_API_KEY is not set (the pod's secretKeyRef)")
    return TogetherClient(key, os.environ.get("TOGETHER_BASE_URL") or None)


def upload(cfg: Any, emitter: Emitter) -> dict[str, Any]:
    local = D.local_paths(cfg)
    splits = D.load(cfg, local)
    if not splits.train:
        raise TrainerError(DATASET_INVALID, "no training rows")
    fmt = splits.format
    train = [to_together_row(r, fmt) for r in splits.train]
    validation = [to_together_row(r, fmt) for r in splits.validation]
    tokens = sum(len(json.dumps(r, ensure_ascii=False)) for r in train + validation) // 4
    name = str(cfg.metadata.get("name") or "dataset")
    with tempfile.TemporaryDirectory(prefix="tuneop-together-") as tmp:
        train_path = os.path.join(tmp, f"{name}-train.jsonl")
        _write_jsonl(train_path, train)
        val_path = None
        if validation:
            val_path = os.path.join(tmp, f"{name}-validation.jsonl")
            _write_jsonl(val_path, validation)
        with _client() as client:
            tf = client.upload_file(train_path)
            vf = client.upload_file(val_path) if val_path else None
    return {
        "event": "uploaded",
        "trainingFile": tf["id"],
        "validationFile": vf["id"] if vf else None,
        "format": fmt,
        "dataset": {
            "format": fmt,
            "trainRows": len(train),
            "validationRows": len(validation),
            "estimatedTokens": tokens,
        },
    }


def archive_limit(spec: FineTuneJobSpec, job: dict[str, Any], free_bytes: Optional[int]) -> tuple[int, str]:
    """:func:`tuneop.archive.size_limit` for this spec and Together job (its ``model`` field)."""
    models = [spec.together.model if spec.together is not None else None,
              job.get("model") if isinstance(job.get("model"), str) else None, spec.base_model]
    return size_limit(adapter_type=spec.adapter.type.value, lora_r=int(spec.adapter.r), models=models,
                      free_bytes=free_bytes)


def download(cfg: Any, job_id: str, emitter: Emitter) -> dict[str, Any]:
    spec = cfg.spec
    out = cfg.paths.output
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".together-download-", dir=out)
    try:
        with _client() as client:
            job = client.retrieve(job_id)
            if job.get("status") != "completed":
                raise TrainerError(CONFIG_INVALID, f"Together job {job_id} is {job.get('status')}, not completed")
            archive = os.path.join(work, "archive")
            limit, source = archive_limit(spec, job, shutil.disk_usage(work).free)
            # the archive is at most its content plus tar headers (1 KiB a member at worst)
            size = client.download(job_id, archive, checkpoint=download_checkpoint(spec),
                                   max_bytes=limit + DEFAULT_MAX_FILES * 1024, limit_source=source)
        emitter.emit({"event": "downloaded", "jobId": job_id, "bytes": size})
        extracted = os.path.join(work, "extracted")
        limit, source = archive_limit(spec, job, shutil.disk_usage(work).free)
        safe_extract(archive, extracted, max_bytes=limit, limit_source=source)
        os.unlink(archive)
        adapter_type = "full" if spec.adapter.type == AdapterType.full else "lora"
        src = find_adapter_dir(extracted, adapter_type)
        output_name = job.get("model_output_name")
        write_adapter_layout(
            src,
            out,
            base_model=spec.base_model,
            method=spec.method.value,
            adapter_type=spec.adapter.type.value,
            extra={"together": {"jobId": job_id, "modelOutputName": output_name,
                                "model": job.get("model")}},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "event": "done",
        "adapter": adapter_summary(os.path.join(out, "adapter")),
        "together": {"jobId": job_id, "modelOutputName": output_name},
    }


# ------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    emitter = Emitter(stream=sys.stdout)
    key = os.environ.get("TOGETHER_API_KEY", "")

    def fail(reason: str, message: str, code: int) -> int:
        emitter.terminate({"event": "error", "reason": reason, "message": shorten(redact(message, key))})
        return code

    try:
        cfg = load_config(args.config)
        if args.command == "upload":
            result = upload(cfg, emitter)
        else:
            result = download(cfg, args.job_id, emitter)
        emitter.terminate(result)
        return 0
    except TrainerError as e:
        return fail(e.reason, e.message, e.exit_code)
    except ArchiveError as e:
        return fail(ARCHIVE_INVALID, str(e), 2)
    except TogetherBackendError as e:
        return fail(e.reason, e.message, 2 if e.user_error else 1)
    except KeyboardInterrupt:
        return fail(TRAINING_ERROR, "interrupted", 130)
    except Exception as e:  # noqa: BLE001
        print(redact(traceback.format_exc(), key), file=sys.stderr)
        return fail(TOGETHER_ERROR, f"{type(e).__name__}: {e}", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
