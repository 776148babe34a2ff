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

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration" tests

bench: setup
	$(BIN)/python benchmarks/bench_population.py
	$(BIN)/python benchmarks/bench_meta.py

ui: setup
	$(BIN)/dynamo-dist ui runs/demo

clean:
	rm -rf runs .pytest_cache
