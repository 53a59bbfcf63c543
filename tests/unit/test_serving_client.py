"""serving/client.py: both clients against a small fake vLLM HTTP server that answers like vLLM 0.32
does (status codes and bodies copied from a real CPU server; the real one is in
tests/process/test_vllm_serving.py), and its pure request building and reply parsing."""
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

from tuneop.serving import guard
from tuneop.serving.client import (
    ADMIN_HEADER,
    GUARD_ERROR_TYPE,
    LOAD_ROUTE,
    MAX_MESSAGE,
    UNLOAD_ROUTE,
    AdapterConflict,
    AdapterLoadFailed,
    AdapterNotFound,
    AdminRefused,
    AsyncVllmClient,
    ModelNotFound,
    Outcome,
    Reply,
    Request,
    RuntimeLoraDisabled,
    ServedModel,
    VllmClient,
    VllmError,
    VllmUnavailable,
    chat_request,
    check_already_loaded,
    completion_request,
    error_fields,
    error_of,
    load_request,
    lora_info_of,
    metrics_request,
    models_request,
    parse_chat,
    parse_completion,
    parse_load,
    parse_metrics,
    parse_models,
    parse_unload,
    request_headers,
    unload_request,
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
    req = Request("GET", "/nothing")
    e = error_of(req, VllmClient(fake.url)._send(req))  # not a LoRA route: not RuntimeLoraDisabled
    assert type(e) is VllmError and e.status == 404 and e.message == "Not Found"


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



@pytest.mark.asyncio
async def test_async_client_reads_answers_as_the_sync_one(fake) -> None:
    """Both surfaces run the same operations: the same outcomes and the same exception types."""
    s, a = VllmClient(fake.url), AsyncVllmClient(fake.url)
    assert (await a.load_adapter("a", "/adapters/a")).outcome is Outcome.LOADED
    assert s.load_adapter("a", "/adapters/a").outcome is Outcome.ALREADY_LOADED
    assert (await a.load_adapter("a", "/adapters/a")).outcome is Outcome.ALREADY_LOADED
    with pytest.raises(AdapterConflict, match="already loaded from '/adapters/a', not '/adapters/a2'"):
        await a.load_adapter("a", "/adapters/a2")
    # check_conflict=False (the operator): "already loaded" is success whatever the path, one request only
    n = len(fake.requests)
    assert (await a.load_adapter("a", "/adapters/a2", check_conflict=False)).outcome is Outcome.ALREADY_LOADED
    assert s.load_adapter("a", "/adapters/a2", check_conflict=False).outcome is Outcome.ALREADY_LOADED
    assert len(fake.requests) == n + 2
    with pytest.raises(AdapterNotFound):
        await a.load_adapter("x", "/adapters/missing")
    with pytest.raises(ModelNotFound):
        await a.complete("nope", "x")
    assert await a.base_models() == s.base_models() == [BASE]
    await a.complete("a", "x")
    assert await a.lora_info() == s.lora_info() == {"running": ["a"], "waiting": [], "max_lora": 2}
    fake.runtime_lora = False
    with pytest.raises(RuntimeLoraDisabled):
        await a.unload_adapter("a")
    with pytest.raises(VllmUnavailable) as e:
        await AsyncVllmClient(f"http://127.0.0.1:{free_port()}", timeout=2).models()
    assert e.value.status == 0


def test_admin_token_is_sent_and_never_shown(fake) -> None:
    c = VllmClient(fake.url, admin_token="t0ken")
    c.unload_adapter("a")
    headers = {k.lower(): v for k, v in fake.requests[-1][2].items()}
    assert headers[guard.HEADER] == "t0ken" and headers["content-type"] == "application/json"
    assert "t0ken" not in repr(c) and "t0ken" not in repr(AsyncVllmClient(fake.url, admin_token="t0ken"))


# ---------------------------------------------------------------------------------- pure parsing
# status code + body in, outcome (or exception) out: every kind of answer vLLM 0.32 (and older)
# and tuneop's guard give.


def reply(status: int, body: Any = "") -> Reply:
    return Reply(status, body if isinstance(body, str) else json.dumps(body))


def vllm_error(code: int, message: str, typ: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": typ, "param": None, "code": code}}


def old_error(message: str, typ: str = "BadRequestError") -> dict[str, Any]:  # vLLM <= 0.10
    return {"object": "error", "message": message, "type": typ, "code": 400}


def refusal(code: int, reason: str, message: str) -> dict[str, Any]:  # tuneop's guard
    return {"error": {"message": message, "type": GUARD_ERROR_TYPE, "reason": reason, "code": code}}


ALREADY = "The lora adapter 'a' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
NO_ADAPTER = "Loading lora a failed: No adapter found for /adapters/a"
RANK = ("Call to add_lora method failed: Worker failed with error 'LoRA rank 64 is greater than max_lora_rank 8.', "
        "please check the stack trace above for the root cause")


@pytest.mark.parametrize("status, body, expected", [
    (200, "Success: LoRA adapter 'a' added successfully.", Outcome.LOADED),
    (400, vllm_error(400, ALREADY, "InvalidUserInput"), Outcome.ALREADY_LOADED),
    (400, old_error(ALREADY), Outcome.ALREADY_LOADED),
    (409, {"message": "adapter a already exists"}, Outcome.ALREADY_LOADED),
    (409, refusal(409, "base_model_mismatch", "adapter trained on 'x' (already exists elsewhere), served 'y'"),
     AdminRefused),
    (401, refusal(401, "missing_credential", "only the tuneop operator may load or unload adapters"), AdminRefused),
    (400, refusal(400, "outside_root", "lora_path '/etc' is outside the adapter roots /mnt/pvc"), AdminRefused),
    (404, refusal(404, "not_found", "lora_path '/mnt/pvc/x' is not a directory in this pod"), AdminRefused),
    (400, vllm_error(400, "The lora adapter 'tiny' conflicts with a served base model.", "InvalidUserInput"),
     AdapterConflict),
    (404, vllm_error(404, NO_ADAPTER, "NotFoundError"), AdapterNotFound),
    (400, old_error(NO_ADAPTER), AdapterNotFound),
    (500, vllm_error(500, RANK, "InternalServerError"), AdapterLoadFailed),
    (404, {"detail": "Not Found"}, RuntimeLoraDisabled),
    (500, {"message": "boom"}, VllmError),
    (401, {"error": "Unauthorized"}, VllmError),
    (502, "<html><body>Bad Gateway</body></html>", VllmError),
])
def test_parse_load(status: int, body: Any, expected: Any) -> None:
    req = load_request("a", "/adapters/a")
    if isinstance(expected, Outcome):
        change = parse_load(req, reply(status, body))
        assert change.outcome is expected and change.name == "a"
        assert change.changed == (expected is Outcome.LOADED)
        return
    with pytest.raises(expected) as e:
        parse_load(req, reply(status, body))
    assert type(e.value) is expected and e.value.status == status
    assert e.value.method == "POST" and e.value.path == LOAD_ROUTE
    if expected is AdminRefused:
        assert e.value.reason == body["error"]["reason"] and e.value.message == body["error"]["message"]
    else:
        assert e.value.reason is None


def test_parse_load_messages() -> None:
    req = load_request("a", "/adapters/a")
    assert parse_load(req, reply(400, vllm_error(400, ALREADY, "InvalidUserInput"))).message == ALREADY
    with pytest.raises(VllmError) as e:
        parse_load(req, reply(500, {"message": "boom"}))
    assert e.value.message == "boom" and str(e.value) == "vLLM POST /v1/load_lora_adapter -> 500: boom"
    with pytest.raises(AdapterLoadFailed) as e:
        parse_load(req, reply(500, vllm_error(500, RANK, "InternalServerError")))
    assert e.value.message == RANK and e.value.type == "InternalServerError"
    with pytest.raises(RuntimeLoraDisabled, match="runtime LoRA updating is disabled.*VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        parse_load(req, reply(404, {"detail": "Not Found"}))
    with pytest.raises(VllmError) as e:
        parse_load(req, reply(502, "x" * 5000))
    assert len(e.value.message) == MAX_MESSAGE
    replaced = parse_load(load_request("a", "/adapters/a", replace=True), reply(200, "Success"))
    assert replaced.outcome is Outcome.RELOADED and replaced.message == "Success"


def test_check_already_loaded() -> None:
    req, rep = load_request("a", "/adapters/a"), reply(400, vllm_error(400, ALREADY, "InvalidUserInput"))
    change = parse_load(req, rep)
    for current in (None, ServedModel("a", root="/adapters/a", parent=BASE), ServedModel("a", parent=BASE)):
        assert check_already_loaded(req, rep, change, current) is change
    with pytest.raises(AdapterConflict, match="already loaded from '/adapters/b', not '/adapters/a'") as e:
        check_already_loaded(req, rep, change, ServedModel("a", root="/adapters/b", parent=BASE))
    assert e.value.status == 400 and e.value.type == "InvalidUserInput"
    inplace = load_request("a", "/adapters/a", replace=True)
    assert check_already_loaded(inplace, rep, change, ServedModel("a", root="/adapters/b", parent=BASE)) is change


@pytest.mark.parametrize("status, body, expected", [
    (200, "Success: LoRA adapter 'a' removed successfully.", Outcome.UNLOADED),
    (404, vllm_error(404, "The lora adapter 'a' cannot be found.", "NotFoundError"), Outcome.NOT_LOADED),
    (400, old_error("The lora adapter 'a' cannot be found."), Outcome.NOT_LOADED),
    (404, {"message": "adapter a does not exist"}, Outcome.NOT_LOADED),
    (404, {"detail": "Not Found"}, RuntimeLoraDisabled),
    (403, refusal(403, "bad_credential", "only the tuneop operator may load or unload adapters"), AdminRefused),
    (400, refusal(400, "bad_name", "lora_name 'not found' is not a valid adapter name"), AdminRefused),
    (500, {"message": "boom"}, VllmError),
])
def test_parse_unload(status: int, body: Any, expected: Any) -> None:
    req = unload_request("a")
    if isinstance(expected, Outcome):
        assert parse_unload(req, reply(status, body)).outcome is expected
        return
    with pytest.raises(expected) as e:
        parse_unload(req, reply(status, body))
    assert type(e.value) is expected and e.value.status == status and e.value.path == UNLOAD_ROUTE


def test_parse_models() -> None:
    req = models_request()
    doc = {"object": "list", "data": [
        {"id": BASE, "object": "model", "root": "/models/tiny", "parent": None, "max_model_len": 128},
        {"id": "a", "object": "model", "root": "/adapters/a", "parent": BASE, "max_model_len": None},
        {"object": "model"},  # no id: skipped
    ]}
    models = parse_models(req, reply(200, doc))
    assert [(m.id, m.root, m.is_adapter) for m in models] == [(BASE, "/models/tiny", False), ("a", "/adapters/a", True)]
    assert models[0].max_model_len == 128 and models[1].raw == doc["data"][1]
    assert parse_models(req, reply(200, {"object": "list", "data": []})) == []
    with pytest.raises(VllmError, match="not JSON"):
        parse_models(req, reply(200, "<html>"))
    with pytest.raises(VllmError, match="not a model list"):
        parse_models(req, reply(200, {"data": "x"}))
    with pytest.raises(VllmError) as e:  # vLLM's own API key check
        parse_models(req, reply(401, {"error": "Unauthorized"}))
    assert type(e.value) is VllmError and e.value.status == 401 and e.value.message == "Unauthorized"
    with pytest.raises(AdminRefused) as e:  # a wrong admin token on an allowed route
        parse_models(req, reply(403, refusal(403, "bad_credential", "wrong admin token")))
    assert e.value.reason == "bad_credential"


def test_parse_completion() -> None:
    req = completion_request(BASE, "p", max_tokens=3)
    assert req.body == {"model": BASE, "prompt": "p", "max_tokens": 3, "temperature": 0.0}
    out = parse_completion(req, reply(200, {"model": BASE, "choices": [{"text": " x", "finish_reason": "length"}],
                                            "usage": {"prompt_tokens": 4, "completion_tokens": 3}}))
    assert (out.model, out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens) == (BASE, " x", "length", 4, 3)
    with pytest.raises(ModelNotFound) as e:
        parse_completion(req, reply(404, vllm_error(404, "The model `a` does not exist.", "NotFoundError")))
    assert e.value.status == 404 and e.value.message == "The model `a` does not exist."
    with pytest.raises(AdminRefused):  # a route the guard does not serve
        parse_completion(req, reply(403, refusal(403, "blocked_route", "not served through tuneop's guard")))
    chat = chat_request("a", [{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.path == "/v1/chat/completions" and chat.body is not None and chat.body["messages"][0]["content"] == "hi"
    doc = {"choices": [{"message": {"role": "assistant", "content": "yo"}}]}
    assert parse_chat(chat, reply(200, doc)) == doc
    with pytest.raises(ModelNotFound):
        parse_chat(chat, reply(404, vllm_error(404, "The model `a` does not exist.", "NotFoundError")))


def test_parse_metrics_and_lora_info() -> None:
    text = ("# TYPE vllm:lora_requests_info gauge\n"
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 2.0\n'
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters="c"} 1.0\n')
    metrics = parse_metrics(metrics_request(), Reply(200, text))
    assert lora_info_of(metrics) == {"running": ["a", "b"], "waiting": [], "max_lora": 2}
    assert lora_info_of({}) is None
    with pytest.raises(VllmError):
        parse_metrics(metrics_request(), Reply(500, "x"))


@pytest.mark.parametrize("body, expected", [
    (vllm_error(404, "m", "NotFoundError"), ("m", "NotFoundError", None)),
    (old_error("m"), ("m", "BadRequestError", None)),
    ({"detail": "Not Found"}, ("Not Found", None, None)),
    ({"error": "Unauthorized"}, ("Unauthorized", None, None)),
    (refusal(409, "base_model_mismatch", "m"), ("m", GUARD_ERROR_TYPE, "base_model_mismatch")),
    ("plain text", ("plain text", None, None)),
    ("", ("HTTP 500", None, None)),
    ([1, 2], ("[1, 2]", None, None)),
])
def test_error_fields(body: Any, expected: tuple[Any, ...]) -> None:
    assert error_fields(500, reply(500, body).text) == expected


def test_requests_name_the_guards_fields() -> None:
    assert load_request("a", "/p").body == {"lora_name": "a", "lora_path": "/p"}
    full = load_request("a", "/p", replace=True, sha256="0" * 64, allow_base_model_mismatch=True, allow_unverified=True)
    assert full.body == {"lora_name": "a", "lora_path": "/p", "load_inplace": True, guard.SHA_FIELD: "0" * 64,
                         guard.ALLOW_BASE_FIELD: True, guard.ALLOW_UNVERIFIED_FIELD: True}
    assert set(full.body) <= guard._FIELDS["load"] and set(unload_request("a").body or {}) <= guard._FIELDS["unload"]
    assert {LOAD_ROUTE, UNLOAD_ROUTE} == set(guard.ADMIN_PATHS)
    assert ADMIN_HEADER.lower() == guard.HEADER
    assert request_headers(models_request(), api_key="k", admin_token="t") == {"Authorization": "Bearer k",
                                                                             ADMIN_HEADER: "t"}
    assert request_headers(unload_request("a")) == {"Content-Type": "application/json"}
