# polbench: `make run` (dashboard on :8501) and `make test` (the full default test run), from a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501
DB ?= data/polbench.duckdb
RUN_STAMP := $(VENV)/.run-$(shell cat requirements.txt | md5sum | cut -c1-12)
DEV_STAMP := $(VENV)/.dev-$(shell cat requirements.txt requirements-sim.txt requirements-dev.txt | md5sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: run test test-all demo bench lint clean-venv chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-sim.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@ $(RUN_STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

## run: set up, build the demo database when missing, serve the dashboard on $(PORT)
run: $(RUN_STAMP)
	@test -f $(DB) || $(PY) -m polcore demo --db $(DB)
	$(PY) -m streamlit run app.py --server.port $(PORT) --server.headless true

## test: set up (venv, packages, chromium) and run the default test suite (slow tests excluded)
test: $(DEV_STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

## test-all: every test, the slow ones included
test-all: $(DEV_STAMP) chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(RUN_STAMP)
	$(PY) -m polcore demo --db $(DB)

bench: $(RUN_STAMP)
	$(PY) -m polcore bench --db $(DB)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
