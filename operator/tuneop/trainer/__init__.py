"""The training program: `python -m tuneop.trainer --config FILE [--validate-only]`.

Runs inside the training pod (and locally under `tuneop run`). Heavy libraries (torch, transformers,
TRL, PEFT) are imported lazily inside functions so that `--validate-only` runs in a tiny pod.
"""
