#!/usr/bin/env bash
# Builds healthcheck (Argo CD's way of running a health script, for tests), cached per machine by the
# hash of its sources and the Go version. Prints the binary's path on its last line; a cache hit costs
# nothing.
set -euo pipefail
src=$(cd "$(dirname "$0")/healthcheck" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/llm2llm/argocd
key=$( (cat "$src"/go.mod "$src"/go.sum "$src"/main.go; go env GOVERSION) | sha256sum | cut -c1-16)
bin="$cache/healthcheck-$key"
if [[ ! -x $bin ]]; then
  mkdir -p "$cache"
  tmp=$(mktemp "$cache/.healthcheck.XXXXXX")
  trap 'rm -f "$tmp"' EXIT
  start=$(date +%s)
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp" .) >&2
  mv "$tmp" "$bin"   # a killed build never leaves a half binary
  trap - EXIT
  echo "built healthcheck in $(( $(date +%s) - start ))s" >&2
fi
echo "$bin"
