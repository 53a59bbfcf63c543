"""TrainerCallback turning Trainer events into tuneop's JSON-line events (and a tqdm bar)."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Optional

from transformers import TrainerCallback

from . import config as C
from .events import Emitter
from .paths import (
    CHECKPOINT_MARKER,
    KEEP_CHECKPOINTS,
    list_checkpoints,
    plan_checkpoints,
    remove_checkpoints,
    write_marker,
)


def eta_seconds(done_steps: int, elapsed: float, remaining_steps: int) -> Optional[int]:
    if done_steps <= 0 or elapsed <= 0:
        return None
    return int(round(elapsed / done_steps * max(0, remaining_steps)))


def _round(x: Any, digits: int = 6) -> Any:
    return round(float(x), digits) if isinstance(x, (int, float)) else x


def checkpoint_dir(args, state) -> str:
    """The directory Trainer has just saved the checkpoint of this step to."""
    return os.path.join(args.output_dir, f"checkpoint-{int(state.global_step)}")


def gpu_peak_bytes() -> Optional[int]:
    """Peak memory the CUDA caching allocator handed out so far (None without CUDA)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001
        pass
    return None


class EventCallback(TrainerCallback):
    def __init__(
        self,
        emitter: Emitter,
        start_info: dict[str, Any],
        progress_bar: bool = False,
        clock: Callable[[], float] = time.monotonic,
        budget: Optional["TimeBudget"] = None,
    ):
        self.emitter = emitter
        self.budget = budget
        self.start_info = start_info
        self.progress_bar = progress_bar
        self.clock = clock
        self.t0: Optional[float] = None
        self.step0 = 0
        self.tokens0 = 0
        self.total_steps: Optional[int] = None
        self.step_started: Optional[float] = None
        self.train_seconds = 0.0  # time inside optimizer steps: excludes evaluation and saving
        self.last_eval_step: Optional[int] = None
        self.train_metrics: dict[str, Any] = {}
        self.last_eval: Optional[dict[str, Any]] = None
        self.last_tokens_per_second: Optional[float] = None
        self._bar = None
        self._eval_bar = None

    # -- helpers
    def _main(self, state) -> bool:
        return bool(state.is_world_process_zero)

    def _tokens_per_second(self, state) -> Optional[float]:
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self.tokens0
        if self.train_seconds <= 0 or tokens <= 0:
            return None
        return round(tokens / self.train_seconds, 1)

    # -- Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.clock()
        self.step0 = int(state.global_step or 0)
        self.tokens0 = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.total_steps = int(state.max_steps or 0) or None
        if not self._main(state):
            return
        self.emitter.emit({"event": "start", **self.start_info, "total_steps": self.total_steps, "step": self.step0})
        if self.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total_steps, initial=self.step0, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_started is not None:
            self.train_seconds += self.clock() - self.step_started
            self.step_started = None
        if self._bar is not None:
            self._bar.update(int(state.global_step) - self._bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "train_loss" in logs:  # the summary logged once at the end of training
            self.train_metrics.update(logs)
            return
        if "loss" not in logs or not self._main(state):
            return
        step = int(state.global_step)
        elapsed = self.clock() - (self.t0 or self.clock())
        tps = self._tokens_per_second(state)
        if tps is not None:
            self.last_tokens_per_second = tps
        total = self.total_steps or int(state.max_steps or 0)
        if self.budget is not None and self.budget.expected_steps:
            total = self.budget.expected_steps  # the step the time budget will end at
        event = {
            "event": "progress",
            "step": step,
            "total_steps": total,
            "epoch": _round(state.epoch or 0.0, 4),
            "loss": _round(logs.get("loss")),
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_second": tps,
            "eta_seconds": eta_seconds(step - self.step0, elapsed, total - step),
            # cumulative, so a reader can take the rate over any window (benchmarks skip warm-up steps)
            "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0),
            "train_seconds": round(self.train_seconds, 4),
        }
        peak = gpu_peak_bytes()
        if peak is not None:
            event["gpu_peak_bytes"] = peak
        self.emitter.emit(event)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None
        self.last_eval_step = int(state.global_step)
        if not self._main(state) or not metrics:
            return
        event = {"event": "eval", "step": int(state.global_step)}
        for key, value in metrics.items():
            if key in ("eval_loss",) or key.startswith("eval_rewards/"):
                event[key] = _round(value)
        self.last_eval = event
        self.emitter.emit(event)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self.progress_bar or not self._main(state):
            return
        if self._eval_bar is None:
            from tqdm.auto import tqdm

            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
            self._eval_bar = tqdm(total=total, desc="evaluating", unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True)
        self._eval_bar.update(1)

    def on_save(self, args, state, control, **kwargs):
        if not self._main(state):
            return
        self.emitter.emit({"event": "checkpoint", "step": int(state.global_step), "path": checkpoint_dir(args, state)})

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


BUDGET_FILE = "tuneop-budget.json"  # older trainers' file of the budget spent; now in the checkpoint's marker


def spent_before(checkpoint: Optional[str]) -> float:
    """Budget seconds spent before `checkpoint`: `elapsed_seconds` of its commit marker (or of an older
    trainer's tuneop-budget.json); 0 for a fresh run or a checkpoint that recorded none."""
    if not checkpoint:
        return 0.0
    for name in (CHECKPOINT_MARKER, BUDGET_FILE):
        try:
            with open(os.path.join(checkpoint, name), encoding="utf-8") as f:
                value = json.load(f).get("elapsed_seconds")
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if value is not None:
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return 0.0
    return 0.0


class CheckpointMarker(TrainerCallback):
    """Declares each checkpoint complete once Trainer has saved it: writes its commit marker
    (paths.write_marker: fingerprint, step, and the time budget spent up to it), then removes the complete
    checkpoints older than the newest KEEP_CHECKPOINTS (Trainer's own rotation is off: it runs before the
    marker, so a kill between the two could leave no complete checkpoint). Rank 0 only."""

    def __init__(self, fingerprint: str, budget: Optional["TimeBudget"] = None, keep: int = KEEP_CHECKPOINTS):
        self.fingerprint = fingerprint
        self.budget = budget
        self.keep = keep
        self.last: Optional[tuple[int, str]] = None  # (step, path) of the newest complete checkpoint

    def marker_fields(self) -> dict[str, Any]:
        if self.budget is None:
            return {"elapsed_seconds": None, "budget_seconds": None}
        return {"elapsed_seconds": round(self.budget.elapsed, 3), "budget_seconds": self.budget.budget}

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = checkpoint_dir(args, state)
        step = int(state.global_step)
        write_marker(path, self.fingerprint, step, self.marker_fields())
        self.last = (step, path)
        root = os.path.dirname(os.path.abspath(args.output_dir))  # <output>/checkpoints
        plan = plan_checkpoints(self.fingerprint, list_checkpoints(root, self.fingerprint), self.keep)
        remove_checkpoints(root, plan["rotate"])


class StopOnSignal(TrainerCallback):
    """SIGTERM during training (termination.Termination raised its flag): end training after the current
    step, saving a checkpoint (without the evaluation that step may have been due for). Under DDP rank 0
    decides for every rank with one collective a step (the maximum of the ranks' flags: a signal seen by
    any rank stops all), so every rank stops at the same step."""

    def __init__(self, termination: Any, sync: Any = "auto"):
        """termination: has `requested` (None until a signal arrived). sync: "auto" (torch.distributed when
        initialized at train begin), None, or a function taking [flag] and returning the agreed values."""
        self.termination = termination
        self.sync = sync
        self.stopped_at: Optional[int] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.sync == "auto":
            self.sync = distributed_sync(op="max")

    def on_step_end(self, args, state, control, **kwargs):
        stop = stop_requested(self.termination.requested is not None, self.sync)
        if stop:
            self.stopped_at = int(state.global_step)
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_log = True
        return control


def stop_requested(local: bool, sync: Optional[Callable[[list[float]], list[float]]]) -> bool:
    """This rank's flag, agreed with the other ranks when there are any."""
    if sync is None:
        return local
    return sync([1.0 if local else 0.0])[0] > 0.5


class TimeBudget(TrainerCallback):
    """hyperparameters.maxTrainSeconds: stops training before a step would overrun the budget and keeps
    the fraction of the budget spent (`progress`) for the LR schedule on time (config.budget_lr_factor).
    The time counts the whole training loop (steps, checkpoint saves, validation), from train begin;
    a resumed run starts from what its checkpoint had spent. Under DDP rank 0's clock decides for all
    ranks (one broadcast a step), so every rank stops at the same step with the same LR."""

    def __init__(
        self,
        budget_seconds: float,
        scheduler: str,
        warmup: float,
        spent: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sync: Any = "auto",
    ):
        """sync: "auto" (torch.distributed when it is initialized at train begin), None, or a function
        taking [elapsed, stop] and returning rank 0's values."""
        self.budget = float(budget_seconds)
        self.scheduler = scheduler
        self.warmup = float(warmup)
        self.spent0 = float(spent)
        self.clock = clock
        self.sync = sync
        self.t0: Optional[float] = None
        self.step0 = 0
        self.max_steps = 0
        self.elapsed = float(spent)
        self.progress = 0.0
        self.stopped = False
        self.expected_steps: Optional[int] = None

    def lr_factor(self, _step: int = 0) -> float:
        """LambdaLR's lr_lambda: the step count is ignored, the budget spent decides."""
        return C.budget_lr_factor(self.scheduler, self.progress, self.warmup)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.sync == "auto":  # the process group exists once Trainer set up its devices
            self.sync = distributed_sync()
        self.t0 = self.clock()
        self.step0 = int(state.global_step or 0)
        self.max_steps = int(state.max_steps or 0)
        self.progress = C.budget_progress(self.elapsed, self.budget, self.step0, self.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        step = int(state.global_step)
        run_seconds = self.clock() - self.t0
        elapsed = self.spent0 + run_seconds  # a resumed run's earlier time is spent, not part of the pace
        pace = C.budget_pace(run_seconds, step - self.step0)
        stop = C.budget_should_stop(elapsed, self.budget, pace)
        if self.sync is not None:
            elapsed, flag = self.sync([elapsed, 1.0 if stop else 0.0])
            stop = flag > 0.5
        self.elapsed = elapsed
        self.progress = C.budget_progress(elapsed, self.budget, step, self.max_steps)
        self.expected_steps = step if stop else C.budget_expected_steps(step, elapsed, self.budget, pace, self.max_steps)
        if stop and not control.should_training_stop:
            self.stopped = True
            control.should_training_stop = True
            control.should_log = True  # the last loss of a run the budget ended
            # and its checkpoint: a pod restarted later (evicted during the test evaluation) resumes at the
            # end of the budget instead of training again from the last periodic save
            control.should_save = True
        return control



def distributed_sync(op: str = "broadcast") -> Optional[Callable[[list[float]], list[float]]]:
    """Under torch.distributed: a function agreeing on values across ranks (op "broadcast": rank 0's values;
    "max": the largest of each value over the ranks); else None."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return None
        if torch.distributed.get_world_size() <= 1:
            return None
    except Exception:  # noqa: BLE001
        return None
    dist = torch.distributed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"

    def sync(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if op == "max":
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        else:
            dist.broadcast(t, src=0)
        return [float(x) for x in t.tolist()]

    return sync
