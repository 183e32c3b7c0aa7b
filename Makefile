# fluentforward developer commands. `make run` and `make test` are the two set-up commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NODE_DIR := tests/interop/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed-stamp
SRC := fluentforward tests bench examples

.PHONY: install run test lint fmt typecheck pytest check bench fuzz soak node clean chart-lint

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The npm fluent-logger client for the interop tests (Node.js and npm are on the machine).
node: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json
	cd $(NODE_DIR) && npm install --no-audit --no-fund --no-package-lock --loglevel=error
	touch $(NODE_STAMP)

run: install
	$(BIN)/fluentforward serve

lint: install
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

fmt: install
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

typecheck: install
	$(BIN)/mypy

pytest: install node
	$(BIN)/pytest

test: lint typecheck pytest

check: test

# No helm binary is needed: the chart is rendered, linted and validated by the test suite.
chart-lint: install
	$(BIN)/pytest tests/test_chart.py -q

bench: install
	$(PY) -m bench.run

fuzz: install
	FLUENTFORWARD_FUZZ_FRAMES=1000000 $(BIN)/pytest tests/test_fuzz.py -p no:randomly -q

soak: install
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .mypy_cache .ruff_cache .pytest_cache
