#!/usr/bin/env bash
# Builds the project's container images on this machine, with no container registry at all:
#   1. llm2llm/debian-python:bookworm, a Debian bookworm base (python3 3.11, venv, ca-certificates, wget, procps,
#      libgomp1) made by debootstrap from this machine's own apt mirror and `docker import`ed. Skipped when the
#      image exists; `docker rmi` it to rebuild.
#   2. llm2llm/<image>:$TAG for each of $IMAGES, from the Dockerfile's target of that name, FROM that base.
# Docker's layer cache makes a second run quick; after a source change only the small project layers rebuild.
# Loading the images into a node's containerd is not done here (tests/cluster/node.py load).
#
#   scripts/build-images.sh                                   # the base, llm2llm/operator:dev, llm2llm/job-cpu:dev
#   IMAGES=job-cpu TAG=test scripts/build-images.sh           # only llm2llm/job-cpu:test
#   IMAGES= scripts/build-images.sh                           # only the base
#   BASE_IMAGE=python:3.11-slim-bookworm scripts/build-images.sh   # a machine that can pull: no debootstrap
#
# Environment: IMAGES (default "operator job-cpu"; "job" is the GPU image; "mlflow" the MLflow server of the real-node
# test, from tests/cluster/mlflow/Dockerfile), TAG (dev), BASE_IMAGE (the local base),
# MIRROR (default: the first Debian URI of /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list),
# CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt; empty: none), DOCKER (docker), DOCKER_BUILDKIT (0: the
# legacy builder; the Dockerfile also builds with BuildKit's built-in frontend), DOCKER_BUILD_IDLE (1: the build
# steps get only idle CPU; section 3).
#
# TLS-inspecting proxies: pip and uv inside the build trust the host's CA bundle, which this script copies into
# the build context as .build-ca.crt (git-ignored; public certificates only). Only the Dockerfile's builder
# stages read it; no final image contains it (tests/unit/test_dockerfile.py). Builds use the host network.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
IMAGES=${IMAGES-operator job-cpu}
TAG=${TAG:-dev}
LOCAL_BASE=llm2llm/debian-python:bookworm
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
docker=${DOCKER:-docker}
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
# Debian packages of the base: the Python the images run, what KubeRay's probes (wget) and Ray (ps) exec, the
# OpenMP runtime of torch/DeepSpeed CPU ops. Compilers and Python headers come in the job images only.
BASE_PACKAGES=python3,python3-venv,ca-certificates,wget,procps,libgomp1

started=$(date +%s)
step() { echo "==> build-images: $*"; }
seconds() { echo $(($(date +%s) - $1)); }

