"""adapterdeployment/builders.py: AdapterDeployment dict in, Deployment/Service/HPA out."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tuneop.adapterdeployment import builders as b
from tuneop.cli import main

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = kubernetes_validate.latest_version()
SHA = "c" * 64


def ad(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": "Qwen/Qwen3-8B",
        "adapters": [
            {"name": "news", "source": {"pvc": {"claimName": "adapters", "path": "news/adapter"}}},
            {"name": "support", "fineTuneJobRef": {"name": "support"}},
        ],
        "replicas": 2,
    }
    base.update(spec)
    return {
        "apiVersion": "tuneop.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "qwen", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": base,
    }


FTJS = {"support": {"spec": {"output": {"pvc": {"claimName": "trained", "path": "support"}}},
                    "status": {"phase": "Running"}}}


def container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def template_hash(dep: dict[str, Any]) -> str:
    return dep["spec"]["template"]["metadata"]["annotations"][b.TEMPLATE_HASH_ANNOTATION]


def validate(*objs: dict[str, Any]) -> None:
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_deployment_runs_upstream_vllm_with_lora_and_no_adapter_in_args() -> None:
    dep = b.build_deployment(ad(), finetunejobs=FTJS)
    validate(dep)
    c = container(dep)
    assert dep["metadata"]["name"] == "qwen-vllm"
    assert c["image"] == "vllm/vllm-openai:v0.32.0"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = c["args"]
    assert args[args.index("--model") + 1] == "Qwen/Qwen3-8B"
    assert "--enable-lora" in args
    # spec.vllm leaves them unset and the builder is given no adapter rank: servingdefaults' defaults
    assert (args[args.index("--max-lora-rank") + 1], args[args.index("--max-loras") + 1]) == ("16", "32")
    assert "--lora-modules" not in args
    assert "news" not in json.dumps(args) and "support" not in json.dumps(args)
    assert env(c)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"]["matchLabels"] == {
        "tuneop.dev/adapterdeployment": "qwen", "app.kubernetes.io/component": "vllm"}
    labels = dep["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "tuneop" and labels["tuneop.dev/adapterdeployment"] == "qwen"
    ref = dep["metadata"]["ownerReferences"][0]
    assert ref["kind"] == "AdapterDeployment" and ref["controller"] and ref["uid"] == "uid-1"


def test_mounts_probes_metrics_gpus_security() -> None:
    dep = b.build_deployment(ad(resources={"memory": "48Gi"}, vllm={"tensorParallelSize": 2}), finetunejobs=FTJS)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # adapter claims (source.pvc + the FineTuneJob's output PVC), read-only
    assert mounts["/mnt/pvc/adapters"]["readOnly"] and mounts["/mnt/pvc/trained"]["readOnly"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"adapters": True, "trained": True}
    assert "/dev/shm" in mounts
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert ann["prometheus.io/port"] == "8000"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2  # default: tensorParallelSize
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "initContainers" not in pod
    assert b.build_deployment(ad(resources={"gpus": 0}))["spec"]["template"]["spec"]["containers"][0].get(
        "resources", {}).get("limits", {}).get("nvidia.com/gpu") is None


def test_secrets_only_as_secret_key_refs() -> None:
    dep = b.build_deployment(ad(hfTokenSecretRef={"name": "hf", "key": "token"},
                                auth={"apiKeySecretRef": {"name": "vllm", "key": "api-key"}}))
    validate(dep)
    e = env(container(dep))
    assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert e["VLLM_API_KEY"] == {"secretKeyRef": {"name": "vllm", "key": "api-key"}}


def test_model_volume_is_mounted_and_used_as_model_path() -> None:
    dep = b.build_deployment(ad(baseModel="qwen3-8b", modelVolume={"claimName": "models", "path": "hf"}, adapters=[]))
    args = container(dep)["args"]
    assert args[args.index("--model") + 1] == "/mnt/pvc/models/hf/qwen3-8b"
    assert "/mnt/pvc/models" in {m["mountPath"] for m in container(dep)["volumeMounts"]}


def test_url_adapters_are_fetched_by_init_containers() -> None:
    spec = ad(adapters=[{"name": "web", "source": {"url": "https://example.com/web.tar.gz", "sha256": SHA}}])
    dep = b.build_deployment(spec, trainer_image="trainer:1")
    validate(dep)
    pod = dep["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["image"] == "trainer:1"
    assert init["command"] == ["python", "-m", "tuneop.serving.fetch", "--url", "https://example.com/web.tar.gz",
                               "--dest", "/adapters/web", "--sha256", SHA]
    assert init["securityContext"]["runAsNonRoot"] is True
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in container(dep)["volumeMounts"]
    assert dep["spec"]["template"]["metadata"]["annotations"][b.URL_ADAPTERS_ANNOTATION] == "web"


def test_template_hash_ignores_adapters_of_mounted_claims_but_not_restart_settings() -> None:
    base = b.build_deployment(ad(), finetunejobs=FTJS)
    more = ad()
    more["spec"]["adapters"].append({"name": "legal", "source": {"pvc": {"claimName": "adapters", "path": "legal"}}})
    fewer = ad(adapters=[ad()["spec"]["adapters"][1], {"name": "x", "source": {"pvc": {"claimName": "adapters"}}}])
    reordered = ad(adapters=list(reversed(ad()["spec"]["adapters"])))
    succeeded = copy.deepcopy(FTJS)
    succeeded["support"]["status"] = {"phase": "Succeeded", "adapter": {"sha256": SHA}}
    h = template_hash(base)
    for same in (b.build_deployment(more, finetunejobs=FTJS), b.build_deployment(fewer, finetunejobs=FTJS),
                 b.build_deployment(reordered, finetunejobs=FTJS), b.build_deployment(ad(), finetunejobs=succeeded)):
        assert template_hash(same) == h
        assert same["spec"]["template"] == base["spec"]["template"]
    assert b.build_deployment(ad(replicas=5), finetunejobs=FTJS)["spec"]["template"] == base["spec"]["template"]
    rolls = [
        ad(vllm={"maxLoras": 16}),
        ad(baseModel="Qwen/Qwen3-14B"),
        ad(adapters=[{"name": "news", "source": {"pvc": {"claimName": "other"}}}]),
        ad(adapters=[{"name": "web", "source": {"url": "https://example.com/a.tar.gz"}}]),
        ad(resources={"gpus": 2}),
    ]
    for r in rolls:
        assert template_hash(b.build_deployment(r, finetunejobs=FTJS)) != h
    # a FineTuneJob that appears later adds its claim: that does roll (the pods must mount it)
    assert template_hash(b.build_deployment(ad(), finetunejobs={})) != h


def test_service_and_hpa() -> None:
    svc = b.build_service(ad(service={"port": 9000, "type": "LoadBalancer"}))
    validate(svc)
    assert svc["metadata"]["name"] == "qwen-vllm" and svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == b.selector_labels("qwen")
    assert b.build_hpa(ad()) is None
    spec = ad(autoscaling={"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetWaitingRequests": 2.5})
    hpa = b.build_hpa(spec)
    validate(hpa)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "qwen-vllm"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    m = hpa["spec"]["metrics"][0]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert m["pods"]["target"] == {"type": "AverageValue", "averageValue": "2500m"}
    assert "replicas" not in b.build_deployment(spec)["spec"]  # the HPA owns it


def test_example_renders_and_validates_strictly(capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load((ROOT / "examples/adapterdeployment.yaml").read_text())
    body = {**doc, "metadata": {"uid": "u-1", "generation": 1, **doc["metadata"]}}
    validate(*b.build_all(body, finetunejobs=FTJS))
    assert main(["render", str(ROOT / "examples/adapterdeployment.yaml"), "--namespace", "team-a"]) == 0
    out = capsys.readouterr().out
    assert "support-tone: -  [waiting (FineTuneJob support-tone not found)]" in out
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service"]
    validate(*docs)


def test_guard_is_loaded_as_middleware_from_its_configmap_with_the_admin_secret_mounted() -> None:
    from tuneop.adapterdeployment import vllm
    from tuneop.serving import guard

    body = ad()
    dep = b.build_deployment(body, finetunejobs=FTJS)
    c = container(dep)
    i = c["args"].index("--middleware")
    assert c["args"][i + 1] == "tuneop_vllm_guard.AdminGuard"
    e = env(c)
    assert e["PYTHONPATH"] == "/opt/tuneop"
    assert e[guard.TOKEN_FILE_ENV] == "/etc/tuneop/admin/token"
    assert e[guard.ROOTS_ENV] == "/mnt/pvc:/adapters"
    assert e[guard.BASE_MODEL_ENV] == body["spec"]["baseModel"]  # what the guard compares adapters with
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["tuneop-guard"]["configMap"]["name"] == "qwen-vllm-guard"
    assert vols["tuneop-admin"]["secret"] == {"secretName": "qwen-vllm-admin", "optional": True, "defaultMode": 0o440}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["tuneop-guard"] == {"name": "tuneop-guard", "mountPath": "/opt/tuneop", "readOnly": True}
    assert mounts["tuneop-admin"]["mountPath"] == "/etc/tuneop/admin" and mounts["tuneop-admin"]["readOnly"]
    # the admin token is never in the pod template or its environment
    assert "token" not in json.dumps(c["env"]).replace("TOKEN_FILE", "").replace("/token", "")

    cm = b.build_guard_configmap(body)
    assert cm["metadata"]["name"] == "qwen-vllm-guard"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert cm["data"] == {"tuneop_vllm_guard.py": vllm.guard_source()}
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert cm["metadata"]["annotations"][b.GUARD_SHA_ANNOTATION].startswith(ann[b.GUARD_SHA_ANNOTATION])
    validate(dep, cm)


def test_admin_secret_holds_only_the_token_and_is_owned() -> None:
    import base64

    s = b.build_admin_secret(ad(), "tok-123")
    assert s["metadata"]["name"] == "qwen-vllm-admin" and s["type"] == "Opaque"
    assert s["metadata"]["ownerReferences"][0]["kind"] == "AdapterDeployment"
    assert base64.b64decode(s["data"]["token"]) == b"tok-123"
    validate(s)
    # tuneop render never prints a Secret
    assert all(o["kind"] != "Secret" for o in b.build_all(ad(), finetunejobs=FTJS))


def test_a_new_guard_changes_the_template_hash(monkeypatch) -> None:
    from tuneop.adapterdeployment import vllm

    before = template_hash(b.build_deployment(ad(), finetunejobs=FTJS))
    src = vllm.guard_source()
    monkeypatch.setattr(vllm, "guard_source", lambda: src + "\n# v2\n")
    assert template_hash(b.build_deployment(ad(), finetunejobs=FTJS)) != before


def test_vllm_pods_mount_no_service_account_token() -> None:
    """vLLM never calls the Kubernetes API; a token in the pod would only be there to be stolen."""
    dep = b.build_deployment(ad(), finetunejobs=FTJS)
    validate(dep)
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---------------------------------------------------------------------------------- trusted pods

DEP = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "qwen-vllm", "uid": "dep-uid"}}


def rs(name: str = "qwen-vllm-abc", uid: str = "rs-uid", *, owner_uid: str = "dep-uid", pth: str = "abc",
       controller: bool = True, owner_kind: str = "Deployment") -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "uid": uid, "labels": {**b.selector_labels("qwen"), "pod-template-hash": pth},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind, "name": "qwen-vllm",
                                              "uid": owner_uid, "controller": controller}]}}


def pod(name: str, *, owner: Any = ("qwen-vllm-abc", "rs-uid"), pth: Any = "abc", kind: str = "ReplicaSet",
        controller: bool = True) -> dict[str, Any]:
    labels = {**b.labels("qwen")}
    if pth is not None:
        labels["pod-template-hash"] = pth
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": owner[0], "uid": owner[1],
                                    "controller": controller}]
    return {"metadata": meta, "status": {"podIP": "10.0.0.1"}}


def test_only_pods_of_the_deployments_own_replicasets_are_trusted() -> None:
    pods = [
        pod("own"),
        pod("own-old", owner=("qwen-vllm-old", "rs-old"), pth="old"),  # an older ReplicaSet mid-rollout
        pod("bare", owner=None),
        pod("not-controller", controller=False),
        pod("statefulset", kind="StatefulSet", owner=("web", "ss-uid")),
        pod("foreign-rs", owner=("lookalike", "rs-foreign")),
        pod("fake-rs-same-name", owner=("qwen-vllm-abc", "rs-other-uid")),
        pod("wrong-hash", pth="zzz"),
        pod("no-hash", pth=None),
    ]
    replicasets = [
        rs(), rs("qwen-vllm-old", "rs-old", pth="old"),
        rs("lookalike", "rs-foreign", owner_uid="someone-else"),  # another Deployment's
        rs("qwen-vllm-abc", "rs-other-uid", controller=False),    # claims the Deployment, not as controller
    ]
    trusted, refused = b.trusted_pods(pods, replicasets, DEP)
    assert [p["metadata"]["name"] for p in trusted] == ["own", "own-old"]
    assert sorted(refused) == ["bare", "fake-rs-same-name", "foreign-rs", "no-hash", "not-controller",
                               "statefulset", "wrong-hash"]
    assert refused["bare"] == refused["not-controller"] == "it has no controller ownerReference"
    assert refused["statefulset"] == "its controller is StatefulSet web, not a ReplicaSet"
    assert refused["foreign-rs"] == ("its controller ReplicaSet lookalike (uid rs-foreign) is not one of "
                                     "Deployment qwen-vllm's")
    assert "rs-other-uid" in refused["fake-rs-same-name"]
    assert refused["wrong-hash"] == "its pod-template-hash label 'zzz' is not its ReplicaSet qwen-vllm-abc's 'abc'"
    assert "None" in refused["no-hash"]


def test_a_replicaset_without_a_hash_or_of_another_kind_of_owner_trusts_nothing() -> None:
    for bad in (rs(pth=""), rs(owner_kind="StatefulSet"), rs(owner_uid="")):
        trusted, refused = b.trusted_pods([pod("own", pth="")] if bad["metadata"]["labels"][
            "pod-template-hash"] == "" else [pod("own")], [bad], DEP)
        assert trusted == [] and list(refused) == ["own"]


def test_without_the_deployments_uid_no_pod_is_trusted() -> None:
    for dep in (None, {"metadata": {"name": "qwen-vllm"}}):
        trusted, refused = b.trusted_pods([pod("own")], [rs()], dep)
        assert trusted == [] and "no uid" in refused["own"]
