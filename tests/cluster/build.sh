#!/usr/bin/env bash
# Builds kube-apiserver and etcd for the test control plane, cached per machine by version.
# Prints the bin directory. A second run with the same versions costs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${LLM2LLM_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm2llm/cluster}
key=$(cat "$here/versions.env" "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
bin="$cache/$K8S_VERSION-$ETCD_VERSION-$key"
if [[ -x "$bin/kube-apiserver" && -x "$bin/etcd" ]]; then
  echo "$bin"; exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
# Without these the server reports v0.0.0 and Helm's kubeVersion checks break.
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
cd "$here"
start=$(date +%s)
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3 >&2
echo "built control plane in $(( $(date +%s) - start ))s" >&2
rm -rf "$bin"; mv "$tmp" "$bin"; trap - EXIT
echo "$bin"
