# cpvt-pipeline: every target does its own set-up on a fresh machine, idempotently.
#   make demo   - set-up + the whole pipeline end to end on a small built-in dataset (CPU, minutes)
#   make test   - set-up + the full test suite
#   make bench  - set-up + all benchmarks (prints ratios, writes JSON under benchmarks/results/)
#   make ui     - MLflow UI on 127.0.0.1 over the project's tracking store (runs/mlflow.db), training view
#   make docs   - the documentation site (mkdocs, strict) into site/
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cpvt-installed
PIP := $(BIN)/pip --disable-pip-version-check -q
# pip prints a warning per missing local index folder on this image; hide those lines only.
QUIET := { grep -v -e "is ignored" -e "BuildBackendWarning" || true; }
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Where the torch wheels come from. Default: the configured package index, whose torch 2.14.1 is a CUDA 13 build
# (needs an NVIDIA driver >= 580). A site with an older driver picks the PyTorch wheel index for its CUDA on a
# fresh set-up, e.g.  rm -rf .venv && make setup TORCH_INDEX_URL=<PyTorch's cu126 wheel index>
# (same pins; a job that SLURM gave GPUs this torch cannot use stops with the driver and wheel CUDA versions).
TORCH_INDEX_URL ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
DEEPSPEED_PIN := deepspeed==0.19.8
FFCV_PIN := ffcv==1.0.2
# FFCV's build libraries: apt-installed when root; otherwise scripts/ffcv_extra.sh skips FFCV with one line
SYSTEM_PKGS := libopencv-dev libturbojpeg0-dev pkg-config
TEST_SYSTEM_PKGS := slurm-wlm munge chromium
RUN_DIR ?= runs/demo
# pytest-xdist workers: one per core, at most 4 (each test may start 2 training ranks of its own)
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

# Compiled DeepSpeed ops (shm comm) are cached here so they build once per checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# On machines without a GPU DeepSpeed must use its CPU accelerator (gloo backend).
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: setup setup-test system-deps system-test-deps ffcv-extra demo test bench ui docs clean

define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "apt-get install:$$missing"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else $(if $(2),true,echo "warning: missing system packages:$$missing (not root: install them yourself)"); fi; \
	fi
endef

system-deps:
	$(call apt_install,$(SYSTEM_PKGS),quiet)

system-test-deps:
	$(call apt_install,$(TEST_SYSTEM_PKGS))

$(STAMP): pyproject.toml requirements.lock | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel 2>&1 | $(QUIET)
	$(PIP) install $(TORCH_PIP_ARGS) $(TORCH_PINS) 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, torchvision"
	$(PIP) install -r requirements.lock 2>&1 | $(QUIET)
	$(PIP) install --no-build-isolation $(DEEPSPEED_PIN) 2>&1 | $(QUIET)
	$(PIP) install --no-build-isolation --no-deps -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, deepspeed, webdataset, timm, mlflow, submitit, pipeline, launchers, data_prep" >/dev/null
	touch $@

# The optional extra `ffcv` (pyproject), on every set-up until it is installed: where its libraries are missing,
# one line says so and the set-up goes on without it.
ffcv-extra: $(STAMP)
	@if $(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('ffcv') is None)"; then exit 0; fi; \
	scripts/ffcv_extra.sh $(PIP) install --no-build-isolation $(FFCV_PIN) 2>&1 | $(QUIET)

setup: $(STAMP) ffcv-extra

setup-test: setup system-test-deps

demo: setup
	$(BIN)/python -m launchers.demo --run-dir $(RUN_DIR)

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run_all

# The project's store (runs/mlflow.db, or $$MLFLOW_TRACKING_URI): prints each experiment's training-view URL.
ui: setup
	$(BIN)/python -m pipeline.tracking ui --host 127.0.0.1 --port $${PORT:-5000}

# Strict: a broken internal link, a missing page or a stale API reference fails (tests/test_docs.py builds it too)
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .cache runs build site *.egg-info

# GPU proof (benchmarks/gpu_check.py): one GPU, <= 8 min, JSON + table; one line and exit 0 without CUDA.
# No set-up dependency: on a GPU machine without this .venv it runs under python3 (wheels from gpu-wheelhouse on
# PYTHONPATH). gpu-wheelhouse: the wheels that machine lacks (Python 3.12, manylinux x86_64) into $(WHEELHOUSE).
.PHONY: gpu-check gpu-wheelhouse
WHEELHOUSE ?= .whl
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

gpu-check:
	@$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

gpu-wheelhouse: setup
	$(BIN)/python -m benchmarks.gpu_wheelhouse --dir $(WHEELHOUSE) --deepspeed-pin $(DEEPSPEED_PIN)
