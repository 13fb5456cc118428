# The two commands of the README: `make demo` and `make test`. Each sets itself up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
PROFILE ?= fashion32
# pytest-xdist workers of `make test` (one torch thread each)
TEST_WORKERS ?= 2

.PHONY: setup setup-demo demo test ui bench lint

# `make demo` and `make ui` install only what they need; `make test` adds the test tools and PostgreSQL
setup:
	@bash scripts/setup.sh test

setup-demo:
	@bash scripts/setup.sh demo

demo: setup-demo
	PROLOGUE_PROFILE=$(PROFILE) $(PY) -m assets.demo

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

ui: setup-demo
	PROLOGUE_PROFILE=$(PROFILE) $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: setup
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check .
