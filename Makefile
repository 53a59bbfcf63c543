# The two commands of the README:
#   make quickstart   set up .venv and fine-tune the offline quickstart with `tuneop run`
#   make test         set up .venv and run the whole test suite (what CI runs)
VENV ?= .venv
export OMP_NUM_THREADS ?= 1

.PHONY: setup quickstart test test-fast crds lint

setup:
	bash scripts/setup.sh

quickstart: setup
	OMP_NUM_THREADS=$${QUICKSTART_THREADS:-$$(nproc)} $(VENV)/bin/tuneop run examples/quickstart/finetune.yaml

test: setup
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"

crds: setup
	$(VENV)/bin/tuneop crds --out crds
