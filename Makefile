# The two README commands:
#   make demo   set up everything, then `dvc repro` the demo pipeline on the embedded dataset
#   make test   set up everything, then run the test suite
# Everything is installed from this repository's own files: requirements.lock pins every
# Python package; the system packages come from Debian (apt) when missing.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONUNBUFFERED := 1

# promtool (alert-rule tests), PostgreSQL (feedback store tests), chromium (review page browser
# tests: Playwright drives Debian's /usr/bin/chromium; `playwright install` would download one)
SYSTEM_PACKAGES := prometheus postgresql chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup system-deps repro metrics plots mlflow-ui serve clean help

help:
	@echo "make demo       - install, then run the demo pipeline (dvc repro) on the embedded dataset"
	@echo "make test       - install, then run the tests"
	@echo "make repro      - rerun the pipeline stages whose code, data or params changed (dvc repro)"
	@echo "make metrics    - print the pipeline's metrics (dvc metrics show)"
	@echo "make plots      - write the plots page dvc_plots/index.html (dvc plots show)"
	@echo "make mlflow-ui  - browse runs and registered models at http://127.0.0.1:5000"
	@echo "make serve      - serve the champion model over HTTP on http://127.0.0.1:3000"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (medattn needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable '.[test]'
	touch $@

system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  $(SUDO) service postgresql stop >/dev/null 2>&1 || true; \
	  $(SUDO) service prometheus stop >/dev/null 2>&1 || true; \
	fi

demo: setup
	$(BIN)/dvc repro
	@echo
	@echo "Next, in any shell: make metrics | make plots | make mlflow-ui | make serve"
	@echo "or first 'source .venv/bin/activate', then: dvc metrics show | dvc plots show | dvc repro | medattn model info"
	@echo "Figures: reports/*/figures/"

repro: setup
	$(BIN)/dvc repro

metrics: setup
	$(BIN)/dvc metrics show

plots: setup
	$(BIN)/dvc plots show

# Test files run in parallel, one file per worker (its module fixtures stay in one process), one
# worker per core up to 4: most of the suite is single-threaded Python (stage processes, servers
# starting, a browser) with torch held at one thread, so on 2 cores it runs about twice as fast.
# PYTEST_PARALLEL= (empty) runs it in one process.
PYTEST_PARALLEL ?= --numprocesses=auto --maxprocesses=4 --dist=loadfile

test: setup system-deps
	@# pytest exits 5 when it collected no test: the suite went missing, which must not pass quietly
	$(BIN)/python -m pytest $(PYTEST_PARALLEL); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$status

mlflow-ui: setup
	$(BIN)/medattn mlflow-ui

serve: setup
	$(BIN)/medattn serve

clean:
	rm -rf data models reports checkpoints
