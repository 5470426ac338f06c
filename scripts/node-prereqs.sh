#!/usr/bin/env bash
# What the real test node (tests/cluster/node.py) and the image builds need from the machine, from
# Debian's packages: containerd + runc + CNI plugins for pods, conntrack/iptables for kube-proxy,
# docker.io to build images, debootstrap for the local Debian base image. Then makes sure a Docker
# engine answers: if none does, starts dockerd in the background and records its pid in
# /run/llm2llm-dockerd.pid (scripts/stop-dockerd.sh stops exactly that process).
# Needs root. Idempotent: a machine that has everything costs a few checks.
set -euo pipefail
pkgs=(containerd runc containernetworking-plugins conntrack iptables iproute2 docker.io debootstrap openssl kmod)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "node-prereqs: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  mkdir -p /var/log/llm2llm
  # A new session: dockerd is not tied to this shell; its own containerd is separate from the node's.
  setsid /usr/sbin/dockerd --host unix:///var/run/docker.sock >/var/log/llm2llm/dockerd.log 2>&1 < /dev/null &
  echo $! > /run/llm2llm-dockerd.pid
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start:" >&2; tail -20 /var/log/llm2llm/dockerd.log >&2; exit 1; }
  echo "node-prereqs: started dockerd (pid $(cat /run/llm2llm-dockerd.pid))" >&2
fi
