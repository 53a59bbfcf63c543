"""The operator's side of serving/client.py (AsyncVllmClient, as adapterdeployment/handlers.py calls it)
against a small vLLM-like server; serving/fetch.py against a local HTTP server."""
from __future__ import annotations

import asyncio
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from tuneop.serving import fetch
from tuneop.serving.client import AsyncVllmClient, Outcome, RuntimeLoraDisabled, VllmError, VllmUnavailable

BASE = "base-model"


def vllm_app(state: dict[str, Any]) -> web.Application:
    async def models(_: web.Request) -> web.Response:
        data = [{"id": BASE, "root": BASE, "parent": None}]
        data += [{"id": n, "root": p, "parent": BASE} for n, p in state["loaded"].items()]
        return web.json_response({"object": "list", "data": data})

    async def load(req: web.Request) -> web.Response:
        b = await req.json()
        state["auth"] = req.headers.get("Authorization")
        state["body"] = b
        if state.get("fail"):
            return web.json_response({"message": "boom"}, status=500)
        if b["lora_name"] in state["loaded"]:
            return web.json_response({"message": f"The lora adapter '{b['lora_name']}' has already been loaded."},
                                     status=400)
        state["loaded"][b["lora_name"]] = b["lora_path"]
        return web.Response(text="Success")

    async def unload(req: web.Request) -> web.Response:
        b = await req.json()
        if b["lora_name"] not in state["loaded"]:
            return web.json_response({"message": f"The lora adapter '{b['lora_name']}' cannot be found."},
                                     status=404)
        del state["loaded"][b["lora_name"]]
        return web.Response(text="Success")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
    return app


def test_admin_client_is_idempotent_and_reports_errors() -> None:
    async def scenario() -> None:
        state: dict[str, Any] = {"loaded": {}}
        runner = web.AppRunner(vllm_app(state))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        c = AsyncVllmClient(url)
        try:
            assert await c.loaded_adapters() == {}  # the base model is not an adapter
            assert (await AsyncVllmClient(url, api_key="k").load_adapter("a", "/p/a")).outcome is Outcome.LOADED
            assert state["auth"] == "Bearer k"
            # already loaded: success, with or without asking /v1/models where from
            assert (await c.load_adapter("a", "/p/a", check_conflict=False)).outcome is Outcome.ALREADY_LOADED
            assert (await c.load_adapter("a", "/p/a")).outcome is Outcome.ALREADY_LOADED
            assert {n: m.root for n, m in (await c.loaded_adapters()).items()} == {"a": "/p/a"}
            assert (await c.unload_adapter("a")).outcome is Outcome.UNLOADED
            assert (await c.unload_adapter("a")).outcome is Outcome.NOT_LOADED  # not found: success
            # the adapter's allowUnverified / allowBaseModelMismatch reach the guard only when set
            assert "tuneop_allow_unverified" not in state["body"]
            change = await c.load_adapter("u", "/p/u", allow_unverified=True, allow_base_model_mismatch=True)
            assert change.changed
            assert state["body"]["tuneop_allow_unverified"] is True
            assert state["body"]["tuneop_allow_base_model_mismatch"] is True
            state["fail"] = True
            with pytest.raises(VllmError) as e:
                await c.load_adapter("b", "/p/b")
            assert e.value.status == 500 and e.value.message == "boom" and "boom" in str(e.value)
        finally:
            await runner.cleanup()
        with pytest.raises(VllmUnavailable) as e:
            await AsyncVllmClient(url, timeout=2).loaded_adapters()
        assert e.value.status == 0 and "no answer from" in e.value.message

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------- fetch


