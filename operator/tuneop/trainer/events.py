"""Events: JSON lines on stdout, <output>/progress.json and the termination message."""
from __future__ import annotations

import json
import math
import os
import sys
import threading
from typing import IO, Any, Callable, Optional

from ..files import atomic_file

TERMINATION_ENV = "TUNEOP_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096
MESSAGE_LIMIT = 1500


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, other objects -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        try:
            return clean(value.item())
        except Exception:  # noqa: BLE001
            pass
    return str(value)


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(clean(event), separators=(",", ":"), allow_nan=False)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path, "w", prefix=".tmp-", permissions=0o644) as f:
        f.write(text)


def termination_log_path(environ: Optional[dict[str, str]] = None) -> Optional[str]:
    env = os.environ if environ is None else environ
    path = env.get(TERMINATION_ENV)
    if path:
        return path
    if os.path.exists(DEFAULT_TERMINATION_LOG) and os.access(DEFAULT_TERMINATION_LOG, os.W_OK):
        return DEFAULT_TERMINATION_LOG
    return None


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = " ".join(str(text).split()) if "\n" not in str(text) else str(text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fit_termination(event: dict[str, Any], limit: int = TERMINATION_LIMIT) -> str:
    """Serialise the final event under `limit` bytes, dropping the least important parts first."""
    event = clean(event)
    text = dumps(event)
    if len(text.encode()) <= limit:
        return text
    event = dict(event)
    for key in ("errors", "metrics", "dataset", "evaluation"):
        if key in event and len(dumps(event).encode()) > limit:
            if key == "metrics" and isinstance(event[key], dict):
                keep = ("train_loss", "train_runtime", "steps", "tokens_per_second")
                event[key] = {k: v for k, v in event[key].items() if k in keep}
            else:
                event.pop(key)
    if "message" in event:
        while len(dumps(event).encode()) > limit and len(event["message"]) > 20:
            event["message"] = event["message"][: len(event["message"]) // 2] + "..."
    return dumps(event)


class Emitter:
    """Writes events. Only the main process (rank 0) emits; other ranks stay silent."""

    def __init__(
        self,
        stream: Optional[IO[str]] = None,
        output_dir: Optional[str] = None,
        enabled: bool = True,
        environ: Optional[dict[str, str]] = None,
        echo: Optional[Callable[[dict[str, Any]], None]] = None,
    ):
        """echo: also shown to a person (progress.LinePrinter on stderr when it is no terminal)."""
        self.stream = stream if stream is not None else sys.stdout
        self.echo = echo
        self.output_dir = output_dir
        self.enabled = enabled
        self.environ = environ
        self._lock = threading.Lock()
        self.last_progress: Optional[dict[str, Any]] = None

    def emit(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = dumps(event)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()
        if event.get("event") == "progress":
            self.last_progress = event
            self.write_progress(event)
        if self.echo is not None:
            try:
                self.echo(event)
            except (OSError, ValueError):  # stderr closed: the events on stdout still count
                pass

    def write_progress(self, event: dict[str, Any]) -> None:
        if not self.output_dir:
            return
        try:
            atomic_write_text(os.path.join(self.output_dir, "progress.json"), dumps(event) + "\n")
        except OSError as e:
            print(f"tuneop: cannot write progress.json: {e}", file=sys.stderr)

    def terminate(self, event: dict[str, Any]) -> None:
        """Print the final event and write it as the container's termination message."""
        if not self.enabled:
            return
        self.emit(event)
        self.write_termination(event)

    def write_termination(self, event: dict[str, Any]) -> None:
        """Only the termination message (the watchdog's last word: it cannot wait for the stdout lock)."""
        if not self.enabled:
            return
        path = termination_log_path(self.environ)
        if not path:
            return
        try:
            with open(path, "w") as f:
                f.write(fit_termination(event))
        except OSError as e:
            print(f"tuneop: cannot write termination message to {path}: {e}", file=sys.stderr)
