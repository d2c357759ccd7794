# Every target installs what it needs first (idempotently), so each works on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: deps demo test test-fast bench lint fuzz clean

deps: $(STAMP)
	@command -v redis-server >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null || bash scripts/install-system-deps.sh

# The Tallyflow Tryton module (./tryton) is installed non-editable, as Tryton loads modules
# through their entry points; a change to it reinstalls it.
$(STAMP): pyproject.toml tryton/pyproject.toml $(wildcard tryton/tallyflow_tryton/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,tryton]'
	$(BIN)/pip install --quiet --force-reinstall --no-deps ./tryton
	rm -rf tryton/build tryton/*.egg-info
	touch $(STAMP)

demo: deps
	$(BIN)/tallyflow demo

test: deps
	$(BIN)/pytest -q

test-fast: deps
	$(BIN)/pytest -q -m "not integration"

bench: deps
	$(BIN)/tallyflow bench

FUZZ_SECONDS ?= 60
fuzz: deps
	$(BIN)/pip install --quiet -e '.[dev,fuzz]'
	mkdir -p .fuzz/corpus
	$(BIN)/python -m tests.fuzz.rating_target -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 .fuzz/corpus

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .fuzz *.egg-info
