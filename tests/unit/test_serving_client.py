"""serving/client.py against a small fake vLLM HTTP server that answers like vLLM 0.32 does
(status codes and bodies copied from a real CPU server; the real one is in
tests/process/test_vllm_serving.py)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tuneop.serving.client import (
    AdapterConflict,
    AdapterLoadFailed,
    AdapterNotFound,
    AsyncVllmClient,
    ModelNotFound,
    Outcome,
    RuntimeLoraDisabled,
    VllmClient,
    VllmError,
    VllmUnavailable,
)

BASE = "tiny"


class FakeVllm:
    """State + behaviour of a vLLM server with --enable-lora."""

    def __init__(self) -> None:
        self.adapters: dict[str, str] = {}  # name -> path
        self.existing_paths = {"/adapters/a", "/adapters/b", "/adapters/a2"}
        self.runtime_lora = True
        self.old_errors = False  # vLLM <= 0.10: 400 instead of 404, flat error body
        self.healthy = True
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.lora_series: list[tuple[str, str, float]] = []  # (running, waiting, ts)

    def error(self, code: int, message: str, typ: str) -> tuple[int, Any]:
        if self.old_errors:
            return 400, {"object": "error", "message": message, "type": typ, "code": 400}
        return code, {"error": {"message": message, "type": typ, "param": None, "code": code}}

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path == "/health":
            return (200, "") if self.healthy else (503, "")
        if path == "/v1/models" and method == "GET":
            data = [{"id": BASE, "object": "model", "root": "/models/tiny", "parent": None, "max_model_len": 128}]
            data += [{"id": n, "object": "model", "root": p, "parent": BASE, "max_model_len": None}
                     for n, p in self.adapters.items()]
            return 200, {"object": "list", "data": data}
        if path == "/v1/load_lora_adapter" and method == "POST" and self.runtime_lora:
            name, lpath = body.get("lora_name"), body.get("lora_path")
            if name == BASE:
                return self.error(400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput")
            if name in self.adapters and not body.get("load_inplace"):
                return 400, {"error": {"message": f"The lora adapter '{name}' has already been loaded. If you want "
                                       "to load the adapter in place, set 'load_inplace' to True.",
                                       "type": "InvalidUserInput", "param": None, "code": 400}}
            if lpath == "/adapters/rank64":
                return 500, {"error": {"message": "Call to add_lora method failed: Worker failed with error 'LoRA "
                                       "rank 64 is greater than max_lora_rank 8.', please check the stack trace "
                                       "above for the root cause",
                                       "type": "InternalServerError", "param": None, "code": 500}}
            if lpath not in self.existing_paths:
                return self.error(404, f"Loading lora {name} failed: No adapter found for <path>", "NotFoundError")
            self.adapters[name] = lpath
            return 200, f"Success: LoRA adapter '{name}' added successfully."
        if path == "/v1/unload_lora_adapter" and method == "POST" and self.runtime_lora:
            name = body.get("lora_name")
            if name not in self.adapters:
                return self.error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.adapters[name]
            return 200, f"Success: LoRA adapter '{name}' removed successfully."
        if path == "/v1/completions" and method == "POST":
            model = body["model"]
            if model != BASE and model not in self.adapters:
                return 404, {"error": {"message": f"The model `{model}` does not exist. Valid aliases: {BASE}.",
                                       "type": "NotFoundError", "param": "model", "code": 404}}
            self.lora_series.append((model if model != BASE else "", "", time.time()))
            return 200, {"id": "cmpl-1", "object": "text_completion", "model": model,
                         "choices": [{"index": 0, "text": f" out-of-{model}", "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 8, "completion_tokens": body["max_tokens"],
                                   "total_tokens": 8 + body["max_tokens"]}}
        if path == "/metrics":
            lines = ["# HELP vllm:lora_requests_info Running stats on lora requests.",
                     "# TYPE vllm:lora_requests_info gauge"]
            for running, waiting, ts in self.lora_series:
                lines.append(f'vllm:lora_requests_info{{max_lora="2",running_lora_adapters="{running}",'
                             f'waiting_lora_adapters="{waiting}"}} {ts!r}')
            lines += ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
                      "# TYPE vllm:num_requests_running gauge",
                      'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0']
            return 200, "\n".join(lines) + "\n"
        return 404, {"detail": "Not Found"}


@pytest.fixture()
def fake():
    state = FakeVllm()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def _serve(self, method: str) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            body = json.loads(raw) if raw else None
            state.requests.append((method, self.path, dict(self.headers), body))
            code, out = state.handle(method, self.path, body)
            payload = out.encode() if isinstance(out, str) else json.dumps(out).encode()
            ctype = "text/plain" if isinstance(out, str) else "application/json"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_models_and_no_adapters_at_start(fake) -> None:
    c = VllmClient(fake.url)
    c.wait_ready(timeout=5)
    models = c.models()
    assert [m.id for m in models] == [BASE] and not models[0].is_adapter
    assert c.base_models() == [BASE]
    assert c.loaded_adapters() == {}


def test_load_is_idempotent_and_reports_what_happened(fake) -> None:
    c = VllmClient(fake.url)
    first = c.load_adapter("a", "/adapters/a")
    assert first.outcome is Outcome.LOADED and first.changed and "added successfully" in first.message
    again = c.load_adapter("a", "/adapters/a")
    assert again.outcome is Outcome.ALREADY_LOADED and not again.changed
    served = c.loaded_adapters()
    assert list(served) == ["a"] and served["a"].parent == BASE and served["a"].root == "/adapters/a"
    assert fake.requests[0][3] == {"lora_name": "a", "lora_path": "/adapters/a"}  # no load_inplace by default


def test_same_name_other_path_is_a_conflict_unless_replaced(fake) -> None:
    c = VllmClient(fake.url)
    c.load_adapter("a", "/adapters/a")
    with pytest.raises(AdapterConflict, match="already loaded from '/adapters/a', not '/adapters/a2'"):
        c.load_adapter("a", "/adapters/a2")
    assert c.loaded_adapters()["a"].root == "/adapters/a"
    replaced = c.load_adapter("a", "/adapters/a2", replace=True)
    assert replaced.outcome is Outcome.RELOADED
    assert fake.requests[-1][3]["load_inplace"] is True
    assert c.loaded_adapters()["a"].root == "/adapters/a2"


def test_load_errors_are_distinct(fake) -> None:
    c = VllmClient(fake.url)
    with pytest.raises(AdapterNotFound, match="No adapter found") as e:
        c.load_adapter("x", "/adapters/missing")
    assert e.value.status == 404 and e.value.type == "NotFoundError"
    assert "POST /v1/load_lora_adapter -> 404" in str(e.value)
    with pytest.raises(AdapterConflict, match="conflicts with a served base model"):
        c.load_adapter(BASE, "/adapters/a")
    with pytest.raises(AdapterLoadFailed, match="greater than max_lora_rank") as e:
        c.load_adapter("big", "/adapters/rank64")
    assert e.value.status == 500
    assert c.loaded_adapters() == {}


def test_unload_is_idempotent(fake) -> None:
    c = VllmClient(fake.url)
    c.load_adapter("a", "/adapters/a")
    c.load_adapter("b", "/adapters/b")
    gone = c.unload_adapter("a")
    assert gone.outcome is Outcome.UNLOADED and gone.changed
    missing = c.unload_adapter("a")
    assert missing.outcome is Outcome.NOT_LOADED and not missing.changed and "cannot be found" in missing.message
    assert list(c.loaded_adapters()) == ["b"]


def test_older_vllm_error_shapes(fake) -> None:
    fake.old_errors = True
    c = VllmClient(fake.url)
    assert c.unload_adapter("nope").outcome is Outcome.NOT_LOADED
    with pytest.raises(AdapterNotFound):
        c.load_adapter("x", "/adapters/missing")


def test_complete_and_unknown_model(fake) -> None:
    c = VllmClient(fake.url)
    out = c.complete(BASE, "Word: kaso\nLabel:", max_tokens=3)
    assert out.text == f" out-of-{BASE}" and out.completion_tokens == 3 and out.prompt_tokens == 8
    assert fake.requests[-1][3] == {"model": BASE, "prompt": "Word: kaso\nLabel:", "max_tokens": 3, "temperature": 0.0}
    with pytest.raises(ModelNotFound, match="does not exist") as e:
        c.complete("a", "x")
    assert e.value.status == 404
    c.load_adapter("a", "/adapters/a")
    assert c.complete("a", "x", max_tokens=1).model == "a"


def test_metrics_and_lora_info(fake) -> None:
    c = VllmClient(fake.url)
    assert c.lora_info() is None
    c.load_adapter("a", "/adapters/a")
    c.complete("a", "x")
    c.complete(BASE, "x")
    m = c.metrics()
    assert "vllm:lora_requests_info" in m and len(m["vllm:lora_requests_info"]) == 2
    assert m["vllm:num_requests_running"][0].labels == {"engine": "0", "model_name": "tiny"}
    assert c.lora_info() == {"running": [], "waiting": [], "max_lora": 2}  # the newest series


def test_runtime_lora_disabled(fake) -> None:
    fake.runtime_lora = False
    c = VllmClient(fake.url)
    with pytest.raises(RuntimeLoraDisabled, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        c.load_adapter("a", "/adapters/a")
    with pytest.raises(RuntimeLoraDisabled):
        c.unload_adapter("a")


def test_api_key_is_sent_and_never_shown(fake) -> None:
    c = VllmClient(fake.url, api_key="sekret")
    c.models()
    assert fake.requests[-1][2]["Authorization"] == "Bearer sekret"
    assert "sekret" not in repr(c) and "sekret" not in repr(AsyncVllmClient(fake.url, api_key="sekret"))


def test_unavailable_and_wait_ready() -> None:
    c = VllmClient(f"http://127.0.0.1:{free_port()}", timeout=2)
    assert c.health() is False
    with pytest.raises(VllmUnavailable, match="no answer from"):
        c.models()
    t0 = time.monotonic()
    with pytest.raises(VllmUnavailable, match="not ready after"):
        c.wait_ready(timeout=0.6, interval=0.1)
    assert time.monotonic() - t0 < 5
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(VllmUnavailable, match="exited with code 3"):
        c.wait_ready(timeout=30, proc=proc)


def test_unhealthy_server_is_not_ready(fake) -> None:
    fake.healthy = False
    c = VllmClient(fake.url)
    assert c.health() is False
    with pytest.raises(VllmUnavailable, match="/health is not 200"):
        c.wait_ready(timeout=0.3, interval=0.1)


def test_other_errors_keep_vllm_message(fake) -> None:
    c = VllmClient(fake.url)
    with pytest.raises(VllmError) as e:
        c._json("GET", "/nothing")
    assert e.value.status == 404 and e.value.message == "Not Found"


@pytest.mark.asyncio
async def test_async_client(fake) -> None:
    c = AsyncVllmClient(fake.url)
    await c.wait_ready(timeout=5)
    assert (await c.load_adapter("a", "/adapters/a")).outcome is Outcome.LOADED
    assert list(await c.loaded_adapters()) == ["a"]
    assert (await c.complete("a", "x", max_tokens=2)).completion_tokens == 2
    assert (await c.unload_adapter("a")).outcome is Outcome.UNLOADED
    assert (await c.unload_adapter("a")).outcome is Outcome.NOT_LOADED
    assert "vllm:num_requests_running" in await c.metrics()
