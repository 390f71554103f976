# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
# Everything lives in .venv (Python 3.12); pip's cache and an existing .venv are reused when present.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# First Python 3.12 that actually runs (a pyenv shim for a non-selected version exists but fails).
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
# The start-up hook: wheel data that `maturin develop` copies into site-packages.
HOOK_FILES := $(addprefix packaging/wheel-data/purelib/simpletuner_lcm_hook,.pth .py)
RUST_SOURCES := Cargo.toml Cargo.lock $(shell find rust -name '*.rs' -o -name Cargo.toml 2>/dev/null)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test setup develop rust-test py-test bench gpu-check clean

demo: develop
	$(VENV)/bin/simpletuner-lcm demo

# The cargo test build (both cores) runs beside pip's install (mostly one core unpacking wheels) on a fresh machine.
test:
	$(MAKE) -j2 setup rust-test
	$(MAKE) py-test

setup: $(DEPS_STAMP)

develop: $(BUILD_STAMP)

$(PY):
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (SimpleTuner 4.10 needs it); set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(DEPS_STAMP): $(PY) requirements-dev.txt
	# --no-compile: Python compiles the few thousand modules it imports when it first imports them; pip would
	# compile all ~27,000 files of torch, SimpleTuner and their dependencies (~2 minutes of one core).
	$(PY) -m pip install --no-compile -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) pyproject.toml $(RUST_SOURCES) $(HOOK_FILES)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release
	touch $@

# Beside pip under `make -j2`, cargo would find make's jobserver advertised but not passed to it: it keeps its own.
rust-test:
	MAKEFLAGS= cargo test --workspace --locked

# Most tests wait on one single-threaded trainer subprocess: two workers keep both cores of a CI machine busy.
PYTEST_WORKERS ?= 2

py-test: develop
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=25

bench: develop
	$(PY) bench/step.py
	$(PY) bench/data.py
	$(PY) bench/hook_startup.py

# The whole product on CUDA (about 8 minutes on one H100), one markdown table; a CPU mode by itself without a GPU.
gpu-check: develop
	$(PY) bench/gpu_check.py

clean:
	rm -rf target $(BUILD_STAMP)
