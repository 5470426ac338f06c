#!/usr/bin/env bash
# `make test`: every tier, unit -> integration -> e2e, ordered for a machine that has built nothing yet.
#
# The e2e tier needs the node's binaries (Go builds of Kubernetes, etcd, CoreDNS, KubeRay: 8 min alone on 2 cores
# when nothing is cached) and the images (7.5 min alone); the unit and integration tiers need neither. So
# those two build in the background while the unit and integration tiers run, on only the CPU the tests leave
# idle (scripts/run-idle.sh: plain `nice` let them take half of it), and the e2e tier waits for them. On a
# machine that has them cached (a second run), both take seconds and the tiers simply follow each other.
#
# Each tier is its own pytest run (its summary, its slowest tests); the script fails if any tier or build did.
# Logs of the background builds: .cache/test-logs/. Extra arguments go to every pytest run.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-$root/.venv/bin/python}
logs=$root/.cache/test-logs
mkdir -p "$logs"
started=$(date +%s)
say() { echo "==> test: $* (at $(( $(date +%s) - started ))s)"; }

# Small Go tools the unit and integration tiers start themselves (seconds when cached, ~2 min cold): built
# first, in the foreground, so no test races a background build of the same binary.
make -s s3-bin argocd-bin >/dev/null || exit 1

say "background: the node's binaries and the images (logs in ${logs#"$root"/})"
scripts/run-idle.sh make -s cluster-bin >"$logs/cluster-bin.log" 2>&1 &
bins=$!
# Docker runs the build steps in its daemon's cgroups, out of run-idle's reach: DOCKER_BUILD_IDLE for them.
DOCKER_BUILD_IDLE=1 scripts/run-idle.sh make -s images >"$logs/images.log" 2>&1 &
images=$!
# Ended early (a failed build, Ctrl-C, a kill): builds still running stop with this script (run-idle passes the
# signal on to their sessions, which no signal to this process group reaches).
trap 'kill -TERM $(jobs -pr) 2>/dev/null' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rc=0
say "unit tier"
"$py" -m pytest tests/unit "$@" || rc=1
say "integration tier"
"$py" -m pytest tests/integration "$@" || rc=1

say "waiting for the background builds"
for build in cluster-bin:$bins images:$images; do
  if ! wait "${build#*:}"; then
    echo "==> test: make ${build%%:*} failed; its log:"; tail -n 80 "$logs/${build%%:*}.log"; exit 1
  fi
done
say "e2e tier"
"$py" -m pytest tests/e2e "$@" || rc=1
say "done, exit $rc"
exit $rc
