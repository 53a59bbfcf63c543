"""Operator speed: tuneop's FineTuneJob reconcile vs two floors, measured side by side in one run.

    .venv/bin/python benchmarks/operator_speed.py [--n 200] [--rss-objects 1000] [--json OUT]

Three operators, each in its own process, against the same kind of API server:

- ``tuneop``: the real operator (``tuneop.handlers.run_operator``: every FineTuneJob and
  AdapterDeployment handler, tuneop's kopf settings, its login, its aiohttp client), FineTuneJobs
  with ``backend: kubernetes`` and the dataset in a ConfigMap: the operator checks the dataset,
  creates ``<name>-config`` and ``<name>-train`` and writes the status (phase Running, two Events).
- ``kopf``: a minimal kopf 1.45 ``@kopf.on.create`` handler creating one Job per object with the
  ``kubernetes`` client (kopf's default settings).
- ``watch``: a bare ``kubernetes``-client watch loop creating one Job per ADDED object.

The floors create the very Job tuneop creates for the object (built by tuneop's builder in the
measuring process, handed to them as JSON): the same work at the API server.

Measured for each: (a) create -> Job exists, p50/p95 over ``--seq`` sequential creates (each
one after the previous has settled; ``--rounds R``: R rounds per operator, the operators
alternating, percentiles over all of them); (b) wall time from the first of ``--n`` FineTuneJobs
created at once to the last Job (tuneop: also to the last status phase Running), with the
number of Jobs created twice (must be 0); (c) the operator's RSS once ``--rss-objects``
FineTuneJobs are reconciled. Ratios tuneop/floor are what matter: kmock is not kube-apiserver.

API server: kmock (``tests/integration/kmockenv.py``'s emulator, in a thread of this process;
every timestamp is taken inside it, when the object is stored). kmock looks objects up with a
linear scan; the benchmark indexes lookups by name so that 1,000 objects measure the operators,
not kmock. With ``--cluster`` (``KUBECONFIG`` must point at a cluster where tuneop's CRDs are
installed) the same runs go against that cluster in a fresh namespace whose ResourceQuota allows
no pods; times then come from a watch in this process (less precise, includes watch latency).
On a cluster the two watches (Jobs, FineTuneJobs) are independent: a run waits for both.
"Settled" on a cluster: no watch event (FineTuneJobs, Jobs, Events) for 50 ms.

tuneop on other Kubernetes client libraries (issue #17): operators ``tuneop-lightkube`` and
``tuneop-kubernetes_asyncio`` are the same real operator with ``tuneop.kube.KubeClient`` replaced
by the library-backed drop-ins of ``benchmarks/kube_clients.py`` (``pip install lightkube
kubernetes_asyncio`` first; not tuneop dependencies), e.g. ``--operators
tuneop,tuneop-lightkube,tuneop-kubernetes_asyncio,kopf``; the table adds their ratios to ``tuneop``.
``tuneop-kubernetes_asyncio-noenv``: kubernetes_asyncio with its aiohttp session's trust_env turned off.

Results: a table on stdout and JSON in ``benchmarks/results/operator_speed-<time>.json``.
``BENCH_TRACE=FILE``: the tuneop and kopf processes write each HTTP request they make through aiohttp
(start, end, method, URL), tuneop each reconcile's start and kopf each handler's Job create, to FILE:
where a reconcile's time goes. tuneop also writes each step (KOPF-EVENT: kopf's processing of a watch
event; ON-EVENT, AD-ON-EVENT, ON-CHANGE: its handlers; OBSERVE, DECIDE, APPLY) and, on a cluster, this
process each create call (CREATE) and each Job its watch sees (JOB-SEEN); times in ms since the epoch.
Internal: ``operator_speed.py _child {tuneop|kopf|watch}`` is one operator process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NS = "team-a"
GROUP, VERSION, PLURAL = "tuneop.dev", "v1alpha1", "finetunejobs"
FTJ_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}"
DATA_CM = "bench-data"
OUT_PVC = "adapters"
ROWS = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}"}]})
    for i in range(20)
)
OPERATORS = ("tuneop", "base", "kopf", "watch")  # base: tuneop from --base DIR (before/after)
# tuneop with tuneop.kube.KubeClient swapped for a library-backed one (benchmarks/kube_clients.py)
KUBE_CLIENT_VARIANTS = ("tuneop-lightkube", "tuneop-kubernetes_asyncio", "tuneop-kubernetes_asyncio-noenv")


def is_tuneop(operator: str) -> bool:
    """The real operator: tuneop, base, or tuneop on another Kubernetes client library."""
    return operator in ("tuneop", "base") or operator in KUBE_CLIENT_VARIANTS


# Goals of issue #8 on a real kube-apiserver (2 cores), and the floors measured there.
GOALS = {"p50_ms": 30, "p95_ms": 80, "burst_s": 5.0, "rss_mb": 130}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "backend": "kubernetes", "baseModel": "Qwen/Qwen3-8B",
            "dataset": {"train": {"configMap": {"name": DATA_CM, "key": "train.jsonl"}}},
            "output": {"pvc": {"claimName": OUT_PVC, "path": name}},
        },
    }


# placeholders for the owner's name and uid in FLOOR_JOB_ENV's Job
FLOOR_NAME, FLOOR_UID = "floorownername", "floorowneruid"
FLOOR_JOB_ENV = "BENCH_FLOOR_JOB"


def tuneop_training_job() -> str:
    """The training Job tuneop creates for the benchmark's FineTuneJob (by tuneop's own builder, in
    the measuring process), as JSON with placeholders for the owner: the Job the floors create too,
    so that every operator asks the API server for the same work (2.7 KB; a Job's POST takes longer
    the more there is to default and validate)."""
    from tuneop.backends import registered as backends

    owner = ftj(FLOOR_NAME)
    owner["metadata"].update(namespace="ns", uid=FLOOR_UID)
    job = next(c for c in backends.children(owner, image="ghcr.io/tuneop/trainer:latest")
               if c["kind"] == "Job" and c["metadata"]["name"] == f"{FLOOR_NAME}-train")
    job["metadata"].pop("namespace", None)
    job["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "floor"
    pod = job["spec"]["template"]["spec"]
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        for part in (c.get("resources") or {}).values():  # the kubernetes client takes quantities as strings only
            part.update({k: str(v) for k, v in part.items()})
    return json.dumps(job)


def floor_job(name: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """The Job the floors create for `owner`: tuneop's own (FLOOR_JOB_ENV, from
    :func:`tuneop_training_job`), named for `owner`."""
    meta = owner.get("metadata") or {}
    job: dict[str, Any] = json.loads(
        os.environ[FLOOR_JOB_ENV].replace(FLOOR_NAME, name).replace(FLOOR_UID, str(meta.get("uid", ""))))
    job["metadata"]["namespace"] = namespace
    return job


# ---------------------------------------------------------------------------------- children


def settled(status: Any) -> bool:
    """The status says the training Job is there: Running, or Pending(TrainingPending) while its pods
    cannot start (on a cluster the benchmark's namespace allows no pods: a ResourceQuota of 0)."""
    st = status if isinstance(status, dict) else {}
    return st.get("phase") == "Running" or (st.get("phase") == "Pending" and st.get("reason") == "TrainingPending")


def trace_line(line: str) -> None:
    """With BENCH_TRACE=FILE: one line into it (the measuring process: creates and Jobs seen)."""
    if os.environ.get("BENCH_TRACE"):
        with open(os.environ["BENCH_TRACE"], "a") as f:
            f.write(line + "\n")


def trace_requests() -> None:
    """With BENCH_TRACE=FILE: every HTTP request of the process (tuneop's client and kopf's, not
    the `kubernetes` client's) as a line: start, end (ms since the epoch), method, URL."""
    trace = os.environ.get("BENCH_TRACE")
    if trace:
        import aiohttp

        out = open(trace, "a", buffering=1)
        request = aiohttp.ClientSession._request

        async def traced(self: Any, method: str, url: Any, *a: Any, **kw: Any) -> Any:
            t = time.time()
            try:
                return await request(self, method, url, *a, **kw)
            finally:
                out.write(f"{t * 1000:.2f} {time.time() * 1000:.2f} {method} {url}\n")

        aiohttp.ClientSession._request = traced  # type: ignore[method-assign]


def trace_steps(handlers: Any) -> None:
    """With BENCH_TRACE: a line for each step of a reconcile (observe, decide, apply) and for the
    watch events kopf hands to its processing, with the object's name."""
    import inspect

    from kopf._core.reactor import processing

    def name_of(args: tuple[Any, ...], kw: dict[str, Any]) -> str:
        if isinstance(kw.get("name"), str):
            return str(kw["name"])
        for v in (*args, *kw.values()):
            meta = v.get("metadata") if isinstance(v, dict) else None
            if isinstance(meta, dict) and "name" in meta:
                return f"{v.get('kind', '')}/{meta['name']}"
            raw = v.get("object") if isinstance(v, dict) else None
            if isinstance(raw, dict):
                return f"{raw.get('kind', '')}/{(raw.get('metadata') or {}).get('name')}"
        return "-"

    def wrap(module: Any, attr: str, label: str) -> None:
        fn = getattr(module, attr, None)
        if fn is None:  # an older tree (--base)
            return
        if inspect.iscoroutinefunction(fn):
            async def traced(*a: Any, **kw: Any) -> Any:
                t = time.time() * 1000
                try:
                    return await fn(*a, **kw)
                finally:
                    trace_line(f"{t:.2f} {time.time() * 1000:.2f} {label} {name_of(a, kw)}")
        else:
            def traced(*a: Any, **kw: Any) -> Any:  # type: ignore[misc]
                t = time.time() * 1000
                try:
                    return fn(*a, **kw)
                finally:
                    trace_line(f"{t:.2f} {time.time() * 1000:.2f} {label} {name_of(a, kw)}")
        setattr(module, attr, traced)

    wrap(handlers, "observe", "OBSERVE")
    wrap(handlers, "_decide", "DECIDE")
    wrap(handlers, "apply", "APPLY")
    wrap(processing, "process_resource_event", "KOPF-EVENT")
    from tuneop.adapterdeployment import handlers as ad_handlers

    wrap(handlers, "on_ftj_event", "ON-EVENT")
    wrap(handlers, "on_change", "ON-CHANGE")
    wrap(ad_handlers, "on_ftj_event", "AD-ON-EVENT")


def child_tuneop() -> None:
    import kopf

    import tuneop
    from tuneop.handlers import run_operator

    print(f"tuneop from {tuneop.__file__}", flush=True)
    kube_client = os.environ.get("BENCH_KUBE_CLIENT")
    if kube_client:  # the same operator on another client library (benchmarks/kube_clients.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import kube_clients

        cls = kube_clients.install(kube_client)
        print(f"tuneop.kube.KubeClient is {cls.__module__}.{cls.__name__}", flush=True)
    trace_requests()
    if os.environ.get("BENCH_TRACE"):  # and when each reconcile starts
        from tuneop.finetunejob import handlers

        reconcile = handlers.reconcile_object

        async def traced_reconcile(namespace: str, name: str, **kw: Any) -> Any:
            now = f"{time.time() * 1000:.2f}"
            with open(os.environ["BENCH_TRACE"], "a") as f:
                f.write(f"{now} {now} RECONCILE {name} {sorted(k for k, v in kw.items() if v)}\n")
            return await reconcile(namespace, name, **kw)

        handlers.reconcile_object = traced_reconcile  # type: ignore[assignment]
        trace_steps(handlers)
    settings = kopf.OperatorSettings()
    # kmock cannot serve kopf's namespace/CRD scanning; the watched namespace is named anyway.
    settings.scanning.disabled = os.environ.get("BENCH_SCANNING") != "1"
    profile = os.environ.get("BENCH_PROFILE")
    if profile:
        import cProfile
        import signal

        prof = cProfile.Profile()
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        prof.enable()
        try:
            run_operator(namespaces=[os.environ["BENCH_NS"]], metrics_port=None, settings=settings)
        except KeyboardInterrupt:
            pass
        finally:
            prof.disable()
            prof.dump_stats(profile)
        return
    run_operator(namespaces=[os.environ["BENCH_NS"]], metrics_port=None, settings=settings)


def _k8s_clients() -> tuple[Any, Any]:
    import kubernetes

    kubernetes.config.load_kube_config()
    return kubernetes.client.BatchV1Api(), kubernetes.client.CustomObjectsApi()


def _create_job(batch: Any, body: dict[str, Any]) -> None:
    import kubernetes

    meta = body["metadata"]
    try:
        batch.create_namespaced_job(meta["namespace"], floor_job(meta["name"], meta["namespace"], body))
    except kubernetes.client.ApiException as e:
        if e.status != 409:
            raise


def child_kopf() -> None:
    import kopf

    batch, _ = _k8s_clients()
    trace_requests()

    @kopf.on.startup()
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.scanning.disabled = os.environ.get("BENCH_SCANNING") != "1"

    @kopf.on.create(GROUP, VERSION, PLURAL)
    def create(body: kopf.Body, **_: Any) -> None:
        started = time.time() * 1000
        _create_job(batch, dict(body))
        if os.environ.get("BENCH_TRACE"):  # the kubernetes client's request is not seen by trace_requests
            with open(os.environ["BENCH_TRACE"], "a") as f:
                f.write(f"{started:.2f} {time.time() * 1000:.2f} HANDLER-JOB {body['metadata']['name']}\n")

    kopf.configure(verbose=False)
    kopf.run(standalone=True, namespaces=[os.environ["BENCH_NS"]])


def child_watch() -> None:
    import kubernetes

    batch, custom = _k8s_clients()
    ns = os.environ["BENCH_NS"]
    seen: set[str] = set()
    while True:
        w = kubernetes.watch.Watch()
        for event in w.stream(custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, timeout_seconds=300):
            obj = event["object"]
            name = obj["metadata"]["name"]
            if event["type"] == "ADDED" and name not in seen:
                seen.add(name)
                _create_job(batch, obj)


# ---------------------------------------------------------------------------------- API servers


class Recorder:
    """Timestamps of what the API server stored, per FineTuneJob name."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ftj_created: dict[str, float] = {}
        self.job_created: dict[str, float] = {}
        self.job_creates: dict[str, int] = {}
        self.job_conflicts = 0
        self.running: dict[str, float] = {}
        self.requests: dict[str, int] = {}
        self.last_request = 0.0
        self.watching: set[str] = set()

    def reset(self) -> None:
        with self.cond:
            self.__init__()  # type: ignore[misc]

    def wait(self, check: Any, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(check, timeout)


class KMockApi:
    """kmock in a thread of this process, with timestamps taken when objects are stored."""

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT / "tests" / "integration"))
        import kmock

        from kmockenv import Emulator, KMockThread

        rec = self.rec = Recorder()
        create, update, watch = kmock.action.CREATE, kmock.action.UPDATE, kmock.action.WATCH

        class BenchEmulator(Emulator):
            def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
                # Named lookups by key: kmock scans every object for each request otherwise.
                if request.name is not None and (strict or request.namespace is not None):
                    obj = self._objects._objects.get((request.resource, request.namespace, request.name))
                    return [obj] if obj is not None else []
                return [
                    obj for (res, ns, name), obj in self._objects.items()
                    if res == request.resource and (ns == request.namespace or (not strict and request.namespace is None))
                ]

            async def _handle(self, request: Any) -> Any:
                try:
                    return await self._timed_handle(request)
                finally:
                    # kmock matches each request against every request it has served (its DSL
                    # keeps them for assertions): quadratic. Keep only the ones in flight.
                    try:
                        self._requests.remove(request)
                    except ValueError:
                        pass
                    for payload in self._payloads:
                        payload._requests.clear()

            async def _timed_handle(self, request: Any) -> Any:
                res = request.resource
                plural = res.plural if res is not None else ""
                if res is not None:
                    with rec.cond:
                        key = f"{request.method.value} {plural}{'/' + request.subresource if request.subresource else ''}"
                        if request.action == watch:
                            key = f"WATCH {plural}"
                            rec.watching.add(plural)
                            rec.cond.notify_all()
                        rec.requests[key] = rec.requests.get(key, 0) + 1
                        rec.last_request = time.monotonic()
                try:
                    out = await super()._handle(request)
                except Exception as e:
                    if request.action == create and plural == "jobs" and "Conflict" in type(e).__name__:
                        with rec.cond:
                            rec.job_conflicts += 1
                    raise
                now = time.monotonic()
                if request.action == create and isinstance(request.data, dict):
                    name = (request.data.get("metadata") or {}).get("name", "")
                    with rec.cond:
                        if plural == PLURAL:
                            rec.ftj_created[name] = now
                        elif plural == "jobs" and name.endswith("-train"):
                            owner = name[: -len("-train")]
                            rec.job_created.setdefault(owner, now)
                            rec.job_creates[owner] = rec.job_creates.get(owner, 0) + 1
                        rec.cond.notify_all()
                elif request.action == update and plural == PLURAL and request.subresource == "status":
                    data = request.data if isinstance(request.data, dict) else {}
                    if settled(data.get("status")):
                        with rec.cond:
                            rec.running.setdefault(request.name, now)
                            rec.cond.notify_all()
                return out

        import kmockenv

        kmockenv.Emulator = BenchEmulator  # KMockThread builds kmockenv.Emulator()
        self.server = KMockThread().start()
        kmockenv.Emulator = Emulator
        self.url = self.server.url
        self.ns = NS

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "bench"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": self.ns}}],
            "current-context": "kmock",
        }))
        return path

    def setup(self) -> None:
        self.server.create(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims",
                           {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": OUT_PVC}})
        self.server.create(f"/api/v1/namespaces/{self.ns}/configmaps",
                           {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": DATA_CM},
                            "data": {"train.jsonl": ROWS}})

    def create_ftj(self, name: str) -> None:
        self.server.create(FTJ_PATH.format(ns=self.ns), ftj(name))

    def ready(self, operator: str, timeout: float = 60) -> bool:
        need = {PLURAL, "jobs"} if is_tuneop(operator) else {PLURAL}
        return self.rec.wait(lambda: need <= self.rec.watching, timeout)

    def stop(self) -> None:
        self.server.stop()


class ClusterApi:
    """A real cluster (KUBECONFIG): a fresh namespace with a ResourceQuota of 0 pods (the Jobs
    never run); timestamps from watches in this process."""

    def __init__(self) -> None:
        import kubernetes

        kubernetes.config.load_kube_config()
        self.k = kubernetes
        self.core = kubernetes.client.CoreV1Api()
        self.custom = kubernetes.client.CustomObjectsApi()
        self.batch = kubernetes.client.BatchV1Api()
        self.rec = Recorder()
        self.ns = f"tuneop-bench-{os.getpid()}-{int(time.time()) % 100000}"
        self._stop = threading.Event()

    def kubeconfig(self, path: Path) -> Path:
        return Path(os.environ["KUBECONFIG"])

    def setup(self) -> None:
        c = self.core
        try:
            c.create_namespace({"metadata": {"name": self.ns}})
        except self.k.client.ApiException as e:
            if e.status != 409:
                raise
        c.create_namespaced_resource_quota(self.ns, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
        c.create_namespaced_persistent_volume_claim(self.ns, {
            "metadata": {"name": OUT_PVC},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
        })
        c.create_namespaced_config_map(self.ns, {"metadata": {"name": DATA_CM}, "data": {"train.jsonl": ROWS}})
        threading.Thread(target=self._watch_jobs, daemon=True).start()
        threading.Thread(target=self._watch_ftjs, daemon=True).start()
        threading.Thread(target=self._watch_events, daemon=True).start()
        time.sleep(1)
        self.rec.watching.update({PLURAL, "jobs"})

    def _watch_jobs(self) -> None:
        w = self.k.watch.Watch()
        for ev in w.stream(self.batch.list_namespaced_job, self.ns, timeout_seconds=3600):
            if self._stop.is_set():
                return
            self._active()
            name = ev["object"].metadata.name
            if ev["type"] == "ADDED" and name.endswith("-train"):
                owner = name[: -len("-train")]
                now = f"{time.time() * 1000:.2f}"
                trace_line(f"{now} {now} JOB-SEEN {owner}")
                with self.rec.cond:
                    self.rec.job_created.setdefault(owner, time.monotonic())
                    self.rec.job_creates[owner] = self.rec.job_creates.get(owner, 0) + 1
                    self.rec.cond.notify_all()

    def _watch_ftjs(self) -> None:
        w = self.k.watch.Watch()
        for ev in w.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.ns, PLURAL, timeout_seconds=3600):
            if self._stop.is_set():
                return
            self._active()
            obj = ev["object"]
            if settled(obj.get("status")):
                with self.rec.cond:
                    self.rec.running.setdefault(obj["metadata"]["name"], time.monotonic())
                    self.rec.cond.notify_all()

    def _active(self) -> None:
        """A write seen (any watch event): what `settle` waits on, as kmock's request count."""
        with self.rec.cond:
            self.rec.last_request = time.monotonic()

    def _watch_events(self) -> None:
        """Events: the last writes an operator makes for an object (tuneop posts its two after
        the status); a sequential create waits until they are in too (`settle`)."""
        w = self.k.watch.Watch()
        for _ in w.stream(self.core.list_namespaced_event, self.ns, timeout_seconds=3600):
            if self._stop.is_set():
                return
            self._active()

    def create_ftj(self, name: str) -> None:
        with self.rec.cond:
            self.rec.ftj_created[name] = time.monotonic()
        started = time.time() * 1000
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, ftj(name))
        trace_line(f"{started:.2f} {time.time() * 1000:.2f} CREATE {name}")

    def ready(self, operator: str, timeout: float = 60) -> bool:
        time.sleep(3)  # no way to see the operator's watch from here
        return True

    def stop(self) -> None:
        """Delete the namespace and wait until it is gone: its teardown (the garbage collector and
        the namespace controller deleting every object of the phase) would otherwise load the API
        server during the next phase, another operator's."""
        self._stop.set()
        try:
            self.core.delete_namespace(self.ns)
        except Exception:  # noqa: BLE001
            return
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                self.core.read_namespace(self.ns)
            except self.k.client.ApiException as e:
                if e.status == 404:
                    return
            time.sleep(0.5)
        print(f"namespace {self.ns} still there after 180 s", file=sys.stderr)