debian_mirror() {
  if [[ -n "${MIRROR:-}" ]]; then echo "$MIRROR"; return; fi
  local m=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  elif [[ -f /etc/apt/sources.list ]]; then
    # deb [options] URI suite components
    m=$(sed -E 's/\[[^]]*\]//' /etc/apt/sources.list | awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}')
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

image_exists() { "$docker" image inspect "$1" >/dev/null 2>&1; }
image_mb() { "$docker" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1e6}'; }

build_base() {
  [[ $EUID -eq 0 ]] || { echo "build-images: debootstrap needs root (or set BASE_IMAGE)" >&2; exit 1; }
  command -v debootstrap >/dev/null || { echo "build-images: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  local mirror work t0
  mirror=$(debian_mirror)
  work=$(mktemp -d /var/tmp/llm2llm-base.XXXXXX)
  # debootstrap mounts /proc and /sys in the target; never let rm cross into a mount left by a failed run.
  # shellcheck disable=SC2064
  trap "findmnt -R -n -l -o TARGET '$work/rootfs' 2>/dev/null | sort -r | xargs -r -n1 umount -l; rm -rf --one-file-system '$work'" EXIT
  t0=$(date +%s)
  step "base $LOCAL_BASE: debootstrap --variant=minbase bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  step "base: debootstrap done in $(seconds "$t0") s"
  # No package caches; resolv.conf and hostname are the runtime's (docker and the kubelet mount their own).
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/tmp/*
  : >"$work/rootfs/etc/resolv.conf"
  echo localhost >"$work/rootfs/etc/hostname"
  t0=$(date +%s)
  tar --numeric-owner -C "$work/rootfs" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase --include=$BASE_PACKAGES bookworm $mirror" \
    - "$LOCAL_BASE" >/dev/null
  "$docker" run --rm "$LOCAL_BASE" python3 -c 'import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version'
  step "base: imported in $(seconds "$t0") s, $(image_mb "$LOCAL_BASE") MB"
  rm -rf --one-file-system "$work"
  trap - EXIT
}

# --- 1. the base --------------------------------------------------------------------------------------------
t=$(date +%s)
if [[ "$BASE_IMAGE" != "$LOCAL_BASE" ]]; then
  step "base: using $BASE_IMAGE"
else
  # One builder at a time (a second waits, then finds the image).
  exec 9>/var/tmp/llm2llm-build-base.lock
  flock 9
  if image_exists "$LOCAL_BASE"; then
    step "base $LOCAL_BASE: exists, skipped"
  else
    build_base
  fi
  flock -u 9
fi
step "step base: $(seconds "$t") s"

# --- 2. the CA bundle for the builder stages ----------------------------------------------------------------
ca="$root/.build-ca.crt"
if [[ -n "$CA_BUNDLE" && -s "$CA_BUNDLE" ]]; then
  if ! cmp -s "$CA_BUNDLE" "$ca"; then   # rewritten only when it changed: it is part of the layer cache key
    cp "$CA_BUNDLE" "$ca.tmp.$$" && mv "$ca.tmp.$$" "$ca"
  fi
  step "builder stages trust $CA_BUNDLE (copied to .build-ca.crt)"
else
  rm -f "$ca"
fi

# --- 3. the images ------------------------------------------------------------------------------------------
# DOCKER_BUILD_IDLE=1 (scripts/test.sh, while tests run): the build steps run in a cgroup of the lowest CPU
# weight, so they only get what the machine leaves idle. (`docker build --cpu-shares` would not do: it weighs a
# step against the other containers in docker's own cgroup, not against the machine's processes.) Needs root and
# docker's cgroupfs driver; elsewhere the steps run at the normal weight, said once.
idle_cgroup=llm2llm-build
idle_parent=
if [[ "${DOCKER_BUILD_IDLE:-0}" == 1 ]]; then
  cg=$("$docker" info -f '{{.CgroupDriver}} {{.CgroupVersion}}' 2>/dev/null || true)
  case "$cg" in  # the CPU weight knob of the cgroup and its lowest value
    "cgroupfs 1") knob=/sys/fs/cgroup/cpu/$idle_cgroup/cpu.shares lowest=2 ;;
    "cgroupfs 2") knob=/sys/fs/cgroup/$idle_cgroup/cpu.weight lowest=1 ;;
    *) knob= ;;
  esac
  if [[ $EUID -eq 0 && -n "$knob" ]] && mkdir -p "$(dirname "$knob")" 2>/dev/null \
      && echo "$lowest" 2>/dev/null >"$knob"; then
    idle_parent=/$idle_cgroup
  fi
  if [[ -n "$idle_parent" ]]; then step "build steps in cgroup $idle_parent, at the lowest CPU weight"
  else step "build steps at the normal CPU weight (needs root and docker's cgroupfs driver; docker: '$cg')"; fi
fi
for image in $IMAGES; do
  case "$image" in
    operator | job-cpu | job) dockerfile=$root/Dockerfile target=(--target "$image") ;;
    mlflow) dockerfile=$root/tests/cluster/mlflow/Dockerfile target=() ;;
    *) echo "build-images: unknown image '$image' (operator, job-cpu, job, mlflow)" >&2; exit 2 ;;
  esac
  ref="llm2llm/$image:$TAG"
  before=$("$docker" image inspect -f '{{.Id}}' "$ref" 2>/dev/null || true)
  t=$(date +%s)
  step "$ref: docker build -f ${dockerfile#"$root"/} ${target[*]} (BASE_IMAGE=$BASE_IMAGE)"
  "$docker" build --network host "${target[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    ${idle_parent:+--cgroup-parent "$idle_parent"} -f "$dockerfile" -t "$ref" "$root"
  step "step $ref: $(seconds "$t") s, $(image_mb "$ref") MB"
  # The image this tag named before: gone with its layers unless the new one shares them (an 8 GB job image per
  # rebuild otherwise fills the disk, and a node under disk pressure reclaims its images).
  if [[ -n "$before" && "$before" != "$("$docker" image inspect -f '{{.Id}}' "$ref")" ]]; then
    "$docker" rmi "$before" >/dev/null 2>&1 || true
  fi
  # A few seconds' smoke test: the entrypoint starts, the data plane imports as the image's user.
  case "$image" in
    operator) "$docker" run --rm "$ref" --help >/dev/null ;;
    # (prepare only finds the baked model: uid 1000 cannot write the cache, so a missing one fails)
    job-cpu) "$docker" run --rm "$ref" bash -c 'ray --version && python -c "import torch, deepspeed, vllm" \
               && python -m llm2llm_jobs.models prepare smollm2-135m' >/dev/null ;;
    job) "$docker" run --rm "$ref" ray --version >/dev/null ;;
    mlflow) "$docker" run --rm --entrypoint mlflow "$ref" --version >/dev/null ;;
  esac
  step "$ref: smoke test passed"
done
# The cgroup docker made for the steps in each hierarchy (empty now; rmdir refuses one that is not).
if [[ -n "$idle_parent" ]]; then
  rmdir /sys/fs/cgroup/*/"$idle_cgroup" /sys/fs/cgroup/"$idle_cgroup" 2>/dev/null || true
fi
step "all done in $(seconds "$started") s"
