"""`python -m tuneop.trainer --config FILE [--validate-only]`: orchestration of one training run."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from typing import IO, TYPE_CHECKING, Any, Optional

from ..api.finetunejob import AdapterType, Method
from . import config as C
from . import data as D
from . import evaluate as E
from . import model as M
from . import prefix as PF
from . import startfrom as SF
from . import tracking as T
from .errors import TRAINING_ERROR, TrainerError
from .events import Emitter, shorten
from .manifest import (
    base_model_info,
    describe_adapter,
    file_hashes,
    read_manifest,
    reuse_decision,
    sha256_file,
    write_adapter_dir,
)
from .paths import (
    base_model_name,
    list_checkpoints,
    marker_valid,
    plan_checkpoints,
    read_marker,
    remove_checkpoints,
    resolve_model,
)
from .progress import EvalProgress, LinePrinter, progress_mode
from .publish import publish_adapter
from .termination import EXIT_CODE as INTERRUPTED_EXIT_CODE
from .termination import Interrupted, Termination, grace_seconds

if TYPE_CHECKING:
    from transformers import Trainer


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tuneop.trainer", description=__doc__)
    p.add_argument("--config", required=True, help="resolved job config (JSON)")
    p.add_argument(
        "--validate-only", action="store_true", help="check the datasets, print the report, do not train"
    )
    return p.parse_args(argv)


def claim_stdout() -> IO[str]:
    """stdout carries only our JSON events. When running as a real process, file descriptor 1 is
    pointed at stderr (so prints from libraries, C code included, land there) and the events get
    a private duplicate of the original stdout."""
    real_out, real_err = sys.__stdout__, sys.__stderr__
    if real_out is None or real_err is None:
        return sys.stdout  # no process streams to redirect
    if sys.stdout is not real_out:
        return sys.stdout  # embedded (tests calling main()): leave the host's streams alone
    try:
        fd = real_out.fileno()
        err = real_err.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdout
    sys.stdout.flush()
    events = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8")
    os.dup2(err, fd)
    sys.stdout = sys.stderr
    return events


def rank_info(environ: Optional[dict[str, str]] = None) -> tuple[int, int, int]:
    env = os.environ if environ is None else environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    stream = claim_stdout()
    rank, _, world = rank_info()
    mode = progress_mode()
    emitter = Emitter(stream=stream, enabled=rank == 0, echo=LinePrinter() if mode == "lines" else None)
    # where an interrupted run stands: the step and complete checkpoint a SIGTERM leaves behind
    context: dict[str, Any] = {"step": None, "checkpoint": None, "marker": None}
    termination = Termination(grace_seconds())
    termination.on_timeout = lambda: emitter.write_termination(
        interrupted_event(termination.requested or "SIGTERM", *last_complete(context), watchdog=True))
    restore_signals = termination.install()
    try:
        cfg = C.load_config(args.config)
        if args.validate_only:
            return validate_only(cfg, emitter)
        emitter.output_dir = cfg.paths.output
        return train(cfg, emitter, rank, world, termination=termination, context=context, progress=mode)
    except Interrupted as e:
        close_tracking(context, "KILLED")
        print(f"tuneop: interrupted by {e.signal_name}"
              + (f"; resume point {context['checkpoint']}" if context["checkpoint"] else ""), file=sys.stderr)
        emitter.terminate(interrupted_event(e.signal_name, context["step"], context["checkpoint"]))
        return INTERRUPTED_EXIT_CODE
    except TrainerError as e:
        close_tracking(context, "FAILED")
        event = {"event": "error", "reason": e.reason, "message": shorten(e.message)}
        event.update(e.details)
        emitter.terminate(event)
        return e.exit_code
    except KeyboardInterrupt:
        close_tracking(context, "KILLED")
        emitter.terminate({"event": "error", "reason": TRAINING_ERROR, "message": "interrupted"})
        return 130
    except Exception as e:  # noqa: BLE001 - report anything as a TrainingError, exit 1 (retried)
        traceback.print_exc(file=sys.stderr)
        close_tracking(context, "FAILED")
        emitter.terminate({"event": "error", "reason": TRAINING_ERROR, "message": shorten(f"{type(e).__name__}: {e}", 800)})
        return 1
    finally:
        restore_signals()
        if context.get("start_dir"):
            shutil.rmtree(context["start_dir"], ignore_errors=True)  # spec.startFrom's staged copy
        try:
            stream.flush()
            if stream is not sys.stdout and stream is not sys.__stdout__:
                stream.close()
        except Exception:  # noqa: BLE001
            pass


def interrupted_event(signal_name: str, step: Optional[int], checkpoint: Optional[str], watchdog: bool = False) -> dict[str, Any]:
    """The final event of a run a signal ended: the step it stopped at and its complete checkpoint (the
    next run's resume point); both null when it stopped before training."""
    event: dict[str, Any] = {"event": "interrupted", "signal": signal_name, "step": step, "checkpoint": checkpoint}
    if watchdog:
        event["watchdog"] = True  # the grace period ran out: the process left without finishing its step
    return event


def close_tracking(context: dict[str, Any], status: str) -> None:
    """End the tracking runs of a training that did not finish (KILLED: the next pod continues them)."""
    tracker = context.pop("tracker", None)
    if tracker is not None:
        tracker.close(status)


def last_complete(context: dict[str, Any]) -> tuple[Optional[int], Optional[str]]:
    """(step, path) of the newest checkpoint this run completed (for the watchdog's report), else what
    train() recorded after training, else (None, None)."""
    marker = context.get("marker")
    if marker is not None and marker.last is not None:
        return marker.last
    return context.get("step"), context.get("checkpoint")


def validate_only(cfg: C.JobConfig, emitter: Emitter) -> int:
    """Check train/validation/test. Imports nothing heavy (runs in a small CPU pod)."""
    local = D.local_paths(cfg)
    report = D.validate(cfg, local)
    emitter.terminate({"event": "validated", "dataset": report})
    return 0


# ---------------------------------------------------------------- training

def train(cfg: C.JobConfig, emitter: Emitter, rank: int, world: int, termination: Optional[Termination] = None,
          context: Optional[dict[str, Any]] = None, progress: str = "off") -> int:
    spec = cfg.spec
    hp = spec.hyperparameters
    adapter_type = spec.adapter.type
    method = spec.method
    source = resolve_model(cfg.paths.model)
    # Before anything heavy: QLoRA without CUDA is refused outright.
    M.check_qlora_hardware(adapter_type, gguf=source.gguf_file is not None)

    termination = termination if termination is not None else Termination()
    context = context if context is not None else {}
    output = cfg.paths.output
    base_name = base_model_name(spec.base_model, source)
    # spec.startFrom: the starting adapter, staged and checked against its pin before anything is written
    start_dir: Optional[str] = None
    start_sha: Optional[str] = None
    if cfg.start_from is not None:
        SF.check_not_output(cfg.start_from, output)
        SF.check_base_model(cfg.start_from, base_name)
        start_dir, start_sha = SF.staged_sha256(cfg.start_from)
        context["start_dir"] = start_dir  # main() removes it whatever happens next
    os.makedirs(output, exist_ok=True)
    local = D.local_paths(cfg)
    # what this run trains (spec + data + starting adapter content): names its checkpoints, marks its adapter
    data_sha256 = {
        split: sha256_file(split_path) if (split_path := local.get(split)) and os.path.isfile(split_path) else None
        for split in ("train", "validation")
    }
    fingerprint = C.training_fingerprint(spec.to_dict(), data_sha256, start_sha)
    checkpoints = os.path.join(output, "checkpoints")
    if reuse_adapter(os.path.join(output, "adapter"), fingerprint, emitter, upload_to(spec) if rank == 0 else None):
        if rank == 0:
            remove_checkpoints(checkpoints, plan_checkpoints(fingerprint, list_checkpoints(checkpoints, fingerprint))["stale"])
        return 0
    splits = D.load(cfg, local)
    fmt = splits.format

    M.quiet_libraries()
    import torch

    cuda = torch.cuda.is_available()
    precision = C.choose_precision(
        hp.precision,
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        cpu_bf16=C.cpu_supports_bf16(C.read_cpu_flags()),
    )
    run_checkpoints = os.path.join(checkpoints, fingerprint)
    plan = plan_checkpoints(fingerprint, list_checkpoints(checkpoints, fingerprint))
    if rank == 0 and plan["incomplete"]:
        print(f"tuneop: removing checkpoints without a commit marker: {', '.join(plan['incomplete'])}", file=sys.stderr)
        remove_checkpoints(checkpoints, plan["incomplete"])
    resume = os.path.join(checkpoints, plan["resume"]) if plan["resume"] else None

    tokenizer = M.load_tokenizer(source)
    assistant_only = fmt == "messages" and not hp.train_on_inputs and method == Method.sft
    note = M.ensure_chat_template(tokenizer, M.is_conversational(splits.train), assistant_only)
    if note:
        print(f"tuneop: {note}", file=sys.stderr)
    model = M.load_model(source, C.load_dtype_name(precision, adapter_type), adapter_type, precision)

    device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_info = base_model_info(model.config.to_dict(), text_config.to_dict())
    need = C.estimate_training_bytes(
        n_params=model.num_parameters(),
        hidden_size=int(getattr(text_config, "hidden_size", 0) or 0),
        num_layers=M.num_decoder_layers(model),
        batch_size=hp.batch_size,
        seq_len=hp.max_seq_length,
        adapter_type=adapter_type,
        weight_bytes=2 if precision in ("bf16", "fp16") else 4,
    )
    grad_ckpt = C.decide_gradient_checkpointing(hp.gradient_checkpointing, cuda, need, device_bytes)
    if adapter_type == AdapterType.qlora:
        model = M.prepare_qlora(model, grad_ckpt)

    total = C.total_steps(hp, len(splits.train), world)
    speed = plan_speed(cfg, splits, tokenizer, model, text_config, cuda, total)
    targs = C.training_arguments(
        hp, run_checkpoints, total, precision, grad_ckpt, has_eval=bool(splits.validation), cuda=cuda, world_size=world
    )
    targs.update(speed["training_arguments"])
    if speed["compactLmHead"]:
        M.compact_fused_lm_head()

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .callbacks import CheckpointMarker, EventCallback, StopOnSignal

    train_ds = Dataset.from_list(D.trl_rows(splits.train, fmt))
    eval_ds = Dataset.from_list(D.trl_rows(splits.validation, fmt)) if splits.validation else None
    peft_config = None if adapter_type == AdapterType.full else M.lora_config(spec.adapter, model)
    # adapter.layers resolved for this model (absolute, ascending); None: every layer
    adapter_layers = getattr(peft_config, "layers_to_transform", None) or None
    started_from = None
    if cfg.start_from is not None and start_dir is not None and start_sha is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start_dir, is_trainable=True)
        shutil.rmtree(start_dir, ignore_errors=True)  # loaded: the staged copy is no longer needed
        loaded = model.peft_config["default"]
        notes = SF.differences(loaded, spec.adapter)
        if notes:
            print(f"tuneop: continuing the adapter at {cfg.start_from.location} with its own shape: "
                  f"{'; '.join(notes)} not applied", file=sys.stderr)
        if grad_ckpt:
            model.enable_input_require_grads()
        peft_config = None  # the model is the PEFT model already
        adapter_layers = getattr(loaded, "layers_to_transform", None) or None
        started_from = SF.report(cfg.start_from, start_sha)

    bar = progress == "bar"
    start_info = {
        "model": spec.base_model,
        "method": method.value,
        "adapterType": adapter_type.value,
        "format": fmt,
        "rows": len(splits.train),
        "validationRows": len(splits.validation),
        "testRows": len(splits.test),
        "lossOn": loss_scope(method, fmt, hp.train_on_inputs),
        "chatTemplate": note,
        "adapterLayers": adapter_layers,
        "precision": precision,
        "gradientCheckpointing": grad_ckpt,
        "speed": speed["report"],
        "device": "cuda" if cuda else "cpu",
        "worldSize": world,
        "resumed_from": resume,
        "trainingFingerprint": fingerprint,
    }
    if started_from is not None:
        start_info["startedFrom"] = started_from
    budget = None
    if hp.max_train_seconds:
        from .callbacks import TimeBudget, spent_before

        budget = TimeBudget(hp.max_train_seconds, hp.lr_scheduler.value, hp.warmup_ratio,
                            spent=spent_before(resume))
        start_info["timeBudget"] = {"seconds": int(hp.max_train_seconds), "spentBefore": round(budget.spent0, 1),
                                    "schedule": f"{hp.lr_scheduler.value} over the budget"}
    callback = EventCallback(emitter, start_info, progress_bar=bar and rank == 0, budget=budget)
    marker = CheckpointMarker(fingerprint, budget)
    context["marker"] = marker
    tracker = start_tracking(cfg, fingerprint, targs, output, emitter, rank, context)

    trainer_inputs = dict(
        model=model,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        # the marker before the checkpoint event: a checkpoint is announced once it is complete
        callbacks=[*([budget] if budget is not None else []), marker, StopOnSignal(termination), callback],
    )
    trainer: Trainer
    if method == Method.dpo:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(args=DPOConfig(**targs, beta=float(hp.dpo_beta)), **trainer_inputs)
    else:
        from trl import SFTConfig, SFTTrainer

        if fmt == "prompt-completion":
            completion_only: Optional[bool] = not hp.train_on_inputs
        else:
            completion_only = False if hp.train_on_inputs else None
        trl_args = SFTConfig(
            **{**targs, **speed["sft_arguments"]},
            completion_only_loss=completion_only,
            assistant_only_loss=assistant_only,
        )
        trainer = SFTTrainer(args=trl_args, **trainer_inputs)
        if speed["truncate"]:
            # padding-free without packing: TRL leaves max_length to the caller
            trainer.train_dataset = M.truncate_prepared(trainer.train_dataset, hp.max_seq_length)
            if trainer.eval_dataset is not None:
                trainer.eval_dataset = M.truncate_prepared(trainer.eval_dataset, hp.max_seq_length)
        speed["report"].update(share_prefix(trainer, speed["report"], hp.batch_size, grad_ckpt, precision))
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if budget is not None:
        use_time_schedule(trainer, budget)

    do_eval = bool(splits.test) and spec.evaluation.enabled
    pairs: list = []
    base_score = None
    stop_ids = M.end_of_turn_ids(tokenizer)
    if do_eval:
        pairs = E.examples(splits.test, splits.test_format)
        if spec.evaluation.max_samples:
            pairs = pairs[: spec.evaluation.max_samples]
        if not pairs:
            print("tuneop: test rows have no prompt/answer pairs to score; skipping evaluation", file=sys.stderr)
            do_eval = False
    if do_eval and adapter_type == AdapterType.full and rank == 0:
        # full fine-tuning overwrites the base weights: score the base before training
        base_score = E.run(M.unwrap(trainer.model), tokenizer, pairs, spec.evaluation.max_new_tokens, stop_ids,
                           progress=bar, desc="evaluating base", on_progress=EvalProgress(emitter.emit, "base", len(pairs)))
    if do_eval and adapter_type == AdapterType.full and world > 1:
        _barrier()

    started = time.monotonic()
    termination.raise_if_requested()
    with termination.deferring():  # a SIGTERM now ends training after the current step (StopOnSignal)
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except (torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError") else MemoryError) as e:  # noqa: B030
            raise TrainerError(TRAINING_ERROR, f"out of memory: {e}"[:500]) from None
        if termination.requested is None and splits.validation and callback.last_eval_step != trainer.state.global_step:
            trainer.evaluate()  # the final validation loss (every rank takes part under DDP)
    runtime = time.monotonic() - started
    step_path = os.path.join(run_checkpoints, f"checkpoint-{int(trainer.state.global_step)}")
    if marker_valid(os.path.basename(step_path), read_marker(step_path), fingerprint):
        context["step"], context["checkpoint"] = int(trainer.state.global_step), step_path
    elif marker.last is not None:
        context["step"], context["checkpoint"] = marker.last
    # interrupted: no test evaluation, no adapter; main() reports the checkpoint and exits 143
    termination.raise_if_requested()

    if rank != 0:
        return 0

    state = trainer.state
    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "train_runtime": round(float(result.metrics.get("train_runtime", runtime)), 3),
        "train_samples": len(splits.train),
        "steps": int(state.global_step),
        "epoch": round(float(state.epoch or 0.0), 4),
        "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0),
        "tokens_per_second": callback.last_tokens_per_second,
        "final_loss": _last_loss(state.log_history),
    }
    if callback.last_eval and "eval_loss" in callback.last_eval:
        metrics["eval_loss"] = callback.last_eval["eval_loss"]
    if resume:
        metrics["resumed_from"] = resume
    if budget is not None:
        metrics["time_budget_seconds"] = int(budget.budget)  # hp.max_train_seconds, set when there is a budget
        metrics["stopped_by_time_budget"] = budget.stopped

    evaluation = None
    unwrapped = M.unwrap(trainer.model)
    if do_eval:
        if adapter_type != AdapterType.full:
            with unwrapped.disable_adapter():
                base_score = E.run(unwrapped, tokenizer, pairs, spec.evaluation.max_new_tokens, stop_ids,
                                   progress=bar, desc="evaluating base",
                                   on_progress=EvalProgress(emitter.emit, "base", len(pairs)))
        with M.merged_for_inference(unwrapped, adapter_type):
            adapter_score = E.run(unwrapped, tokenizer, pairs, spec.evaluation.max_new_tokens, stop_ids,
                                  progress=bar, desc="evaluating adapter",
                                  on_progress=EvalProgress(emitter.emit, "adapter", len(pairs)))
        evaluation = E.result(len(pairs), base_score, adapter_score)
        emitter.emit({"event": "eval", **evaluation})

    def save(directory: str) -> None:
        if adapter_type == AdapterType.full:
            unwrapped.config.name_or_path = base_name
            unwrapped.save_pretrained(directory, safe_serialization=True)
        else:
            for pc in unwrapped.peft_config.values():
                pc.base_model_name_or_path = base_name
            unwrapped.save_pretrained(directory)
        tokenizer.save_pretrained(directory)


    termination.raise_if_requested()
    with termination.deferring():  # once begun, the adapter is written and swapped in whatever arrives
        adapter = write_adapter_dir(
            output,
            save,
            {
                "base_model": base_name,
                "method": method.value,
                "adapter_type": adapter_type.value,
                "metrics": metrics,
                "evaluation": evaluation,
                "extra": {"datasetFormat": fmt, "precision": precision, "trainingFingerprint": fingerprint,
                          "baseModelInfo": model_info,
                          **({"startedFrom": started_from} if started_from is not None else {})},
            },
        )
        # output.s3 (the files, then the manifest): a SIGTERM is deferred, the watchdog's kill leaves no manifest
        adapter = publish_adapter(adapter, upload_to(spec))
        # the new adapter is complete: checkpoints of other specs or data (and of older trainers) go
        remove_checkpoints(checkpoints, plan_checkpoints(fingerprint, list_checkpoints(checkpoints, fingerprint))["stale"])
        done: dict[str, Any] = {"event": "done", "adapter": adapter, "evaluation": evaluation, "metrics": metrics}
        if started_from is not None:
            done["startedFrom"] = started_from
        if tracker is not None:
            context.pop("tracker", None)
            tracker.finish(adapter, metrics, evaluation, fingerprint,
                           os.path.join(output, "adapter", "tuneop-manifest.json"))
            done["tracking"] = tracker.info
        emitter.terminate(done)
    return 0


