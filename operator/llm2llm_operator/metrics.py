"""Prometheus metrics of the operator, served on --metrics-port (Kopf serves liveness on --liveness)."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RUNS = Gauge("llm2llm_runs", "AugmentationRuns seen by this operator, by phase", ["phase"])
JOBS_SUBMITTED = Counter("llm2llm_jobs_submitted", "Iteration jobs created", ["launcher"])
RECONCILE_ERRORS = Counter("llm2llm_reconcile_errors", "Reconciles that failed, by kind", ["kind"])
RECONCILE_SECONDS = Histogram("llm2llm_reconcile_duration_seconds", "Wall time of one reconcile",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")

# The phase gauge is derived from the last phase seen per run (uid), in this process only.
_phases: dict[str, str] = {}
_lock = threading.Lock()


def set_phase(uid: str, phase: str | None) -> None:
    """Record a run's phase (None: the run is gone) and refresh the gauge."""
    with _lock:
        if phase is None:
            _phases.pop(uid, None)
        else:
            _phases[uid] = phase
        counts = {p: 0 for p in PHASES}
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
    for p, n in counts.items():
        RUNS.labels(phase=p).set(n)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    for p in PHASES:
        RUNS.labels(phase=p).set(0)
    start_http_server(port, addr=addr)
