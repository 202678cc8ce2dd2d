# `make test` and `make demo` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test check lint format-check types wheel-check format demo sweep gpu-check clean

$(STAMP): pyproject.toml .ci/setup-venv
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/setup-venv
	touch $@

test: $(STAMP) check
	$(PY) -m pytest $(PYTEST_ARGS)

check: lint format-check types wheel-check  # the fast checks before the test suite; `make test` runs them first

lint: $(STAMP)  # ruff's rules, configured in pyproject.toml
	$(PY) -m ruff check .

format-check: $(STAMP)  # the formatter's layout (ruff format), configured in pyproject.toml
	$(PY) -m ruff format --check .

types: $(STAMP)  # mypy on the library's core modules, configured in pyproject.toml
	$(PY) -m mypy

wheel-check: $(STAMP)  # the sdist and wheel built, the wheel installed and smoke-tested (.ci/wheel-check)
	PY=$(PY) bash .ci/wheel-check

format: $(STAMP)  # rewrites files: ruff's safe fixes (import order, ...), then the formatter
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: $(STAMP)
	$(PY) -m triton_mebp demo

sweep: $(STAMP)
	$(PY) -m triton_mebp sweep --quick

gpu-check:  # on a machine with a CUDA GPU and its own PyTorch + Triton; installs nothing
	bash perf/gpu_check.sh perf/gpu-check-out

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
