# The two commands of the README: `make demo` (set-up + main job) and `make test` (set-up + tests).
PYTHON ?= python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench lint

setup:
	$(PYTHON) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: setup
	$(PYTHON) -m timm_inception_pcam.pipeline --output $(DEMO_DIR)

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m benchmarks.run --output benchmarks/results

lint:
	$(PYTHON) -m ruff check .