def start_tracking(cfg: C.JobConfig, fingerprint: str, targs: dict[str, Any], output: str, emitter: Emitter,
                   rank: int, context: dict[str, Any]) -> Optional[T.Tracker]:
    """spec.tracking: transformers' reporting on (every rank: its callbacks act on rank 0 only); rank 0
    opens the runs they write into and announces them (event `tracking`)."""
    tracking = cfg.spec.tracking
    if tracking is None:
        return None
    targs["report_to"] = T.report_to(tracking)
    targs["run_name"] = (tracking.mlflow.run_name if tracking.mlflow else None) or cfg.name
    if rank != 0:
        return None
    meta = cfg.metadata
    key = T.run_key(str(meta.get("namespace") or ""), cfg.name, str(meta.get("uid") or ""), fingerprint)
    tracker = T.Tracker(tracking, key, targs["run_name"], output)
    context["tracker"] = tracker
    info = tracker.start(T.spec_params(cfg.spec.to_dict()), {"tuneop.trainingFingerprint": fingerprint,
                                                             "tuneop.finetunejob": cfg.name})
    emitter.emit({"event": "tracking", **info})
    return tracker


def upload_to(spec: Any) -> Optional[str]:
    """output.s3.uri, where the finished adapter is also uploaded (None: nowhere)."""
    return spec.output.s3.uri if spec.output.s3 is not None else None


