# Tessera. `make demo` runs the whole pipeline on the embedded synthetic set; `make test` runs the tests.
# Both set up the virtual environment first when it is missing or stale.
SHELL := /bin/bash
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= $(CURDIR)/demo-output
CONFIG ?= configs/demo.yaml
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-all ui lock clean bench-download

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@# img2dataset pulls in the `dataclasses` backport, which breaks Prefect's server.
	$(PY) -m pip uninstall --quiet --yes dataclasses 2>/dev/null || true
	@touch $@

demo: setup
	DEMO_DIR=$(DEMO_DIR) $(PY) -m tessera.cli demo --config $(CONFIG) --dir $(DEMO_DIR)

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

ui: setup
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

bench-download: setup
	$(PY) -m bench.download

lock: setup
	$(PY) -m pip freeze --all --exclude-editable | grep -v -E "^(pip|tessera|dataclasses)==" > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
