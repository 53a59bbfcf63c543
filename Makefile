# The two commands of the README:
#   make quickstart   set up .venv and fine-tune the offline quickstart with `tuneop run`
#   make test         set up .venv and run the whole test suite (what CI runs)
VENV ?= .venv
export OMP_NUM_THREADS ?= 1

.PHONY: setup setup-test quickstart test test-fast crds images

setup:
	bash scripts/setup.sh

quickstart: setup
	OMP_NUM_THREADS=$${QUICKSTART_THREADS:-$$(nproc)} $(VENV)/bin/tuneop run examples/quickstart/finetune.yaml

setup-test:
	bash scripts/setup.sh --serving

test: setup-test
	$(VENV)/bin/python -m pytest -q

test-fast: setup-test
	$(VENV)/bin/python -m pytest -q -m "not slow"

crds: setup
	$(VENV)/bin/tuneop crds --out crds --reference docs/reference.md
	cp crds/*.yaml charts/tuneop/crds/

images:
	bash scripts/build-images.sh
