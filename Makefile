# Tessera. `make demo` runs the whole pipeline on the embedded synthetic set; `make test` runs the tests.
# Both set up the virtual environment first when it is missing or stale.
SHELL := /bin/bash
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= $(CURDIR)/demo-output
CONFIG ?= configs/demo.yaml
# PREFECT_HOME: Prefect's own default (~/.prefect) unless you set it, as `tessera` leaves it, so
# `make ui` shows the runs started from make and from `tessera` alike.
export PREFECT_HOME ?= $(HOME)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast ui lock clean fetch-models status stage1 stage2 sample eval bench-train bench-sample bench-gpu gpu-kit bench-download bench-ingest bench-score bench-scale bench-scale-driver report-screenshot

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
	DEMO_DIR=$(DEMO_DIR) $(PY) -m tessera.cli demo --config $(CONFIG) --dir $(DEMO_DIR) $(SET_ARGS)

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -m "not slow" -q

# SET: overrides, as a shell would split them, e.g. SET='stage1.max_steps=10 sample.prompts=["a red circle"]'.
# They reach the CLI as one argument (--sets), so values with spaces stay whole.
SET ?=
quote = '$(subst ','"'"',$(1))'
SET_ARGS = $(if $(strip $(SET)),--sets $(call quote,$(SET)))

# Models: every model CONFIG names, downloaded once into its models_root and verified; runs then
# find them there offline. Status: shards done, failed and to do per stage, the funnel, checkpoints.
fetch-models: setup
	HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 $(PY) -m tessera.cli fetch-models $(CONFIG) $(SET_ARGS)

status: setup
	$(PY) -m tessera.cli status $(CONFIG) $(SET_ARGS)

# The Prefect server (`make ui`) asks every client for the auth string in PREFECT_HOME/api_auth_string
# (created 0600 on first use; the browser UI asks for it once) and checks CSRF tokens; `make deploy`,
# `make serve` and `make worker` present it. See docs/security.md.
PREFECT_AUTH_FILE ?= $(PREFECT_HOME)/api_auth_string
PREFECT_SERVER_ENV = PREFECT_SERVER_API_AUTH_STRING="$$(cat $(PREFECT_AUTH_FILE))" \
	PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED=true PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS=http://127.0.0.1:4200
PREFECT_CLIENT_ENV = PREFECT_API_AUTH_STRING="$$(cat $(PREFECT_AUTH_FILE))" PREFECT_CLIENT_CSRF_SUPPORT_ENABLED=true

ui: setup
	$(PY) -m tessera.core.secretfile $(PREFECT_AUTH_FILE)
	$(PREFECT_SERVER_ENV) $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

bench-download: setup
	$(PY) -m bench.download

bench-ingest: setup
	$(PY) -m bench.ingest

# Filtering: the one-pass scorer against one pass per filter, and a headless-browser screenshot
# of the demo's filter report (run `make demo` first; needs chromium, not needed by the tests).
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
bench-score: setup
	$(PY) -m bench.score

# Select and the filter report on synthetic score shards at LAION's shape (SCALE_BENCH to change,
# e.g. SCALE_BENCH="--sizes 100000:500,100000:2000"; docs/scale.md).
SCALE_BENCH ?=
bench-scale: setup
	$(PY) -m bench.scale $(SCALE_BENCH)

# The driver's own cost per shard (markers, lineage, restamps, token manifests), 1,000 to 100,000 shards.
bench-scale-driver: setup
	$(PY) -m bench.scale_driver

report-screenshot:
	@test -n "$(CHROMIUM)" || { echo "No chromium found: open $(DEMO_DIR)/data/reports/report.html in a browser."; exit 1; }
	@test -f $(DEMO_DIR)/data/reports/report.html || { echo "No report yet: run make demo first."; exit 1; }
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,4000 \
		--screenshot=$(DEMO_DIR)/report.png file://$(DEMO_DIR)/data/reports/report.html
	@echo "Screenshot of the filter report: $(DEMO_DIR)/report.png"

# Training and sampling: stage 1 (256px), stage 2 (512px, from the stage-1 weights), a PNG grid of
# samples. RUN names the run under runs_root (default: the config's name); SET adds overrides,
# e.g. make stage1 SET="stage1.max_steps=10". Rerunning a stage resumes from its newest checkpoint.
RUN ?=
TRAIN_ARGS = --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(SET_ARGS)
stage1: setup
	$(PY) -m tessera.cli stage1 $(TRAIN_ARGS)

stage2: setup
	$(PY) -m tessera.cli stage2 $(TRAIN_ARGS)

sample: setup
	$(PY) -m tessera.cli sample $(TRAIN_ARGS)

# Evaluation of the run's checkpoints (eval.checkpoints: untrained, stage1, stage2) and the tokenizer.
eval: setup
	$(PY) -m tessera.cli eval $(TRAIN_ARGS)

bench-train: setup
	$(PY) -m bench.train

bench-sample: setup
	$(PY) -m bench.sample

