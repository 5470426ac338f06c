"""Argo CD's verdict on AugmentationRun objects: charts/llm2llm-operator/health.lua evaluated by healthcheck
(tests/argocd/healthcheck/main.go), which runs a health script as Argo CD's controller does: gopher-lua with
only the libraries Argo CD opens, the object converted as Argo CD converts it, the result read back as
Argo CD reads it. tests/argocd/build.sh builds it once per machine (Go and the Go module proxy).

    verdicts([obj, ...])     # one process for the whole batch: [Verdict(status, message, error), ...]
    argo_health(obj)         # (status, message) of one object

RunHealthLog collects a run's object at each status a poll sees and checks Argo CD's verdict on each.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
HEALTH_LUA = HERE.parents[1] / "charts" / "llm2llm-operator" / "health.lua"
BUILD_SH = HERE / "build.sh"

# What each phase of a run that succeeds must look like in Argo CD (None: no status yet).
PASSING_HEALTH = {None: "Progressing", "Pending": "Progressing", "Running": "Progressing", "Succeeded": "Healthy"}


class Verdict(NamedTuple):
    status: str  # "" when the script returned no health
    message: str
    error: str | None = None  # the script failed: Argo CD shows Unknown with this as message


class HealthCheckError(RuntimeError):
    pass


@functools.cache
def binary() -> Path:
    """The healthcheck binary, built by build.sh unless this machine has it cached (a few seconds cold)."""
    done = subprocess.run([str(BUILD_SH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    if done.returncode != 0:
        raise HealthCheckError(f"{BUILD_SH} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def verdicts(objects: Iterable[Mapping[str, Any]], script: Path = HEALTH_LUA) -> list[Verdict]:
    """Argo CD's health of each object (as the API server returns it) under ``script``, in order."""
    batch = list(objects)
    # Each evaluation stops at Argo CD's 1 s limit; the rest is process start.
    done = subprocess.run([str(binary()), str(script)], input=json.dumps(batch), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=30 + 2 * len(batch))
    if done.returncode != 0:
        raise HealthCheckError(f"healthcheck {script} failed (exit {done.returncode}): {done.stderr.strip()}")
    return [Verdict(v["status"], v["message"], v.get("error")) for v in json.loads(done.stdout)]


def argo_health(obj: Mapping[str, Any], script: Path = HEALTH_LUA) -> tuple[str, str]:
    status, message, _ = verdicts([obj], script)[0]
    return status, message


class RunHealthLog:
    """The objects of one run, one per distinct status seen (call ``see`` from the poll loop)."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []

    def see(self, obj: Mapping[str, Any] | None) -> None:
        if not obj:
            return
        if self.objects and self.objects[-1].get("status") == obj.get("status"):
            return
        self.objects.append(copy.deepcopy(dict(obj)))

    def phases(self) -> list[str | None]:
        return [(o.get("status") or {}).get("phase") for o in self.objects]

    def check_succeeded_run(self) -> list[Verdict]:
        """Asserts what Argo CD showed for a run that succeeded: Progressing while it had no status or was
        Pending or Running, Healthy once Succeeded, and no other health (never Degraded) on the way. The
        log must have seen it Running and Succeeded."""
        got = verdicts(self.objects)
        wrong = [f"phase {phase}: {v.status} ({v.error or v.message}), "
                 f"want {PASSING_HEALTH.get(phase) or 'no such phase in a run that succeeds'}"
                 for phase, v in zip(self.phases(), got) if PASSING_HEALTH.get(phase) != v.status]
        assert not wrong, "Argo CD's health of the run's statuses:\n" + "\n".join(wrong)
        missing = {"Running", "Succeeded"} - set(self.phases())
        assert not missing, f"the run was never seen {sorted(missing)} (phases seen: {self.phases()})"
        return got