def reuse_adapter(adapter_dir: str, fingerprint: str, emitter: Emitter, upload: Optional[str] = None) -> bool:
    """When <output>/adapter was trained for this very fingerprint and its files match its manifest: report
    it as this run's result (`done` with `reused: true`) without loading the model. Returns whether it did."""

    manifest = read_manifest(adapter_dir)
    if manifest is None:
        return False
    if manifest.get("trainingFingerprint") != fingerprint:  # decided without hashing the files
        return False
    decision = reuse_decision(manifest, fingerprint, file_hashes(adapter_dir))
    if not decision["reuse"]:
        print(f"tuneop: not reusing {adapter_dir}: {decision['reason']}; training again", file=sys.stderr)
        return False
    adapter = describe_adapter(adapter_dir)
    # output.s3 (rank 0): upload it again; a manifest already there is deleted first and written last
    adapter = publish_adapter(adapter, upload)
    print(f"tuneop: reused the adapter at {adapter_dir}: it was trained for this very spec and data (training "
          f"fingerprint {fingerprint}) and its files match its manifest; not training again", file=sys.stderr)
    emitter.terminate({"event": "done", "reused": True, "adapter": adapter,
                       "evaluation": manifest.get("evaluation"), "metrics": manifest.get("metrics")})
    return True


