# Single entry point for people and CI alike.
#   make reproduce  - set up and run the main job (the paper reproduction)
#   make test       - set up, lint and run the whole test suite
#   make bench      - set up and run the benchmarks (JSON under benchmarks/out/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install

.PHONY: setup lint format test test-slow bench reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy src/dcem

format: setup
	$(PY) -m ruff format src tests benchmarks examples
	$(PY) -m ruff check --fix src tests benchmarks examples

test: lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	mkdir -p benchmarks/out
	$(PY) benchmarks/lml.py --out benchmarks/out/lml.json
	$(PY) benchmarks/optim.py --out benchmarks/out/optim.json
	$(PY) benchmarks/control.py --out benchmarks/out/control.json
	$(PY) benchmarks/planner.py --out benchmarks/out/planner.json
	$(PY) benchmarks/agent.py --out benchmarks/out/agent.json
	$(PY) benchmarks/phase2.py --out benchmarks/out/phase2.json
	$(PY) benchmarks/regression.py --out benchmarks/out/regression.json

reproduce: setup
	$(PY) -m dcem regression --out runs/regression

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
