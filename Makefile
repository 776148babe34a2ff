# dynamo_dist — the two commands the README promises, plus helpers.
#   make demo   create .venv, install, run the demo pipeline (in-process Ray, SQLite MLflow store)
#   make test   create .venv, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo smoke test test-fast bench ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/dynamo-dist run --config configs/demo.yaml

smoke: setup
	$(BIN)/dynamo-dist run --config configs/smoke.yaml

# TEST_WORKERS=3 runs test files in parallel workers, one file to a worker (its module fixtures, a Ray or a
# server, start once): most of the suite's wall time is waiting on Ray start-up, servers and subprocesses,
# which overlaps even on 2 cores (1.96x, benchmarks/RESULTS.md row 51). The default, 0, is one process:
# on a loaded 2-core machine parallel files made Ray-timing tests flaky (a job agent not up in time, a
# killed actor's CPU not yet free, another file's Ray answering a port probe), and CI must not flake.
TEST_WORKERS ?= 0
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST) tests

test-fast: setup
	$(PYTEST) -m "not integration" tests

bench: setup
	$(BIN)/python benchmarks/bench_population.py
	$(BIN)/python benchmarks/bench_meta.py

ui: setup
	$(BIN)/dynamo-dist ui runs/demo

clean:
	rm -rf runs .pytest_cache