def use_time_schedule(trainer, budget) -> None:
    """Replace the step-based LR schedule Trainer would build by one on the budget spent."""
    from torch.optim.lr_scheduler import LambdaLR

    def create_scheduler(num_training_steps: int, optimizer=None):
        if trainer.lr_scheduler is None:
            trainer.lr_scheduler = LambdaLR(optimizer if optimizer is not None else trainer.optimizer, budget.lr_factor)
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def plan_speed(cfg: C.JobConfig, splits: D.Splits, tokenizer, model, text_config, cuda: bool, total: int) -> dict[str, Any]:
    """The speed decisions of config.py applied to this job: batching of mixed lengths, Liger kernels,
    torch.compile, the compact LM head. TUNEOP_BATCHING (padded|padding_free|group_by_length|packing),
    TUNEOP_LIGER and TUNEOP_TORCH_COMPILE (0|1) override the automatic choice (benchmarks, debugging)."""

    spec = cfg.spec
    hp = spec.hyperparameters
    method = spec.method.value
    lengths = M.sample_lengths(tokenizer, splits.train, splits.format, seed=hp.seed) if method == "sft" else []
    batching = C.decide_batching(
        hp.packing, method, lengths, hp.batch_size,
        hidden_size=int(getattr(text_config, "hidden_size", 0) or 0),
        num_layers=M.num_decoder_layers(model),
        n_params=model.num_parameters(),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
    )
    mode, reason = batching.mode, batching.reason
    forced = os.environ.get("TUNEOP_BATCHING", "").strip()
    if forced in ("padded", "padding_free", "group_by_length", "packing") and method == "sft":
        mode, reason = forced, "TUNEOP_BATCHING"
    model_type = str(getattr(text_config, "model_type", "") or "")
    liger, liger_reason = C.decide_liger(
        C.parse_switch(os.environ.get("TUNEOP_LIGER")), cuda, M.liger_available(), model_type
    )
    compile_, compile_reason = C.decide_torch_compile(
        C.parse_switch(os.environ.get("TUNEOP_TORCH_COMPILE")), cuda, spec.adapter.type, total,
        static_shapes=mode == "packing" or (bool(lengths) and min(lengths) >= hp.max_seq_length),
        torch_version=_torch_version(),
    )
    compact = C.decide_compact_lm_head(cuda) and method == "sft"
    targs: dict[str, Any] = {"include_num_input_tokens_seen": C.token_count_mode(mode)}
    if mode == "group_by_length":
        targs["train_sampling_strategy"] = "group_by_length"
    if liger and method == "sft":
        # applied here, not through use_liger_kernel, so a Liger that does not fit this transformers
        # version costs the kernels, not the run
        liger, liger_reason = M.apply_liger(model, liger_reason)
    if compile_:
        targs["torch_compile"] = True
    sft: dict[str, Any] = {"packing": mode == "packing"}
    if mode == "padding_free":
        sft.update(padding_free=True, max_length=None)
    report = {
        "batching": mode, "batchingReason": reason, "padFraction": batching.pad_fraction,
        "liger": bool(liger and method == "sft"), "ligerReason": liger_reason,
        "torchCompile": compile_, "torchCompileReason": compile_reason,
        "compactLmHead": compact,
    }
    return {
        "training_arguments": targs,
        "sft_arguments": sft,
        "truncate": mode == "padding_free",
        "compactLmHead": compact,
        "report": report,
    }


