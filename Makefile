# polbench: `make run` (dashboard on :8501) and `make test` (the full default test run), from a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501
DB ?= $(or $(POLBENCH_DB),data/polbench.duckdb)
# the demo build's status file (read by the Overview page) and log, next to the database
DEMO_STATUS := $(dir $(DB))demo_status.json
DEMO_LOG := $(dir $(DB))demo_build.log
# TORCH_INDEX=cpu: torch/torchvision from PyTorch's CPU-only index (no CUDA libraries: ~5 GB less disk);
# empty (the default): PyPI's wheels, with CUDA. Takes effect when the venv is created (make clean-venv first).
TORCH_INDEX ?=
TORCH_PINS := $(shell grep -E '^torch(vision)?==' requirements.txt)
TORCH_FIRST = $(if $(TORCH_INDEX),$(PY) -m pip install -q $(TORCH_PINS) --index-url https://download.pytorch.org/whl/$(TORCH_INDEX))
RUN_STAMP := $(VENV)/.run-$(shell cat requirements.txt | md5sum | cut -c1-12)
DEV_STAMP := $(VENV)/.dev-$(shell cat requirements.txt requirements-sim.txt requirements-dev.txt | md5sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: run test test-all demo study bench lint clean-venv chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): requirements.txt | $(PY)
	$(TORCH_FIRST)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-sim.txt requirements-dev.txt | $(PY)
	$(TORCH_FIRST)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@ $(RUN_STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

## run: set up, serve the dashboard on $(PORT) at once; when the database is missing (or its build did not
## finish) the demo is built beside it from the shipped models (never trained), in its own process: one at a
## time (a lock), progress on the Overview page, output in $(DEMO_LOG); it goes on if the dashboard stops.
run: $(RUN_STAMP)
	@mkdir -p $(dir $(DB))
	@nohup $(PY) -m polcore demo --db $(DB) --profile shipped --if-needed --status-file $(DEMO_STATUS) \
	  >> $(DEMO_LOG) 2>&1 < /dev/null &
	@echo "serving now; the demo database is built beside the dashboard when missing (about 5 min): progress on the Overview page, log $(DEMO_LOG)"
	POLBENCH_DB=$(DB) $(PY) -m streamlit run app.py --server.port $(PORT) --server.headless true

## test: set up (venv, packages, chromium) and run the default test suite (slow tests excluded)
test: $(DEV_STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

## test-all: every test, the slow ones included
test-all: $(DEV_STAMP) chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(RUN_STAMP)
	$(PY) -m polcore demo --db $(DB)

## study: the study's full comparison: train the paper profile (every family and head at the paper's settings,
## five seeds; resumable), ingest the default scans with those models beside the shipped ones, benchmark.
## Days on a CPU (README, "Models"); for a GPU.
study: $(RUN_STAMP)
	$(PY) -m polcore train --profile paper
	$(PY) -m polcore demo --profile paper --db $(DB)

bench: $(RUN_STAMP)
	$(PY) -m polcore bench --db $(DB)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
