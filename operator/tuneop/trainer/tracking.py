"""spec.tracking in the trainer: MLflow and Weights & Biases.

transformers' own reporting (``report_to``: its MLflowCallback and WandbCallback) logs the training
arguments, the model config and every logged step (the loss curve, learning rate, validation loss).
The trainer opens the runs itself first, so those callbacks write into them instead of opening their
own, and adds what only it knows: the resolved spec as parameters, the test evaluation (base vs
adapter), the adapter's sha256 and its manifest. Rank 0 only.

Credentials never pass through here: MLflow reads MLFLOW_TRACKING_TOKEN or
MLFLOW_TRACKING_USERNAME/PASSWORD and W&B reads WANDB_API_KEY from the environment (the pod gets them
from Secrets, `tuneop run` from the user's environment). A run is found again by its key (the
FineTuneJob and its training fingerprint): a pod that resumes from a checkpoint continues the run of
the pod before it.

The pure functions (what to log) are unit-tested; ``Tracker`` is the I/O around them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from ..api.tracking import TrackingSpec
from .errors import TRAINING_ERROR, TrainerError
from .events import shorten

RUN_KEY_TAG = "tuneop.runKey"
SHA256_TAG = "tuneop.adapter.sha256"
PARAM_PREFIX = "tuneop."
MLFLOW_PARAM_LIMIT = 6000  # characters of a parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
WANDB_SUBDIR = "tracking"  # <output>/tracking/wandb/offline-run-*/ (or run-*/ online)


def report_to(tracking: Optional[TrackingSpec]) -> list[str]:
    """transformers' ``report_to``: the integrations spec.tracking turns on (none: nothing is reported)."""
    if tracking is None:
        return []
    out = []
    if tracking.mlflow is not None:
        out.append("mlflow")
    if tracking.wandb is not None:
        out.append("wandb")
    return out


def run_key(namespace: str, name: str, uid: str, fingerprint: str) -> str:
    """Names one training of one FineTuneJob: the same after a pod restart (resume), another for
    another spec or data. 16 hex digits (also a valid W&B run id)."""
    text = "/".join((namespace or "", name or "", uid or "", fingerprint))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": [1, 2]} (lists stay whole)."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = value
    return out


def spec_params(spec: dict[str, Any]) -> dict[str, str]:
    """The resolved spec (camelCase) as run parameters ``tuneop.<path>``. Leaves out the tracking
    settings, every Secret reference (names of Secrets are nobody's business in a tracking server) and
    the query and user part of URLs."""
    kept = {k: v for k, v in spec.items() if k not in ("tracking", "together") and not k.endswith("SecretRef")}
    out = {}
    for key, value in sorted(flatten(kept).items()):
        if any(part.endswith("SecretRef") for part in key.split(".")):
            continue
        text = _without_url_secrets(value) if isinstance(value, str) else _json(value)
        out[PARAM_PREFIX + key] = text[:MLFLOW_PARAM_LIMIT]
    return out


