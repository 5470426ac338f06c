"""The pure iteration planner: (spec, status, what is observed) -> (new status, next action, events).

Both the operator and the local runner call ``advance`` on every tick and carry out the action it
returns. Nothing here has side effects or remembers anything between calls: the state is what storage
says is committed (iteration manifests, stage markers) and what the launcher says about jobs whose
names are derived from the run, so a restarted caller reaches the same decision.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal, Union

from .spec import AugmentationRunSpec
from .status import STAGES, TERMINAL, ActiveJob, IterationStatus, JobPhase, JobRecord, RunStatus
MAX_BACKOFF_SECONDS = 3600


@dataclass(frozen=True)
class JobObservation:
    iteration: int
    attempt: int
    phase: JobPhase
    message: str = ""


@dataclass(frozen=True)
class Observed:
    iterations: dict[int, IterationStatus]
    jobs: dict[str, JobObservation] = field(default_factory=dict)
    stages_done: tuple[str, ...] = ()  # committed stages of the iteration in flight
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass(frozen=True)
class Launch:
    iteration: int
    attempt: int
    name: str


@dataclass(frozen=True)
class Wait:
    name: str
    iteration: int
    attempt: int


@dataclass(frozen=True)
class Backoff:
    iteration: int
    attempt: int
    until: datetime


@dataclass(frozen=True)
class Stop:
    """Stop a running job (suspend, deadline). The run itself carries on or pauses. Repeated (``announce``
    False) while a stopped job is still winding down: stopping is idempotent, and no attempt may overlap it."""

    name: str
    reason: str
    announce: bool = True


@dataclass(frozen=True)
class Finish:
    phase: Literal["Succeeded", "Failed"]
    reason: str
    message: str


@dataclass(frozen=True)
class Idle:
    """Nothing to do (suspended with no job running, or already finished)."""

    reason: str


Action = Union[Launch, Wait, Backoff, Stop, Finish, Idle]


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


def job_name(run_name: str, run_uid: str, iteration: int, attempt: int) -> str:
    """Deterministic, DNS-safe job name: the same (run, iteration, attempt) always gets the same name,
    so a retried submit after a crash finds the job it already created instead of making a second one."""
    digest = hashlib.sha256(f"{run_uid}/{run_name}".encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9-]", "-", run_name.lower())[:36].strip("-") or "run"
    return f"{base}-{digest}-i{iteration}-a{attempt}"


def stop_reason(spec: AugmentationRunSpec, iterations: list[IterationStatus]) -> str | None:
    """Why the run should stop after these committed iterations, or None. Also used by the job to skip
    the teacher on the last iteration."""
    if not iterations:
        return None
    last = iterations[-1]
    if last.stop_reason:
        return last.stop_reason
    if len(iterations) >= spec.loop.max_iterations:
        return "MaxIterations"
    if spec.loop.stop_when.no_failures and last.failures == 0 and last.seed_accuracy is not None:
        return "NoFailures"
    plateau = spec.loop.stop_when.plateau
    if plateau and len(iterations) > plateau.iterations:
        metric = [i.test_accuracy if i.test_accuracy is not None else i.seed_accuracy for i in iterations]
        if None not in metric[-plateau.iterations - 1 :]:
            if metric[-1] - max(metric[: -plateau.iterations]) < plateau.min_gain:  # type: ignore[operator]
                return "Plateau"
    if spec.budget.gpu_hours is not None and sum(i.gpu_seconds for i in iterations) >= spec.budget.gpu_hours * 3600:
        return "GpuBudget"
    if spec.budget.teacher_tokens is not None:
        used = sum(i.tokens.teacher_prompt + i.tokens.teacher_completion for i in iterations)
        if used >= spec.budget.teacher_tokens:
            return "TeacherBudget"
    return None


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def advance(
    spec: AugmentationRunSpec,
    status: RunStatus,
    observed: Observed,
    *,
    run_name: str,
    run_uid: str,
    generation: int | None = None,
) -> tuple[RunStatus, Action, list[Event]]:
    """One reconcile step. Returns the new status, the action to carry out, and events for transitions."""
    st = status.model_copy(deep=True)
    events: list[Event] = []
    st.observed_generation = generation
    st.max_iterations = spec.loop.max_iterations
    stamp = observed.now.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    st.started_at = st.started_at or stamp

    # 1. Committed iterations, straight from storage.
    known = {i.index for i in st.iterations}
    for it in sorted(observed.iterations.values(), key=lambda i: i.index):
        if it.index not in known:
            events.append(Event("IterationSucceeded", _iteration_message(it)))
        st.record_iteration(it)
    done = [observed.iterations[i] for i in sorted(observed.iterations)]
    n = len(done)

    # 2. Jobs: what we recorded, updated by what the launcher sees now.
    records = {r.name: r for r in st.jobs}
    for rec in records.values():
        if rec.releasing:
            ob = observed.jobs.get(rec.name)
            if ob is None or ob.phase in TERMINAL:
                rec.releasing = None  # really gone (or ended): a new attempt may start
    for name, ob in observed.jobs.items():
        rec = records.setdefault(name, JobRecord(name=name, iteration=ob.iteration, attempt=ob.attempt, submitted_at=stamp))
        if rec.state not in TERMINAL and ob.phase != rec.state:
            rec.state, rec.message = ob.phase, ob.message
            if ob.phase in TERMINAL:
                rec.finished_at = stamp
    for rec in records.values():
        if rec.state not in TERMINAL and rec.name not in observed.jobs:
            if spec.suspend:
                # Stopped by the suspend, before a crash let us record it: not a failed attempt.
                rec.state, rec.message, rec.finished_at = "Suspended", "stopped because the run was suspended", stamp
            else:
                rec.state, rec.message, rec.finished_at = "Missing", "the job is gone and left no result", stamp
    for rec in records.values():
        # A job that exits 0 but never committed its iteration did not succeed.
        if rec.state == "Succeeded" and rec.iteration not in observed.iterations:
            rec.state, rec.message = "Failed", "job succeeded but wrote no iteration manifest"
    before = {j.name: j.state for j in status.jobs}
    for rec in records.values():
        if rec.state in ("Failed", "Missing") and before.get(rec.name) not in ("Failed", "Missing"):
            events.append(Event("JobFailed", f"{rec.name} (iteration {rec.iteration}, attempt {rec.attempt}): {rec.message}", True))
    st.jobs = sorted(records.values(), key=lambda r: (r.iteration, r.attempt))
    for it in st.iterations:
        # The job does not know the name it was submitted under: the last attempt of its iteration committed it.
        if it.job is None:
            it.job = next((r.name for r in reversed(st.jobs) if r.iteration == it.index), None)
    st.current_iteration = n
    st.stage = _stage(observed.stages_done)

    # 3. Finished?
    reason = stop_reason(spec, done)
    if reason is not None:
        st.current_iteration = n - 1
        return _finish(st, "Succeeded", reason, _success_message(reason, done), generation, events, stamp)

    mine = [r for r in st.jobs if r.iteration == n]
    running = [r for r in mine if r.state not in TERMINAL]
    active = running[-1] if running else None
    st.active_job = None
    if active:
        st.active_job = ActiveJob(name=active.name, iteration=n, attempt=active.attempt, submitted_at=active.submitted_at)
    st.iteration_label = f"{n + 1}/{spec.loop.max_iterations}"

    # 4. Suspended: stop what runs, launch nothing.
    if spec.suspend:
        st.phase = "Suspended"
        st.set_condition("Suspended", True, "Suspended", "spec.suspend is true", generation)
        st.set_condition("Progressing", False, "Suspended", "spec.suspend is true", generation)
        if status.phase != "Suspended":
            events.append(Event("Suspended", "run suspended"))
        if active:
            _end(active, "Suspended", "stopped because the run was suspended", stamp)
            active.releasing = True
            st.active_job = None
            return st, Stop(active.name, "Suspended"), events
        return st, Idle("Suspended"), events
    if st.condition("Suspended") is not None:
        st.set_condition("Suspended", False, "Resumed", "", generation)

    # 5. The iteration in flight.
    if active:
        deadline = spec.active_deadline_seconds
        if deadline and observed.now - _parse_time(active.submitted_at) > timedelta(seconds=deadline):
            _end(active, "Failed", f"DeadlineExceeded: ran longer than activeDeadlineSeconds ({deadline}s)", stamp)
            active.releasing = True
            events.append(Event("JobFailed", f"{active.name}: activeDeadlineSeconds exceeded", True))
            return _running(st, n, generation, f"{active.name} passed activeDeadlineSeconds"), Stop(active.name, "DeadlineExceeded"), events
        return _running(st, n, generation, f"iteration {n} attempt {active.attempt}: {st.stage or 'starting'}"), Wait(active.name, n, active.attempt), events

    stopping = next((r for r in st.jobs if r.releasing), None)
    if stopping is not None:
        # Stopped, not gone yet (a RayJob deleting its cluster, a Ray job winding down): an attempt started now
        # would run beside it, on the same storage and scratch. Ask again (idempotent) and wait.
        msg = f"waiting for {stopping.name} to stop before iteration {n} starts again"
        return _running(st, n, generation, msg, reason="WaitingForStop"), Stop(stopping.name, stopping.state, announce=False), events
    attempts = max((r.attempt for r in mine), default=0)  # names stay unique across suspends
    failed = [r for r in mine if r.state in ("Failed", "Missing")]
    if len(failed) >= spec.retry.max_attempts:
        last = failed[-1]
        msg = f"iteration {n} failed {len(failed)} time(s); last: {last.name}: {last.message}"
        return _finish(st, "Failed", "IterationFailed", msg, generation, events, stamp)
    if mine and mine[-1].state in ("Failed", "Missing"):
        last = mine[-1]
        wait = min(spec.retry.backoff_seconds * 2 ** (len(failed) - 1), MAX_BACKOFF_SECONDS)
        until = _parse_time(last.finished_at or last.submitted_at) + timedelta(seconds=wait)
        st.retry_after = until.replace(microsecond=0).isoformat().replace("+00:00", "Z")
        if observed.now < until:
            st = _running(st, n, generation, f"iteration {n} attempt {attempts} failed; retrying at {st.retry_after}", reason="BackingOff")
            return st, Backoff(n, attempts + 1, until), events
        events.append(Event("Retrying", f"iteration {n}: retry {len(failed)} of {spec.retry.max_attempts - 1}", True))
    st.retry_after = None
    name = job_name(run_name, run_uid, n, attempts + 1)
    st.jobs.append(JobRecord(name=name, iteration=n, attempt=attempts + 1, submitted_at=stamp))
    st.active_job = ActiveJob(name=name, iteration=n, attempt=attempts + 1, submitted_at=stamp)
    st.stage = None
    events.append(Event("IterationStarted", f"iteration {n} attempt {attempts + 1}: job {name}"))
    return _running(st, n, generation, f"iteration {n} attempt {attempts + 1} submitted"), Launch(n, attempts + 1, name), events


def _end(rec: JobRecord, state: str, message: str, stamp: str) -> None:
    rec.state, rec.message, rec.finished_at = state, message, stamp


def _stage(done: tuple[str, ...]) -> str | None:
    """The stage in flight: the first one without a marker."""
    for stage in STAGES:
        if stage not in done:
            return stage
    return None


def _running(st: RunStatus, n: int, generation: int | None, message: str, reason: str = "IterationRunning") -> RunStatus:
    st.phase = "Running"
    st.set_condition("Progressing", True, reason, message, generation)
    return st


def _finish(st: RunStatus, phase: str, reason: str, message: str, generation: int | None, events: list[Event],
            stamp: str) -> tuple[RunStatus, Action, list[Event]]:
    first = st.phase != phase
    st.phase = phase  # type: ignore[assignment]
    st.stop_reason = reason
    st.active_job = None
    st.stage = None
    st.retry_after = None
    st.iteration_label = f"{len(st.iterations)}/{st.max_iterations}"
    st.finished_at = st.finished_at or stamp
    st.set_condition("Progressing", False, reason, message, generation)
    st.set_condition("Succeeded", phase == "Succeeded", reason, message, generation)
    st.set_condition("Failed", phase == "Failed", reason, message, generation)
    if first:
        events.append(Event(f"Run{phase}", message, phase == "Failed"))
    return st, Finish(phase, reason, message) if first else Idle(phase), events  # type: ignore[arg-type]


def _iteration_message(it: IterationStatus) -> str:
    acc = f"{it.seed_accuracy:.3f}" if it.seed_accuracy is not None else "n/a"
    test = f", test accuracy {it.test_accuracy:.3f}" if it.test_accuracy is not None else ""
    return f"iteration {it.index}: seed accuracy {acc}{test}, {it.failures} failures, {it.kept} new rows"


def _success_message(reason: str, done: list[IterationStatus]) -> str:
    text = {
        "MaxIterations": "reached loop.maxIterations",
        "NoFailures": "the student answers every seed example correctly",
        "Plateau": "held-out accuracy stopped improving",
        "GpuBudget": "budget.gpuHours used up",
        "TeacherBudget": "budget.teacherTokens used up",
        "NoNewData": "the filter kept none of the teacher's candidates, so another iteration would retrain on the same data",
    }.get(reason, reason)
    message = f"{text} after {len(done)} iteration(s)"
    if reason == "NoNewData" and done:
        last = done[-1]
        why = ", ".join(f"{k} {v}" for k, v in sorted(last.rejected.items(), key=lambda kv: (-kv[1], kv[0])))
        message += f" (iteration {last.index}: {last.generated} candidates, rejected: {why or 'none'})"
    return message
