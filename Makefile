# The two commands of the README:
#   make quickstart   set up .venv and fine-tune the offline quickstart with `tuneop run`
#   make test         set up .venv and run the whole test suite (what CI runs)
VENV ?= .venv
export OMP_NUM_THREADS ?= 1

.PHONY: setup setup-test quickstart test test-fast test-images lint crds images base-image lock

setup:
	bash scripts/setup.sh

quickstart: setup
	OMP_NUM_THREADS=$${QUICKSTART_THREADS:-$$(nproc)} $(VENV)/bin/tuneop run examples/quickstart/finetune.yaml

setup-test:
	bash scripts/setup.sh --serving

# The suite, then the images built and run as a cluster runs them (where Docker can be started;
# elsewhere scripts/test-images.sh says so in one line and goes on).
test: setup-test lint
	$(VENV)/bin/python -m pytest -q
	bash scripts/test-images.sh

# ruff (pyflakes, pycodestyle, bugbear, import order) and mypy (strict on the API models, builders and
# reconcilers): pyproject [tool.ruff], [tool.mypy]
lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test-images: setup-test
	bash scripts/test-images.sh

test-fast: setup-test
	$(VENV)/bin/python -m pytest -q -m "not slow"

crds: setup
	$(VENV)/bin/tuneop crds --out crds --reference docs/reference.md
	cp crds/*.yaml charts/tuneop/crds/

# operator, trainer-cpu, vllm-cpu (IMAGES="operator trainer" for others); BASE_IMAGE=... to build on
# another base, e.g. the one `make base-image` makes from Debian's packages where no registry is reachable.
images:
	bash scripts/build-images.sh $(IMAGES)

base-image:
	bash scripts/base-image.sh

# constraints.txt from the full environment (after a dependency change)
lock: setup-test
	bash scripts/lock.sh
