#!/usr/bin/env bash
# Stops the dockerd that scripts/node-prereqs.sh started (by its recorded pid, checked to be dockerd).
set -uo pipefail
f=/run/llm2llm-dockerd.pid
[[ -f $f ]] || exit 0
pid=$(cat "$f")
if [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */dockerd ]]; then
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null
fi
rm -f "$f"
