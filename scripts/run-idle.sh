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
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
# setsid --wait: a new session (hence a new autogroup) for the command, with its exit status.
exec setsid --wait bash -c '
  # Without autogroups (or without the right to set them) this fails, and nice alone is what there is.
  echo 19 2>/dev/null >/proc/self/autogroup || true
  if command -v ionice >/dev/null; then exec nice -n 19 ionice -c 3 "$@"; fi
  exec nice -n 19 "$@"' run-idle "$@"
