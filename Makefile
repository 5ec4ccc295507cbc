# The two commands of the README: `make demo` (set-up + main job) and `make test` (set-up + tests).
# Both run in the project's own virtual environment (.venv, made when missing), so a fresh clone installs
# everything from the declared dependencies and nothing else: what the machine happens to hold does not count.
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench lint

# System packages for the C++ runtime's core (export/cpp): installed only when missing.
APT_PACKAGES = cmake g++ libpng-dev nlohmann-json3-dev

$(PYTHON):
	$(BASE_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

setup: $(PYTHON)
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; } || \
		echo "warning: could not install $(APT_PACKAGES); the C++ runtime tests will fail" >&2
	$(PYTHON) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet -e ".[dev,openvino,serve,cohort]"

demo: setup
	$(PYTHON) -m timm_inception_pcam.pipeline --output $(DEMO_DIR) --overwrite

# Each test file runs in a process of its own, so one file's native state (threads, signal handlers, AMX state of
# torch, OpenVINO, onnxruntime, Ray) cannot reach another's: see the README's "Testing" note for the crash that did.
TEST_FILES = $(sort $(wildcard tests/test_*.py))

# pytest's status 5 ("no tests collected") is a file skipped whole at collection (e.g. GPU-only): not a failure here.
test: setup
	@status=0; failed=""; for f in $(TEST_FILES); do \
		echo "=== $$f"; $(PYTHON) -m pytest -q -p no:cacheprovider "$$f"; rc=$$?; \
		if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then status=1; failed="$$failed $$f"; fi; \
	done; \
	if [ $$status -ne 0 ]; then echo "make test: failed:$$failed"; else echo "make test: every test file passed"; fi; \
	exit $$status

bench: setup
	$(PYTHON) -m benchmarks.run --output benchmarks/results

lint: setup
	$(PYTHON) -m ruff check .
