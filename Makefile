PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

include deploy/image.mk

.PHONY: install test lint types contracts pytest demo bench bench-authz bench-controlplane bench-meter image clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check gateway controlplane tests benchmarks
	$(BIN)/ruff format --check gateway controlplane tests benchmarks

types: $(STAMP)
	$(BIN)/mypy gateway controlplane

contracts: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

test: lint types contracts pytest

demo: $(STAMP)
	$(BIN)/maas demo $(DEMO_ARGS)

bench-authz: $(STAMP)
	$(BIN)/python -m benchmarks authz

bench-controlplane: $(STAMP)
	$(BIN)/python -m benchmarks controlplane

bench-meter: $(STAMP)
	$(BIN)/python -m benchmarks meter

bench: $(STAMP)
	$(BIN)/python -m benchmarks all

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