# ---------------------------------------------------------------------------------- one operator


class Child:
    def __init__(self, operator: str, api: Any, workdir: Path, profile: Optional[Path] = None,
                 source: Optional[Path] = None):
        env = dict(os.environ)
        env["KUBECONFIG"] = str(api.kubeconfig(workdir / "kubeconfig"))
        env["BENCH_NS"] = api.ns
        env["PYTHONPATH"] = os.pathsep.join([str((source or ROOT) / "operator"), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        env[FLOOR_JOB_ENV] = tuneop_training_job()
        if profile is not None:
            env["BENCH_PROFILE"] = str(profile)
        if operator in KUBE_CLIENT_VARIANTS:
            env["BENCH_KUBE_CLIENT"] = operator.split("-", 1)[1]
        self.log = workdir / f"{operator}.log"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_child", "tuneop" if is_tuneop(operator) else operator], env=env,
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def settle(rec: Recorder, quiet: float = 0.05, limit: float = 3.0) -> None:
    """Wait until the API server got no request for `quiet` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        idle = time.monotonic() - rec.last_request
        if idle >= quiet:
            return
        time.sleep(quiet - idle)


def done_check(rec: Recorder, names: list[str], operator: str) -> Any:
    if is_tuneop(operator):
        # the Job too: on a real cluster the status can be seen Running before the Job's watch event
        # reaches this process (the two watches are independent)
        return lambda: all(n in rec.running and n in rec.job_created for n in names)
    return lambda: all(n in rec.job_created for n in names)


def run_operator_phase(operator: str, phase: str, count: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    api: Any = ClusterApi() if args.cluster else KMockApi()
    child = None
    try:
        api.setup()
        profile = workdir / f"{operator}-{phase}.prof" if (args.profile and operator == "tuneop") else None
        child = Child(operator, api, workdir, profile, source=args.base if operator == "base" else None)
        if not api.ready(operator):
            raise RuntimeError(f"{operator} did not start watching; see {child.log}")
        rec = api.rec
        # Warm up (imports on first use, connection pools), not measured.
        for i in range(3):
            api.create_ftj(f"warm-{i}")
        if not rec.wait(done_check(rec, [f"warm-{i}" for i in range(3)], operator), 30):
            raise RuntimeError(f"{operator}: warm-up objects not reconciled; see {child.log}")
        settle(rec, 0.2)
        out: dict[str, Any] = {"rss_idle_mb": round(child.rss_mb(), 1)}
        cpu0 = child.cpu_s()
        requests0 = dict(rec.requests)
        names = [f"{phase}-{i:04d}" for i in range(count)]
        if phase == "seq":
            lat, full = [], []
            for name in names:
                api.create_ftj(name)
                if not rec.wait(done_check(rec, [name], operator), 30):
                    raise RuntimeError(f"{operator}: {name} not reconciled in 30 s; see {child.log}")
                lat.append(rec.job_created[name] - rec.ftj_created[name])
                if name in rec.running:
                    full.append(rec.running[name] - rec.ftj_created[name])
                settle(rec)
            out.update(seq_stats(lat, full), latencies_ms=[round(1000 * x, 2) for x in lat],
                       status_latencies_ms=[round(1000 * x, 2) for x in full])
        else:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(api.create_ftj, names))
            if not rec.wait(done_check(rec, names, operator), 600):
                missing = [n for n in names if n not in rec.job_created]
                raise RuntimeError(f"{operator}: {len(missing)} of {count} not reconciled; see {child.log}")
            first = min(rec.ftj_created[n] for n in names)
            out["created_s"] = max(rec.ftj_created[n] for n in names) - first
            out["jobs_s"] = max(rec.job_created[n] for n in names) - first
            if is_tuneop(operator):
                out["running_s"] = max(rec.running[n] for n in names) - first
            settle(rec, 0.5, 30)
            out["duplicate_jobs"] = sum(max(0, rec.job_creates.get(n, 0) - 1) for n in names)
            out["job_conflicts"] = rec.job_conflicts
            if phase == "rss":
                time.sleep(1)
                out["rss_mb"] = round(child.rss_mb(), 1)
        out["cpu_s"] = round(child.cpu_s() - cpu0, 2)
        out["requests_per_object"] = {
            k: round((v - requests0.get(k, 0)) / count, 2) for k, v in sorted(rec.requests.items())
            if v - requests0.get(k, 0) > 0
        }
        return out
    finally:
        if child is not None:
            child.stop()
        api.stop()


# ---------------------------------------------------------------------------------- report


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}{unit}" if v >= 10 or unit == " MB" else f"{v:.2f}{unit}"
    return f"{v}{unit}"


def seq_stats(lat: list[float], full: list[float]) -> dict[str, float]:
    """p50/p95/mean of sequential create -> Job latencies (s), and of create -> status."""
    out = {"p50_ms": 1000 * percentile(lat, 0.5), "p95_ms": 1000 * percentile(lat, 0.95),
           "mean_ms": 1000 * statistics.fmean(lat)}
    if full:
        out.update(status_p50_ms=1000 * percentile(full, 0.5), status_p95_ms=1000 * percentile(full, 0.95))
    return out


def pooled_seq(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The seq phase of several rounds as one: percentiles over every latency of every round
    (the rounds of the operators alternate, so that each sees the same drift of the machine)."""
    lat = [x / 1000 for r in rounds for x in r["latencies_ms"]]
    full = [x / 1000 for r in rounds for x in r["status_latencies_ms"]]
    return {**seq_stats(lat, full), "rounds": len(rounds),
            "latencies_ms": [x for r in rounds for x in r["latencies_ms"]],
            "round_p50_ms": [round(r["p50_ms"], 2) for r in rounds],
            "cpu_s": round(sum(r["cpu_s"] for r in rounds), 2), "rss_idle_mb": rounds[-1]["rss_idle_mb"],
            "requests_per_object": rounds[-1]["requests_per_object"]}


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("create -> Job p50", "seq", "p50_ms", " ms"),
        ("create -> Job p95", "seq", "p95_ms", " ms"),
        ("create -> status p50", "seq", "status_p50_ms", " ms"),
        ("create -> status p95", "seq", "status_p95_ms", " ms"),
        ("burst: last Job", "burst", "jobs_s", " s"),
        ("burst: last Running", "burst", "running_s", " s"),
        ("burst: duplicate Jobs", "burst", "duplicate_jobs", ""),
        ("burst: operator CPU", "burst", "cpu_s", " s"),
        ("RSS idle", "rss", "rss_idle_mb", " MB"),
        ("RSS with objects", "rss", "rss_mb", " MB"),
    ]
    ops = [o for o in (*OPERATORS[:1], *KUBE_CLIENT_VARIANTS, *OPERATORS[1:]) if o in results]
    variants = [o for o in ops if o in KUBE_CLIENT_VARIANTS and "tuneop" in results]
    floors = [o for o in ops if o != "tuneop" and o not in KUBE_CLIENT_VARIANTS]
    head = ["", *ops, *[f"tuneop/{f}" for f in floors if "tuneop" in results], *[f"{v}/tuneop" for v in variants]]
    lines = [head]
    for label, phase, key, unit in rows:
        vals = [(results[o].get(phase) or {}).get(key) for o in ops]
        if all(v is None for v in vals):
            continue
        line = [label, *[fmt(v, unit) for v in vals]]
        if "tuneop" in results:
            t = (results["tuneop"].get(phase) or {}).get(key)
            # tuneop's status times are compared with the floors' Job times (they write no status).
            for f in floors:
                fk = {"running_s": "jobs_s", "status_p50_ms": "p50_ms", "status_p95_ms": "p95_ms"}.get(key, key)
                fv = (results[f].get(phase) or {}).get(fk)
                line.append(f"{t / fv:.2f}x" if isinstance(t, (int, float)) and fv and key != "duplicate_jobs" else "")
            for v in variants:  # the same operator on another client library vs the hand-written one
                vv = (results[v].get(phase) or {}).get(key)
                line.append(f"{vv / t:.2f}x" if isinstance(vv, (int, float)) and t and key != "duplicate_jobs" else "")
        lines.append(line)
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in lines)


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_child"]:
        {"tuneop": child_tuneop, "kopf": child_kopf, "watch": child_watch}[argv[1]]()
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="FineTuneJobs created at once (b)")
    p.add_argument("--seq", type=int, default=None, help="sequential creates for p50/p95 (a); default --n")
    p.add_argument("--rounds", type=int, default=1,
                   help="(a) in this many rounds per operator, the operators alternating; percentiles over all")
    p.add_argument("--rss-objects", type=int, default=1000, help="FineTuneJobs for the RSS figure (c); 0 skips")
    p.add_argument("--operators", default="tuneop,kopf,watch",
                   help="which of tuneop,base,kopf,watch," + ",".join(KUBE_CLIENT_VARIANTS))
    p.add_argument("--base", type=Path, help="another source tree (e.g. `git archive HEAD operator`) run as operator 'base'")
    p.add_argument("--cluster", action="store_true", help="use the cluster of $KUBECONFIG instead of kmock")
    p.add_argument("--profile", action="store_true", help="cProfile tuneop's process (written next to the JSON)")
    p.add_argument("--json", help="JSON output file (default benchmarks/results/operator_speed-<time>.json)")
    args = p.parse_args(argv)
    if args.cluster and not os.environ.get("KUBECONFIG"):
        p.error("--cluster needs KUBECONFIG")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.json) if args.json else RESULTS / f"operator_speed-{stamp}.json"
    workdir = out_path.parent / f"operator_speed-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    phases = [("seq", args.seq or args.n), ("burst", args.n)]
    if args.rss_objects:
        phases.append(("rss", args.rss_objects))
    operators = [o for o in args.operators.split(",") if o]
    if args.base and "base" not in operators:
        operators.insert(1, "base")
    if "base" in operators and not args.base:
        p.error("operator 'base' needs --base DIR")
    results: dict[str, dict[str, Any]] = {o: {} for o in operators}
    t0 = time.monotonic()
    for phase, count in phases:
        rounds: dict[str, list[dict[str, Any]]] = {op: [] for op in operators}
        for _ in range(args.rounds if phase == "seq" else 1):
            for op in operators:
                t = time.monotonic()
                rounds[op].append(run_operator_phase(op, phase, count, args, workdir))
                print(f"  {op:6s} {phase:5s} n={count}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        for op in operators:
            results[op][phase] = pooled_seq(rounds[op]) if phase == "seq" else rounds[op][0]
    import kopf

    libraries = {}
    for op in operators:
        if op in KUBE_CLIENT_VARIANTS:
            from importlib.metadata import version

            lib = op.split("-")[1]
            libraries[lib] = version(lib)
    report = {
        "benchmark": "operator_speed",
        "time": stamp,
        "api_server": "cluster" if args.cluster else "kmock",
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(), "platform": platform.platform()},
        "kopf": kopf.__version__ if hasattr(kopf, "__version__") else "",
        **({"kube_client_libraries": libraries} if libraries else {}),
        "args": {"n": args.n, "seq": args.seq or args.n, "rounds": args.rounds, "rss_objects": args.rss_objects},
        "goals_real_apiserver": GOALS,
        "results": results,
        "wall_s": round(time.monotonic() - t0, 1),
        "logs": str(workdir),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"\nAPI server: {report['api_server']}; n={args.n}, rss objects={args.rss_objects}; "
          f"goals (real apiserver): p50 <= 30 ms, p95 <= 80 ms, {args.n} in <= 5 s, <= 130 MB")
    print(f"JSON: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
