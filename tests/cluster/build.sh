#!/usr/bin/env bash
# Builds the test cluster's binaries from their Go modules, cached per machine by version.
#   build.sh                          every binary: control plane, node, CoreDNS, KubeRay, pause
#   build.sh kube-apiserver etcd      only those (the API-server-only fixture)
# Prints the bin directory on its last line. Binaries already in the cache cost nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
all=(kube-apiserver etcd kube-controller-manager kube-scheduler kubelet kube-proxy coredns ray-operator pause)
want=("$@"); [[ ${#want[@]} -gt 0 ]] || want=("${all[@]}")
cache=${LLM2LLM_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm2llm/cluster}
key=$(cat "$here/versions.env" "$here"/go.{mod,sum} "$here"/coredns/go.{mod,sum} "$here"/coredns/main.go \
      "$here"/pause/main.go | sha256sum | cut -c1-16)
bin="$cache/$K8S_VERSION-$key"
mkdir -p "$bin"
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
# Without these the server reports v0.0.0 and Helm's kubeVersion checks break.
k8s_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
export CGO_ENABLED=0
build_one() {  # name out
  case $1 in
    etcd) (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$2" go.etcd.io/etcd/server/v3) ;;
    coredns) (cd "$here/coredns" && go build -trimpath -ldflags "-s -w" -o "$2" .) ;;
    pause) (cd "$here/pause" && go build -trimpath -ldflags "-s -w" -o "$2" .) ;;
    # KubeRay's own module, built as released (its go.mod, not ours, decides its dependencies).
    ray-operator) GOBIN=$(dirname "$2")/gobin go install -trimpath -ldflags "-s -w" \
        "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" \
        && mv "$(dirname "$2")/gobin/ray-operator" "$2" ;;
    kube-*|kubelet) (cd "$here" && go build -trimpath -ldflags "$k8s_ldflags" -o "$2" "k8s.io/kubernetes/cmd/$1") ;;
    *) echo "build.sh: unknown binary $1" >&2; return 2 ;;
  esac
}
for name in "${want[@]}"; do
  [[ -x "$bin/$name" ]] && continue
  tmp=$(mktemp -d "$bin/.build.XXXXXX")
  start=$(date +%s)
  build_one "$name" "$tmp/$name" >&2
  mv "$tmp/$name" "$bin/$name"; rm -rf "$tmp"   # a killed build never leaves a half binary
  echo "built $name in $(( $(date +%s) - start ))s" >&2
done
echo "$bin"
