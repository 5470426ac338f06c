"""The local runner: the embedded default. ``llm2llm run run.yaml`` on one machine.

It is the operator's loop without Kubernetes: the same planner decides, the same job entrypoint runs
(one Ray job per iteration, submitted through the Ray Jobs API to a local head it starts, or to
``spec.ray.address``), and the same status is written, into ``<output>/<run>/status.json``.
Stopping and re-running the same command resumes the run: finished iterations and stages are kept.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from datetime import datetime
from typing import Callable

from .control import Invalid, JobSettings, Launcher, RunRef, Step, Transient, read_status, refuse, resolve_paths, step
from .jobsapi import JobsApiLauncher
from .localray import LocalRayHead
from .planner import Backoff, Finish, Idle, Launch, Stop, Wait
from .spec import AugmentationRun, AugmentationRunSpec, spec_to_wire
from .status import RunStatus
from .storage import RunStorage, StorageError

log = logging.getLogger(__name__)

# Consecutive steps that may fail on an unreachable Ray head or storage before the run gives up.
MAX_TRANSIENT = 30


def localize(run: AugmentationRun, base: str | None = None) -> AugmentationRun:
    """The run with its local paths made absolute against ``base`` (default: the working directory)."""
    run = run.model_copy(deep=True)
    run.spec = resolve_paths(run.spec, base or os.getcwd())
    return run


def local_cpus(spec: AugmentationRunSpec) -> int:
    """Logical CPUs for a local head: the trainer's workers plus the job driver and engines must fit, or
    Ray waits forever."""
    st = spec.student
    return max(os.cpu_count() or 1, st.workers * st.cpus_per_worker + 2)


class RunFailed(RuntimeError):
    """The run cannot go on (an Invalid the user must fix, or the Ray head stayed unreachable)."""


class LocalRunner:
    """The control core (``control.step``) with the Ray Jobs API as launcher and status.json as status store."""

    def __init__(self, run: AugmentationRun, *, address: str | None = None, poll_seconds: float = 2.0,
                 echo: Callable[[str], None] | None = None):
        self.run = localize(run)
        self.spec = self.run.spec
        self.name = self.run.metadata.name
        self.address = address or self.spec.ray.address
        self.poll = poll_seconds
        self.echo = echo or (lambda line: print(line, flush=True))
        self.store = RunStorage(self.spec.output, self.name)
        self.python = self.spec.ray.python or sys.executable
        self._head: LocalRayHead | None = None
        self._ref: RunRef | None = None
        self._tracker_obj = None

    # --- setup -------------------------------------------------------------------------------
    def _uid(self) -> str:
        """A run keeps its uid across restarts, so its job names (and so its jobs) stay the same."""
        doc = self.store.run_record()
        if doc and doc.get("uid"):
            return doc["uid"]
        uid = str(uuid.uuid4())
        self.store.write_run_record(self.name, uid, spec_to_wire(self.spec))
        return uid

    def _ray(self) -> JobsApiLauncher:
        if self.address:
            return JobsApiLauncher(self.address)
        self._head = LocalRayHead(local_cpus(self.spec))
        return JobsApiLauncher(self._head.start())

    def _status(self) -> RunStatus:
        return read_status(self.store)

    # --- loop --------------------------------------------------------------------------------
    def execute(self) -> RunStatus:
        launcher = self._ray()
        try:
            return self._loop(launcher)
        finally:
            if self._head is not None:  # our own head: its jobs end with it (a re-run resumes them)
                self._head.stop()

    def tick(self, launcher: Launcher, status: RunStatus) -> Step:
        """One step of the control core; the new status goes to status.json when it changed."""
        if self._ref is None:
            try:
                uid = self._uid()
            except StorageError as err:  # as the core says it when it cannot observe the storage
                return refuse(status, Invalid("StorageUnavailable", f"spec.output {self.spec.output}: {err}",
                                              "Pending"), None)
            self._ref = RunRef(self.name, uid)
            self._tracker_obj = self._tracker(self._ref.uid)
        result = step(self._ref, self.spec, status, storage=self.store, launcher=launcher,
                      job=JobSettings(python=self.python), tracker=self._tracker_obj)
        unwritable = result.invalid is not None and result.invalid.reason == "StorageUnavailable"
        if not unwritable and (result.status.wire() != status.wire() or result.submitted):
            self.store.write_json(self.store.path("status.json"), result.status.wire())
        return result

    def _loop(self, launcher: Launcher) -> RunStatus:
        status = self._status()
        last_line, transient = "", 0
        while True:
            try:
                result = self.tick(launcher, status)
            except Transient as err:
                transient += 1
                if transient >= MAX_TRANSIENT:
                    raise RunFailed(f"gave up after {transient} tries: {err}") from None
                self.echo(f"{_clock()} WARN {err} (try {transient} of {MAX_TRANSIENT})")
                time.sleep(self.poll)
                continue
            transient = 0
            for ev in result.events:
                self.echo(f"{_clock()} {'WARN ' if ev.warning else ''}{ev.reason}: {ev.message}")
            status, action = result.status, result.action
            if isinstance(action, Stop) and action.announce:
                self.echo(f"{_clock()} stopped {action.name}: {action.reason}")
            if result.invalid is not None:
                raise RunFailed(f"{result.invalid.reason}: {result.invalid.message}")
            line = _progress(status)
            if line != last_line:
                self.echo(f"{_clock()} {line}")
                last_line = line
            if isinstance(action, (Finish, Idle)):
                if isinstance(action, Idle) and action.reason == "Suspended":
                    self.echo(f"{_clock()} run is suspended (spec.suspend); nothing to do")
                return status
            if isinstance(action, (Wait, Backoff, Launch, Stop)):
                time.sleep(self.poll)

    def _tracker(self, uid: str):
        """The MLflow tracker when spec.tracking.mlflow is set; tracking problems never stop the run."""
        if self.spec.tracking is None or self.spec.tracking.mlflow is None:
            return None
        try:
            from .tracking import tracker_for

            return tracker_for(self.spec, self.name, uid)
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow tracking disabled: %s", err)
            return None


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


def _progress(status: RunStatus) -> str:
    if status.phase in ("Succeeded", "Failed"):
        return f"run {status.phase}: {status.stop_reason}"
    job = status.active_job
    stage = status.stage or "starting"
    rows = status.iterations[-1].train_rows if status.iterations else None
    extra = f", {status.augmented_rows} augmented rows so far" if rows is not None else ""
    if job is None:
        return f"phase {status.phase}"
    return f"iteration {job.iteration} (attempt {job.attempt}, job {job.name}): {stage}{extra}"


def format_table(status: RunStatus) -> str:
    """The per-iteration table printed at the end of a run and by ``llm2llm status``."""
    head = ["iter", "train rows", "steps", "seed acc", "test acc", "failures", "generated", "kept", "rejected", "seconds"]
    rows = [head]
    for it in status.iterations:
        rej = ", ".join(f"{k}={v}" for k, v in sorted(it.rejected.items())) or "-"
        rows.append([
            str(it.index), str(it.train_rows), str(it.train_steps), _f(it.seed_accuracy), _f(it.test_accuracy),
            str(it.failures), str(it.generated), str(it.kept), rej, f"{sum(it.seconds.values()):.0f}",
        ])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    summary = f"phase {status.phase}"
    if status.stop_reason:
        summary += f" ({status.stop_reason})"
    summary += f", {status.augmented_rows} augmented rows"
    ended = status.condition(status.phase) if status.phase in ("Succeeded", "Failed") else None
    if ended is not None and ended.message:
        summary += f"\n{ended.message}"  # why it stopped, e.g. what the filter refused (NoNewData)
    return "\n".join(lines + [summary])


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def dump_status(status: RunStatus) -> str:
    return json.dumps(status.wire(), indent=2)