def share_prefix(trainer, report: dict[str, Any], batch_size: int, grad_ckpt: bool, precision: str) -> dict[str, Any]:
    """Compute the prompt prefix every row shares once per batch when it pays (config.decide_shared_prefix;
    TUNEOP_SHARED_PREFIX=0|1 overrides); prefix.apply checks one batch against the whole rows first."""

    setting = C.parse_switch(os.environ.get("TUNEOP_SHARED_PREFIX"))
    mode = str(report.get("batching"))
    compile_ = bool(report.get("torchCompile"))
    tokens, mean_length, prefix_ids = 0, 0.0, []
    if not C.shared_prefix_blocked(setting, "sft", mode, grad_ckpt, compile_, batch_size):
        seen = {"rows": 0, "tokens": 0}
        first: list[int] = []

        def rows():
            for d in (trainer.train_dataset, trainer.eval_dataset):
                if d is None:
                    continue
                for ids, labels in PF.iter_rows(d):
                    if not first:
                        first.extend(ids)
                    seen["rows"] += 1
                    seen["tokens"] += len(ids)
                    yield ids, labels

        tokens = C.shared_prefix_length(rows())
        mean_length = seen["tokens"] / max(1, seen["rows"])
        prefix_ids = first[:tokens]
    use, reason = C.decide_shared_prefix(setting, "sft", mode, grad_ckpt, compile_, tokens, mean_length, batch_size)
    if use:
        shared, account = PF.apply(trainer, precision, prefix_ids, verify_rows=batch_size)
        if shared is None:
            use, reason = False, account
        else:
            print(f"tuneop: shared prompt prefix of {tokens} tokens: {account}", file=sys.stderr)
    return {"sharedPrefix": use, "sharedPrefixTokens": tokens if use else 0, "sharedPrefixReason": reason}


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def loss_scope(method: Method, fmt: str, train_on_inputs: bool) -> str:
    """Which tokens the loss covers, as reported in the start event."""
    if method == Method.dpo:
        return "preference"
    if train_on_inputs or fmt == "text":
        return "all"
    return "completion" if fmt == "prompt-completion" else "assistant"


def _last_loss(history: list[dict[str, Any]]) -> Optional[float]:
    for entry in reversed(history or []):
        if "loss" in entry:
            return entry["loss"]
    return None


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
