# Two commands: `make demo` and `make test`. Each creates .venv and installs pinned
# requirements once (stamp files make a second run install nothing), then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# One worker more than the 2 cores: compiles are single-threaded and subprocess tests wait on their children.
TEST_WORKERS ?= 3
TEST_XLA_FLAGS ?= --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0
export PYTHONDONTWRITEBYTECODE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/clp-jax demo --out demo_out

test: $(VENV)/.dev
	XLA_FLAGS="$(TEST_XLA_FLAGS)" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

lint: $(VENV)/.dev
	$(BIN)/ruff check clp_jax tests scripts

clean:
	rm -rf demo_out .pytest_cache
