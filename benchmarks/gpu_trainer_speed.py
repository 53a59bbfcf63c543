"""GPU trainer speed: plain TRL defaults vs `python -m tuneop.trainer`, driven by gpu_trainer_speed.sh.

1. the bf16 matmul peak of this GPU (8192^3, median of timed products after warm-up);
2. a Llama-3.2-1B-shaped and a Llama-3.1-8B-shaped model with random weights (built on the GPU from a
   config, saved once), a word-level tokenizer of exactly 128,256 ids, synthetic text rows of exactly
   512 tokens (511 words + EOS), batch 16, so every step is 16 x 512 tokens and nothing is padded;
3. per model, each run its own process: plain TRL with SFTConfig's defaults (bf16, gradient
   checkpointing on), tuneop's trainer deciding by itself, and tuneop under constraints (checkpointing
   forced on = the defaults' memory; torch.compile forced on = what a job of >= 1000 steps gets);
4. tokens/s over the steps after the warm-up, peak GPU memory (max_memory_allocated), and model FLOP/s
   as a share of the measured peak. Model FLOPs per token for LoRA/QLoRA on a frozen base:
   4 x matmul parameters (forward + input gradients; no weight gradients) + 6 x seq x hidden x layers
   (causal attention, forward + backward); recomputation by checkpointing is not counted.

--smoke runs the same code on CPU with tiny shapes (no QLoRA, no matmul peak) so the device run does
not fail on a typo.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import trainer_speed as TS  # noqa: E402

VOCAB = 128256
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def matmul_peak(n: int = 8192, reps: int = 10) -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    times.sort()
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def build_tokenizer(dest: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
    hf.save_pretrained(dest)
    return hf


def write_rows(path: Path, n: int, seq: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(seq - 1))}) + "\n")
    return path


def build_model(shape: str, dest: Path, cuda: bool) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=500000.0, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, **SHAPES[shape])
    t0 = time.monotonic()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 right away: an 8B model in fp32 would need 32 GB first
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(dest, safe_serialization=True)
    n_total = sum(p.numel() for p in model.parameters())
    del model
    if cuda:
        torch.cuda.empty_cache()
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    matmul = per_layer * L + VOCAB * h  # the LM head is a matmul even when tied to the embedding
    return {"params": n_total, "matmul_params": matmul, "hidden": h, "layers": L, "build_seconds": round(time.monotonic() - t0, 1)}


def flops_per_token(info: dict[str, Any], seq: int) -> float:
    return 4.0 * info["matmul_params"] + 6.0 * seq * info["hidden"] * info["layers"]


def tuneop_cmd(model_dir: Path, rows: Path, out: Path, a: argparse.Namespace, adapter: str, scratch: Path,
               name: str, ckpt: Optional[bool]) -> list[str]:
    ns = argparse.Namespace(steps=a.steps, lr=2e-4, batch=a.batch, max_length=a.seq, r=a.r)
    hyper: dict[str, Any] = {}
    if ckpt is not None:
        hyper["gradientCheckpointing"] = ckpt
    cfg = TS.tuneop_config(scratch / f"{name}.json", str(model_dir), str(rows), out, ns, adapter_type=adapter,
                           hyperparameters=hyper)
    return [sys.executable, "-m", "tuneop.trainer", "--config", str(cfg)]


def plain_cmd(model_dir: Path, rows: Path, a: argparse.Namespace, qlora: bool, scratch: Path, name: str,
              extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(HERE / "trainer_speed.py"), "plain", "--model", str(model_dir), "--train", str(rows),
           "--rows", str(a.batch * (a.steps + 1)), "--steps", str(a.steps), "--batch", str(a.batch),
           "--max-length", str(a.seq), "--lr", "2e-4", "--r", str(a.r), "--output", str(scratch / f"plain-{name}")]
    if qlora:
        cmd.append("--qlora")
    if a.smoke:
        cmd += ["--precision", "fp32"]
    return cmd + extra


def run(name: str, cmd: list[str], env_extra: dict[str, str], a: argparse.Namespace, peak: Optional[float],
        info: dict[str, Any], logdir: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TUNEOP_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
                "TUNEOP_TERMINATION_LOG": str(logdir / f"{name}.termination")})
    env.update(env_extra)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.run_timeout, cwd=str(ROOT))
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    wall = time.monotonic() - t0
    (logdir / f"{name}.stderr.txt").write_text(err[-200000:])
    events = []
    for line in out.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    steps = [e for e in events if e.get("event") in ("step", "progress")]
    start = next((e for e in events if e.get("event") == "start"), {})
    r: dict[str, Any] = {"run": name, "rc": rc, "wall_seconds": round(wall, 1), **TS.rate(steps, a.warmup)}
    r["plan"] = {k: start.get(k) for k in ("precision", "gradientCheckpointing", "speed", "bf16", "gradient_checkpointing")
                 if k in start}
    tps = r.get("tokens_per_second")
    if tps:
        r["model_tflops"] = round(tps * flops_per_token(info, a.seq) / 1e12, 1)
        if peak:
            r["share_of_peak"] = round(tps * flops_per_token(info, a.seq) / 1e12 / peak, 3)
    if rc != 0:
        r["stderr_tail"] = err[-2000:]
    log(f"  {name:28s} rc={rc} {tps} tok/s peak={r.get('gpu_peak_gib')} GiB share={r.get('share_of_peak')} "
        f"wall={r['wall_seconds']}s")
    return r


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, LoRA only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    p.add_argument("--work", default="/tmp/gpu-trainer-speed")
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--budget", type=float, default=470, help="seconds; optional runs are skipped past it")
    p.add_argument("--run-timeout", type=float, default=240)
    p.add_argument("--optional-reserve", type=float, default=60,
                   help="an optional run starts only this many seconds before the budget ends")
    p.add_argument("--only", default="", help="comma list of run names to keep (debugging)")
    p.add_argument("--models", default="", help="comma list of shapes to run (1b,8b; default all)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the required runs")
    p.add_argument("--no-optional", action="store_true", help="only plain defaults and tuneop")
    a = p.parse_args(argv)
    t_start = time.monotonic()
    if a.smoke:
        a.steps, a.warmup, a.batch, a.seq = min(a.steps, 4), min(a.warmup, 1), min(a.batch, 4), min(a.seq, 64)

    import torch

    cuda = torch.cuda.is_available()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    doc: dict[str, Any] = {"settings": vars(a), "runs": []}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        doc["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    import transformers
    import trl

    doc["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    try:
        import liger_kernel  # noqa: F401

        doc["versions"]["liger_kernel"] = "installed"
    except ImportError:
        doc["versions"]["liger_kernel"] = None
    peak = matmul_peak() if cuda else None
    doc["matmul_peak_tflops"] = round(peak, 1) if peak else None
    log(f"gpu={doc.get('gpu')} peak={doc['matmul_peak_tflops']} TFLOP/s versions={doc['versions']}")

    rows = write_rows(work / "train.jsonl", a.batch * (a.steps + 2), a.seq)
    plans = [("1b" if not a.smoke else "tiny", "lora")]
    if cuda:
        plans.append(("8b", "qlora"))
    elif a.smoke:
        plans.append(("tiny", "lora-again"))
    only = {x for x in a.only.split(",") if x}

    def save() -> None:
        (out / "gpu_trainer_speed.json").write_text(json.dumps(doc, indent=2))

    # required runs of every model first (plain defaults, then tuneop), the optional ones after
    schedule: list[tuple[str, str, str, str, dict[str, str], bool]] = []
    keep = {x for x in a.models.split(",") if x}
    plans = [pl for pl in plans if not keep or pl[0] in keep or a.smoke]
    for rnd in range(a.rounds):  # rounds interleave plain and tuneop: their spread is the noise
        sfx = f"@{rnd}" if rnd else ""
        for shape, adapter in plans:
            tag = f"{shape}-{adapter}"
            schedule += [(shape, adapter, f"{tag}/plain-defaults{sfx}", "plain", {}, True),
                         (shape, adapter, f"{tag}/tuneop{sfx}", "tuneop", {}, True)]
    for shape, adapter in ([] if a.no_optional else plans):
        tag = f"{shape}-{adapter}"
        if adapter != "qlora":
            schedule += [(shape, adapter, f"{tag}/tuneop-ckpt-on", "tuneop-ckpt", {}, False),
                         (shape, adapter, f"{tag}/tuneop-compile", "tuneop", {"TUNEOP_TORCH_COMPILE": "1"}, False)]
    infos: dict[str, dict[str, Any]] = {}
    for shape, adapter, name, kind, env_extra, required in schedule:
        if only and name not in only:
            continue
        elapsed = time.monotonic() - t_start
        if elapsed > (a.budget if required else a.budget - a.optional_reserve):
            log(f"  {name}: skipped ({elapsed:.0f}s of {a.budget:.0f}s budget used)")
            doc["runs"].append({"run": name, "skipped": f"budget ({elapsed:.0f}s used)"})
            continue
        adapter_type = "qlora" if adapter == "qlora" else "lora"
        mdir = work / f"model-{shape}"
        if shape not in infos:
            if not mdir.exists():
                info = build_model(shape, mdir, cuda)
                build_tokenizer(mdir)
                (mdir / "info.json").write_text(json.dumps(info))
            infos[shape] = json.loads((mdir / "info.json").read_text())
            doc.setdefault("models", {})[shape] = infos[shape]
            log(f"model {shape}: {infos[shape]}")
        info = infos[shape]
        tag = name.split("/")[0]
        key = name.split("/")[1].split("@")[0]
        if kind == "plain":
            cmd = plain_cmd(mdir, rows, a, adapter_type == "qlora", work, name.replace("/", "_").replace("@", "_"), [])
        else:
            uniq = name.replace("/", "_").replace("@", "_")  # a fresh output: the trainer resumes from checkpoints
            cmd = tuneop_cmd(mdir, rows, work / f"o-{uniq}", a, adapter_type, work, uniq,
                             True if kind == "tuneop-ckpt" else None)
        r = run(name.replace("/", "_"), cmd, env_extra, a, peak, info, work)
        r["run"] = name
        doc["runs"].append(r)
        save()
        if (key == "tuneop" and r["rc"] != 0 and "out of memory" in (r.get("stderr_tail") or "")
                and time.monotonic() - t_start < a.budget):
            # the memory estimate was wrong for this GPU: record it and measure with checkpointing
            fb = tuneop_cmd(mdir, rows, work / f"o-{tag}-f", a, adapter_type, work, f"{tag}-f", True)
            r2 = run(f"{tag}_tuneop-oom-fallback", fb, {}, a, peak, info, work)
            r2["run"] = f"{tag}/tuneop-oom-fallback"
            doc["runs"].append(r2)
            save()

    doc["elapsed_seconds"] = round(time.monotonic() - t_start, 1)
    save()
    table(doc)
    return 0 if all(r.get("rc", 0) == 0 for r in doc["runs"]) else 1


def table(doc: dict[str, Any]) -> None:
    print(f"\nGPU trainer speed: {doc.get('gpu')}, bf16 matmul peak {doc.get('matmul_peak_tflops')} TFLOP/s, "
          f"batch {doc['settings']['batch']} x {doc['settings']['seq']}, {doc['versions']}")
    print(f"{'run':30s} {'tok/s':>9s} {'x dflt':>7s} {'GiB':>6s} {'TFLOP/s':>8s} {'%peak':>6s}  plan")
    base: dict[str, float] = {}
    for r in doc["runs"]:
        if "/plain-defaults" in r["run"] and r.get("tokens_per_second") and r["run"].split("/")[0] not in base:
            base[r["run"].split("/")[0]] = r["tokens_per_second"]
    for r in doc["runs"]:
        if r.get("skipped"):
            print(f"{r['run']:30s} skipped: {r['skipped']}")
            continue
        tps = r.get("tokens_per_second")
        b = base.get(r["run"].split("/")[0])
        plan = r.get("plan") or {}
        sp = plan.get("speed") or {}
        desc = (f"ckpt={'on' if plan.get('gradientCheckpointing', plan.get('gradient_checkpointing')) else 'off'}"
                + (f" {sp.get('batching')}" if sp else "") + (" liger" if sp.get("liger") else "")
                + (" compile" if sp.get("torchCompile") else ""))
        print(f"{r['run']:30s} {tps if tps else '-':>9} {round(tps / b, 2) if tps and b else '-':>7} "
              f"{r.get('gpu_peak_gib', '-'):>6} {r.get('model_tflops', '-'):>8} "
              f"{round(100 * r['share_of_peak'], 1) if r.get('share_of_peak') else '-':>6}  {desc}"
              + (f"  rc={r['rc']}" if r.get("rc") else ""))


if __name__ == "__main__":
    sys.exit(main())
