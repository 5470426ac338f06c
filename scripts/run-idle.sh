#!/usr/bin/env bash
# Runs a command on the CPU that everything else leaves idle: scripts/test.sh builds the node's binaries and
# the images this way while the unit and integration tiers run.
#
#   scripts/run-idle.sh COMMAND [ARG...]
#
# `nice -n 19` alone is not enough on a kernel with autogroup scheduling (on by default where the kernel has
# it: /proc/sys/kernel/sched_autogroup_enabled). Nice then ranks processes only within one session, and every
# session gets an equal share of the CPU; the tests' Ray heads and Ray's job drivers run in sessions of their
# own, so a niced build beside them still took about half the CPU (the integration tier ran 53 min beside the
# builds on 2 cores, 18-19 min without them). So the command gets a session of its own whose autogroup is set to
# nice 19, is niced within it, and uses the idle I/O class. Docker's build steps run in dockerd's cgroups, not
# here: scripts/build-images.sh puts them in a low-weight cgroup (DOCKER_BUILD_IDLE=1).
set -uo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
# The command's own session (hence autogroup): started in the background so that this script stays in the
# caller's process group, takes the caller's Ctrl-C or kill, and passes it on to the whole session's group,
# which no signal to the caller's group reaches. (A background child of a shell without job control is no
# group leader, so setsid needs no fork and $! is the session's leader.)
setsid bash -c '
  # Without autogroups (or without the right to set them) this fails, and nice alone is what there is.
  echo 19 2>/dev/null >/proc/self/autogroup || true
  if command -v ionice >/dev/null; then exec nice -n 19 ionice -c 3 "$@"; fi
  exec nice -n 19 "$@"' run-idle "$@" &
leader=$!
trap 'kill -TERM -- "-$leader" 2>/dev/null' INT TERM HUP
while true; do
  wait "$leader"; rc=$?
  kill -0 "$leader" 2>/dev/null || exit "$rc"   # still there: the wait was cut short by a signal
done
