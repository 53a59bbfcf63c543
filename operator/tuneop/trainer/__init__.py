"""The training program: `python -m tuneop.trainer --config FILE [--validate-only]`.

Runs inside the training pod (and locally under `tuneop run`); see docs/ARCHITECTURE.md for the
contract (events on stdout, progress.json, adapter layout, termination message, exit codes).

Modules:
  main       argument parsing, orchestration, error -> termination message / exit code
  config     job config parsing and the pure decisions: precision, gradient checkpointing,
             steps, TrainingArguments mapping, and the speed plan (batching of mixed lengths:
             padded / padding-free / group_by_length; Liger kernels; torch.compile; compact LM head)
  data       dataset checks (--validate-only), loading, seeded validation hold-out
  paths      model sources (hub id, directory, .gguf, pkg://), URL downloads, checkpoints of a
             training fingerprint and their commit markers (which one to resume, which to remove)
  model      model/tokenizer loading, GGUF fix-ups, LoRA/QLoRA, the training chat template
  callbacks  TrainerCallbacks: start/progress/eval/checkpoint events (+ tqdm on stderr), checkpoint
             commit markers and rotation, the time budget, stopping on SIGTERM
  termination  SIGTERM: stop after the step (or at once outside training), exit 143, the watchdog
  progress   bar or plain lines for people (TUNEOP_PROGRESS), the `evaluating` events
  evaluate   exact-match evaluation by greedy generation (base vs adapter)
  manifest   tuneop-manifest.json, file hashes, atomic swap of <output>/adapter, baseModelInfo, reuse
  events     JSON-line emitter, progress.json, termination message
  errors     TrainerError and the reasons reported to the operator

Heavy libraries (torch, transformers, TRL, PEFT, datasets) are imported lazily inside functions:
`--validate-only` runs in a small CPU pod and imports none of them.
"""