# On a GPU machine, without network (docs/gpu.md): `make gpu-kit` here (network, LLAMAGEN_SRC: a
# LlamaGen checkout outside this repository) puts the wheels and LlamaGen's model code the GPU run
# needs in gpu-kit/ (ignored, at most 60 MB); `make bench-gpu` there unpacks them beside the machine's
# own torch and runs bench.gpu_validate (training, sampling and scoring checks, under 10 minutes).
LLAMAGEN_SRC ?=
GPU_KIT ?= gpu-kit
GPU_OUT ?= bench-output/gpu-validate
gpu-kit:
	$(PYTHON_BOOT) -m bench.gpu_kit build --out $(GPU_KIT) $(if $(LLAMAGEN_SRC),--llamagen-src $(LLAMAGEN_SRC))

bench-gpu:
	python3 -m bench.gpu_kit unpack --kit $(GPU_KIT)
	PYTHONPATH=$(CURDIR)/$(GPU_KIT)/site:$(CURDIR) python3 -m bench.gpu_validate --out $(GPU_OUT)

# Tokenize: a PNG grid of code-shard samples decoded beside their original images (run `make demo`
# first; VISUAL_SET points it at the demo's output), and the encoding / shard-read benchmark.
VISUAL_SET ?= data_root=$(DEMO_DIR)/data models_root=$(DEMO_DIR)/models
.PHONY: visual-check bench-tokenize
visual-check: setup
	$(PY) -m tessera.demo.visual_check --config $(CONFIG) $(foreach s,$(VISUAL_SET),--set $(s))

bench-tokenize: setup
	$(PY) -m bench.tokenize

# Caption: captions/s of the LLaVA caption actor at batch sizes 1, 8 and 32 (tiny LLaVA on CPU by
# default; CAPTION_BENCH="--model llava-hf/llava-1.5-7b-hf --device cuda" on a GPU node).
CAPTION_BENCH ?=
.PHONY: bench-caption
bench-caption: setup
	$(PY) -m bench.caption $(CAPTION_BENCH)

# The demo's scoring models and captioner, trained on its synthetic world. Bit for bit reproducible on
# the CPU they were pinned on (tessera/models/world_weights/PINNED_CPU: an Intel Xeon, family 6
# model 167, torch's AVX512 kernels, one thread); world-models-check retrains all four and compares
# sha256, printing that CPU and this one. On another CPU the bits differ; the slow test in
# tests/test_world_models.py checks that retrained models behave as the shipped ones.
.PHONY: world-models world-models-check
world-models: setup
	$(PY) -m tessera.demo.world_models

world-models-check: setup
	$(PY) -m tessera.demo.world_models --check

# The config reference, generated from the config models (a test checks it is current).
.PHONY: config-docs
config-docs: setup
	$(PY) -m tessera.config.reference > docs/config-reference.md.new
	mv docs/config-reference.md.new docs/config-reference.md

lock: setup
	$(PY) -m pip freeze --all --exclude-editable | grep -v -E "^(pip|tessera|dataclasses)==" > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

# Orchestration (docs/cluster.md). `make deploy` registers the curate, stage1, stage2,
# sample, eval and all deployments with the process work pool POOL on the Prefect server at
# PREFECT_API_URL (default: the `make ui` one), `make worker` runs their flow runs, `make serve` does
# both in one process. `make submit` runs FLOW as a Ray job on the cluster whose job API is at
# RAY_API_SERVER_ADDRESS, with Ray's token authentication (token in ~/.ray/auth_token); with the
# default FLOW=all, the job runs the steps CONFIG has sections for (FLOW=stage2 for stage 2 alone),
# and nothing is submitted when the cluster does not answer.
POOL ?= tessera
FLOW ?= all
PREFECT_API_URL ?= http://127.0.0.1:4200/api
RAY_API_SERVER_ADDRESS ?= http://127.0.0.1:8265
FLOW_ARGS = --config $(CONFIG) $(SET_ARGS)
.PHONY: deploy serve worker submit
deploy: setup
	$(PY) -m tessera.core.secretfile $(PREFECT_AUTH_FILE)
	$(PREFECT_CLIENT_ENV) PREFECT_API_URL=$(PREFECT_API_URL) $(PY) -m tessera.flows.deploy --pool $(POOL) $(FLOW_ARGS)

serve: setup
	$(PY) -m tessera.core.secretfile $(PREFECT_AUTH_FILE)
	$(PREFECT_CLIENT_ENV) PREFECT_API_URL=$(PREFECT_API_URL) $(PY) -m tessera.flows.deploy --serve $(FLOW_ARGS)

worker: setup
	$(PY) -m tessera.core.secretfile $(PREFECT_AUTH_FILE)
	$(PREFECT_CLIENT_ENV) PREFECT_API_URL=$(PREFECT_API_URL) $(VENV)/bin/prefect worker start --pool $(POOL)

submit: setup
	$(PY) -m tessera.cli submit --address $(RAY_API_SERVER_ADDRESS) -- $(FLOW) $(FLOW_ARGS) $(if $(RUN),--run $(RUN))
