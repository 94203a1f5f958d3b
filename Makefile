# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment first if it is missing (CPU torch 2.13.0; a GPU box installs its own torch
# build first, e.g. `pip install torch==2.13.0 --index-url ...cu12x`, then `pip install -e .`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(BIN)/medsynapse demo --output runs/demo

lint: venv
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache .ruff_cache
