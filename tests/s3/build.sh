#!/usr/bin/env bash
# Builds the S3-compatible server the storage tests start (versitygw, Apache-2.0, with its POSIX backend) from
# its Go module, cached per machine by version. Prints the binary's path on its last line; a cached one costs
# nothing. MinIO's server is AGPL, which this project does not use; versitygw is a production S3 gateway.
set -euo pipefail
VERSITYGW_VERSION=v1.8.0
cache=${LLM2LLM_S3_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm2llm/s3}
# The key covers this script, so a change of version or flags never reuses an old binary.
key=$(sha256sum "$0" | cut -c1-16)
bin="$cache/versitygw-$VERSITYGW_VERSION-$key"
out="$bin/versitygw"
if [[ ! -x "$out" ]]; then
  mkdir -p "$bin"
  tmp=$(mktemp -d "$bin/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  start=$(date +%s)
  # Its own module, built as released (its go.mod decides its dependencies).
  CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -ldflags "-s -w -X main.Version=$VERSITYGW_VERSION" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION" >&2
  mv "$tmp/versitygw" "$out"   # a killed build never leaves a half binary
  echo "built versitygw $VERSITYGW_VERSION in $(( $(date +%s) - start ))s" >&2
fi
echo "$out"
