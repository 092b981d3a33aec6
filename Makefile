# `make run` and `make test` create the virtual environment from the lock file
# on first use, so each is the only command a fresh clone needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Metaflow names runs after the user and ignores the name root, so root gets
# a stand-in name.
METAFLOW_USER ?= $(if $(filter root,$(shell id -un)),tabmodel,$(shell id -un))
export METAFLOW_USER

.PHONY: run test lint

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: $(VENV)/.installed
	$(BIN)/python flows/income_flow.py run

test: $(VENV)/.installed
	$(BIN)/ruff check .
	bash .ci/terraform-check
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