def adapter_tar(weights: bytes, *, manifest_sha: str | None = None, prefix: str = "out/adapter/") -> bytes:
    files = {f"{prefix}adapter_config.json": b'{"r": 4}', f"{prefix}adapter_model.safetensors": weights}
    if manifest_sha is not None:
        files[f"{prefix}tuneop-manifest.json"] = json.dumps({"files": {"adapter_model.safetensors": manifest_sha}}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root
    finally:
        srv.shutdown()
        srv.server_close()


def test_fetch_extracts_the_adapter_dir_and_checks_sha256(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    weights = b"weights-bytes-0123456789"
    sha = hashlib.sha256(weights).hexdigest()
    (root / "ok.tar.gz").write_bytes(adapter_tar(weights, manifest_sha=sha))
    dest = tmp_path / "adapters" / "web"
    assert fetch.main(["--url", f"{url}/ok.tar.gz", "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "tuneop-manifest.json"]
    # --sha256 given and matching; a rerun replaces the directory
    assert fetch.main(["--url", f"{url}/ok.tar.gz", "--dest", str(dest), "--sha256", sha]) == 0
    # mismatch against --sha256, and against the manifest: exit 2, nothing left behind
    bad = tmp_path / "adapters" / "bad"
    assert fetch.main(["--url", f"{url}/ok.tar.gz", "--dest", str(bad), "--sha256", "0" * 64]) == 2
    (root / "lying.tar.gz").write_bytes(adapter_tar(weights, manifest_sha="1" * 64))
    assert fetch.main(["--url", f"{url}/lying.tar.gz", "--dest", str(bad)]) == 2
    assert not bad.exists()
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["web"]
    # unsafe archive (path escape) -> 2; HTTP 404 -> 1
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (root / "evil.tar.gz").write_bytes(buf.getvalue())
    assert fetch.main(["--url", f"{url}/evil.tar.gz", "--dest", str(bad)]) == 2
    assert fetch.main(["--url", f"{url}/missing.tar.gz", "--dest", str(bad)]) == 1


def test_unload_on_a_server_without_runtime_lora_is_an_error_not_success() -> None:
    async def scenario() -> None:
        # vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING has no such route: FastAPI's 404 answer.
        async def no_route(_: web.Request) -> web.Response:
            return web.json_response({"detail": "Not Found"}, status=404)

        app = web.Application()
        app.router.add_post("/v1/unload_lora_adapter", no_route)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            with pytest.raises(RuntimeLoraDisabled, match="runtime LoRA updating is disabled"):
                await AsyncVllmClient(f"http://127.0.0.1:{port}").unload_adapter("a")
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_fetch_records_a_manifest_only_when_the_weights_are_pinned(served: tuple[str, Path], tmp_path: Path) -> None:
    """An archive without tuneop-manifest.json: with --sha256 matching, the fetched adapter gets one
    listing every file (the guard then verifies what vLLM loads); without --sha256 it gets none
    (the guard refuses it unless the AdapterDeployment allows the adapter unverified)."""
    from tuneop.serving import guard

    url, root = served
    weights = b"plain-weights"
    sha = hashlib.sha256(weights).hexdigest()
    (root / "plain.tar.gz").write_bytes(adapter_tar(weights))
    pinned, unpinned = tmp_path / "a" / "pinned", tmp_path / "a" / "unpinned"
    assert fetch.main(["--url", f"{url}/plain.tar.gz?token=x", "--dest", str(pinned), "--sha256", sha]) == 0
    manifest = json.loads((pinned / "tuneop-manifest.json").read_text())
    assert manifest["files"] == {"adapter_config.json": hashlib.sha256(b'{"r": 4}').hexdigest(),
                                 "adapter_model.safetensors": sha}
    assert manifest["url"] == f"{url}/plain.tar.gz"  # no query string (it may carry a credential)
    copy = tmp_path / "copy"
    copy.mkdir()
    assert guard.copy_verified(str(pinned), str(copy), [str(tmp_path / "a")], sha)["adapter_model.safetensors"] == sha
    assert fetch.main(["--url", f"{url}/plain.tar.gz", "--dest", str(unpinned)]) == 0
    assert not (unpinned / "tuneop-manifest.json").exists()
