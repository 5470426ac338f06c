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
from datetime import datetime, timezone
from typing import Callable

from .launch import JobsApiLauncher, entrypoint, job_env
from .localray import LocalRayHead
from .planner import Backoff, Finish, Idle, JobObservation, Launch, Observed, Stop, Wait, advance
from .spec import AugmentationRun, AugmentationRunSpec
from .status import STAGES, TERMINAL, RunStatus
from .storage import RunStorage

log = logging.getLogger(__name__)


def _absolute(uri: str | None) -> str | None:
    """Jobs run in another working directory: make local paths absolute."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def localize(run: AugmentationRun) -> AugmentationRun:
    run = run.model_copy(deep=True)
    run.spec.data.seed = _absolute(run.spec.data.seed)  # type: ignore[assignment]
    run.spec.data.test = _absolute(run.spec.data.test)
    run.spec.output = _absolute(run.spec.output)  # type: ignore[assignment]
    for model in (run.spec.student, run.spec.teacher):
        if os.path.sep in model.model and os.path.exists(model.model):
            model.model = os.path.abspath(model.model)
    return run


def local_cpus(spec: AugmentationRunSpec) -> int:
    """Logical CPUs for a local head: the trainer's workers plus the job driver and engines must fit, or
    Ray waits forever."""
    st = spec.student
    return max(os.cpu_count() or 1, st.workers * st.cpus_per_worker + 2)


class LocalRunner:
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

    # --- setup -------------------------------------------------------------------------------
    def _uid(self) -> str:
        """A run keeps its uid across restarts, so its job names (and so its jobs) stay the same."""
        doc = self.store.read_json(self.store.path("run.json"))
        if doc and doc.get("uid"):
            return doc["uid"]
        uid = str(uuid.uuid4())
        from .spec import spec_to_wire

        self.store.write_json(self.store.path("run.json"), {"name": self.name, "uid": uid, "spec": spec_to_wire(self.spec)})
        return uid

    def _ray(self) -> JobsApiLauncher:
        if self.address:
            return JobsApiLauncher(self.address)
        self._head = LocalRayHead(local_cpus(self.spec))
        return JobsApiLauncher(self._head.start())

    def _status(self) -> RunStatus:
        doc = self.store.read_json(self.store.path("status.json"))
        return RunStatus.model_validate(doc) if doc else RunStatus()

    # --- loop --------------------------------------------------------------------------------
    def observe(self, launcher: JobsApiLauncher, status: RunStatus) -> Observed:
        iterations = self.store.iterations()
        jobs: dict[str, JobObservation] = {}
        for rec in status.jobs:
            if rec.state not in TERMINAL:
                ob = launcher.observe(rec.name, rec.iteration, rec.attempt)
                if ob is not None:
                    jobs[rec.name] = ob
        n = len(iterations)
        done = tuple(s for s in STAGES if self.store.stage_done(n, s) is not None)
        return Observed(iterations=iterations, jobs=jobs, stages_done=done, now=datetime.now(timezone.utc))

    def execute(self) -> RunStatus:
        launcher = self._ray()
        try:
            return self._loop(launcher)
        finally:
            if self._head is not None:  # our own head: its jobs end with it (a re-run resumes them)
                self._head.stop()

    def _loop(self, launcher: JobsApiLauncher) -> RunStatus:
        uid = self._uid()
        status = self._status()
        status.output = self.store.uri()
        tracker = self._tracker(uid)
        env = job_env(self.spec)
        last_line = ""
        while True:
            observed = self.observe(launcher, status)
            new, action, events = advance(self.spec, status, observed, run_name=self.name, run_uid=uid)
            for ev in events:
                self.echo(f"{_clock()} {'WARN ' if ev.warning else ''}{ev.reason}: {ev.message}")
            if isinstance(action, Launch):
                cmd = entrypoint(self.name, uid, self.spec, action.iteration, action.attempt, self.python)
                launcher.submit(action.name, cmd, env, {"llm2llm.io/run": self.name, "llm2llm.io/uid": uid})
            elif isinstance(action, Stop):
                launcher.stop(action.name)
                self.echo(f"{_clock()} stopped {action.name}: {action.reason}")
            if tracker is not None:
                # Cheap unless something is new (an iteration, a phase, the end); never raises.
                url = tracker.update(new, self.store)
                if url and new.mlflow_run_url != url:
                    new.mlflow_run_url = url
            if new.wire() != status.wire() or isinstance(action, Launch):
                self.store.write_json(self.store.path("status.json"), new.wire())
            status = new
            line = _progress(status, observed)
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


def _progress(status: RunStatus, observed: Observed) -> str:
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