def _without_url_secrets(text: str) -> str:
    """A dataset URL may be a signed one (a token in its query) or carry a user part: neither leaves
    for a tracking server; the scheme, host and path do."""
    if not text.startswith(("http://", "https://")):
        return text
    parts = urlsplit(text)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def final_metrics(metrics: Optional[dict[str, Any]], evaluation: Optional[dict[str, Any]]) -> dict[str, float]:
    """Numbers logged once at the end: the test evaluation as ``test_base_<metric>``,
    ``test_adapter_<metric>`` and ``test_samples``, the run's summary metrics as ``final_<name>``."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        number = _number(value)
        if number is not None:
            out[key if key.startswith("final_") else f"final_{key}"] = number
    if evaluation:
        metric = str(evaluation.get("metric") or "score")
        for stage in ("base", "adapter"):
            number = _number(evaluation.get(stage))
            if number is not None:
                out[f"test_{stage}_{metric}"] = number
        samples = _number(evaluation.get("samples"))
        if samples is not None:
            out["test_samples"] = samples
    return out


def final_tags(adapter: dict[str, Any], fingerprint: str) -> dict[str, str]:
    """Tags set once the adapter is written: its sha256 (weights), its manifest's, the fingerprint."""
    tags = {"tuneop.trainingFingerprint": fingerprint}
    if adapter.get("sha256"):
        tags[SHA256_TAG] = str(adapter["sha256"])
    if adapter.get("manifestSha256"):
        tags["tuneop.adapter.manifestSha256"] = str(adapter["manifestSha256"])
    return tags


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class Tracker:
    """The open runs of one training (rank 0). ``start`` before training, ``finish`` once the adapter
    is written, ``close`` on any other way out (interrupted: KILLED, the run is continued by the next
    pod; error: FAILED)."""

    def __init__(self, tracking: TrackingSpec, key: str, run_name: str, output: str):
        self.tracking = tracking
        self.key = key
        self.run_name = run_name
        self.output = output
        self.mlflow: Any = None  # the mlflow module, once a run is open
        self.wandb_run: Any = None
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------------ start
    def start(self, params: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
        """Open (or continue) the runs; returns what status.tracking shows. A server that cannot be reached
        or refuses the credentials stops the run before training: TrainingError (exit 1, the Job retries)
        naming the field; the runs opened so far end FAILED."""
        for field, start in (("mlflow", self._start_mlflow), ("wandb", self._start_wandb)):
            if getattr(self.tracking, field) is None:
                continue
            try:
                start(params, tags)
            except Exception as e:  # noqa: BLE001 - any client error: reported with the field it concerns
                self.close("FAILED")
                raise TrainerError(TRAINING_ERROR, f"spec.tracking.{field}: cannot open the run: "
                                   f"{type(e).__name__}: {shorten(str(e), 600)}") from None
        return self.info

    def _start_mlflow(self, params: dict[str, str], tags: dict[str, str]) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        m = self.tracking.mlflow
        assert m is not None
        # transformers' MLflowCallback reads these (and finds the run below already open)
        os.environ["MLFLOW_TRACKING_URI"] = m.tracking_uri
        os.environ["MLFLOW_EXPERIMENT_NAME"] = m.experiment
        mlflow.set_tracking_uri(m.tracking_uri)
        experiment = mlflow.set_experiment(m.experiment)
        client = MlflowClient(m.tracking_uri)
        found = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.key}'",
            max_results=1, order_by=["attributes.start_time DESC"],
        )
        previous = found[0] if found and found[0].info.status != "FINISHED" else None
        if previous is not None:
            run = mlflow.start_run(run_id=previous.info.run_id)
            print(f"tuneop: continuing MLflow run {previous.info.run_id}", file=sys.stderr)
        else:
            run = mlflow.start_run(run_name=self.run_name, tags={RUN_KEY_TAG: self.key, **tags})
            mlflow.log_params(params)
        self.mlflow = mlflow
        self.info["mlflow"] = {
            "runId": run.info.run_id,
            "experimentId": experiment.experiment_id,
            "url": mlflow_run_url(m.tracking_uri, experiment.experiment_id, run.info.run_id),
        }

    def _start_wandb(self, params: dict[str, str], tags: dict[str, str]) -> None:
        import wandb

        w = self.tracking.wandb
        assert w is not None
        directory = os.path.join(self.output, WANDB_SUBDIR)
        os.makedirs(directory, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", directory)
        os.environ["WANDB_PROJECT"] = w.project
        run = wandb.init(
            project=w.project, entity=w.entity, name=w.run_name or self.run_name, id=self.key,
            resume="allow", mode=w.mode.value, dir=directory,
            config={**params, **{k: v for k, v in tags.items()}},
        )
        self.wandb_run = run
        info: dict[str, Any] = {"runId": run.id, "mode": w.mode.value}
        url = getattr(run, "url", None) if w.mode.value == "online" else None
        if url:
            info["url"] = url
        self.info["wandb"] = info

    # ------------------------------------------------------------------ end
    def finish(self, adapter: dict[str, Any], metrics: dict[str, Any], evaluation: Optional[dict[str, Any]],
               fingerprint: str, manifest_path: Optional[str]) -> None:
        """Log the evaluation, the adapter's sha256 (and manifest) and close the runs as finished.
        A tracking server failing now costs the tracking, not the adapter: a warning on stderr."""
        numbers = final_metrics(metrics, evaluation)
        tags = final_tags(adapter, fingerprint)
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics(numbers)
                self.mlflow.set_tags(tags)
                if manifest_path and os.path.isfile(manifest_path):
                    self.mlflow.log_artifact(manifest_path, artifact_path="adapter")
                self.mlflow.end_run("FINISHED")
            except Exception as e:  # noqa: BLE001
                print(f"tuneop: MLflow: could not log the results: {shorten(str(e), 300)}", file=sys.stderr)
            self.mlflow = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update({**numbers, **tags})
                self.wandb_run.finish(exit_code=0)
            except Exception as e:  # noqa: BLE001
                print(f"tuneop: W&B: could not log the results: {shorten(str(e), 300)}", file=sys.stderr)
            self.wandb_run = None

    def close(self, status: str) -> None:
        """End the runs without results: KILLED (interrupted, continued by the next pod) or FAILED."""
        if self.mlflow is not None:
            try:
                self.mlflow.end_run(status)
            except Exception as e:  # noqa: BLE001
                print(f"tuneop: MLflow: could not end the run: {shorten(str(e), 300)}", file=sys.stderr)
            self.mlflow = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=0 if status == "KILLED" else 1)
            except Exception as e:  # noqa: BLE001
                print(f"tuneop: W&B: could not end the run: {shorten(str(e), 300)}", file=sys.stderr)
            self.wandb_run = None
