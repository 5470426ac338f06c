# syntax=docker/dockerfile:1
# Two images from one file; the Python dependency sets come from scripts/image-install.sh (the packages'
# pyproject.toml files, versions constrained by requirements/dev.lock), never retyped here.
#
#   docker build --target operator -t llm2llm-operator .   # the chart's image: slim, no torch/Ray Train/vLLM
#   docker build --target job      -t llm2llm-job .        # what the RayCluster pods run (spec.ray.image)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch 2.13 (requirements/dev.lock) ships CUDA 13.0 wheels: the base only brings the CUDA runtime setup.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
# The uv release of scripts/setup.sh (a unit test keeps them equal).
ARG UV_VERSION=0.13.8

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------------------------------------
# operator: llm2llm + llm2llm-operator in /opt/venv on python:3.11-slim; runs as a non-root user.
FROM ${PYTHON_IMAGE} AS operator-build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_NO_CACHE=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY requirements/dev.lock requirements/dev.lock
COPY scripts/image-install.sh scripts/setup.sh scripts/
COPY python/ python/
COPY operator/ operator/
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv \
    && scripts/image-install.sh operator /opt/venv/bin/python

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="llm2llm-operator" \
      org.opencontainers.image.description="Kopf operator for AugmentationRun (llm2llm.io/v1alpha1)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 llm2llm \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin llm2llm
COPY --from=operator-build /opt/venv /opt/venv
# HOME=/tmp: the chart mounts an emptyDir there, the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    RAY_USAGE_STATS_ENABLED=0
USER 10001:10001
# 8000: Prometheus /metrics (--metrics-port); 8080: Kopf /healthz (--liveness, set by the chart).
EXPOSE 8000 8080
ENTRYPOINT ["llm2llm-operator"]

# ---------------------------------------------------------------------------------------------------------
# job: llm2llm + llm2llm-jobs[vllm] (torch, ray[default,train], DeepSpeed, vLLM) on the CUDA runtime.
# Python 3.11 is uv's managed CPython (Ubuntu 24.04 ships 3.12); the venv is /opt/venv, so the chart's
# operator.jobPython default /opt/venv/bin/python is this interpreter.
FROM ${CUDA_IMAGE} AS job-build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_NO_CACHE=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed
WORKDIR /src
COPY requirements/dev.lock requirements/dev.lock
COPY scripts/image-install.sh scripts/setup.sh scripts/
COPY python/ python/
COPY jobs/ jobs/
RUN uv venv --python 3.11 /opt/venv \
    && scripts/image-install.sh job /opt/venv/bin/python

FROM ${CUDA_IMAGE} AS job
LABEL org.opencontainers.image.title="llm2llm-job" \
      org.opencontainers.image.description="LLM2LLM iteration job for RayCluster pods: Ray, DeepSpeed, vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
# wget: KubeRay's health probes exec it in Ray containers. libgomp1: torch/DeepSpeed CPU ops.
# ca-certificates: HTTPS to teacher endpoints. Not version-pinned on purpose: the base image tag fixes the
# distribution release, and its security updates should land on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# The Ray images' convention: user `ray`, uid 1000, with a writable home (Ray writes /tmp/ray and ~).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray
COPY --from=job-build /opt/python /opt/python
COPY --from=job-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
USER 1000:1000
WORKDIR /home/ray
# KubeRay sets the command (ray start ...) and submits the entrypoint built by the operator.
CMD ["/bin/bash"]
