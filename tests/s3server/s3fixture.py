"""Start the real S3 API server of tests/s3server/server.py (moto, authentication on) for a test.

`S3Server.start()` runs it with the Python of .venv-s3server (or $TUNEOP_S3_VENV), which
`scripts/setup.sh --serving` makes; the env of the pods (`env`) points tuneop.s3 at it.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).resolve().parent / "server.py"


def server_python() -> Path:
    venv = Path(os.environ.get("TUNEOP_S3_VENV") or ROOT / ".venv-s3server")
    return venv / "bin" / "python"


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    access_key_id: str
    secret_access_key: str

    @classmethod
    def start(cls) -> "S3Server":
        python = server_python()
        if not python.exists():
            raise RuntimeError(f"no {python}: run scripts/setup.sh --serving (it makes the S3 test server's venv)")
        proc = subprocess.Popen([str(python), str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            proc.kill()
            raise RuntimeError("the S3 test server did not start")
        info = json.loads(line)
        return cls(proc, info["endpoint"], info["accessKeyId"], info["secretAccessKey"])

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def env(self, **overrides: str) -> dict[str, str]:
        """What a pod gets from spec.storage.s3 (endpoint, region, the Secret's key pair)."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
                **overrides}
