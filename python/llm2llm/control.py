"""The control core: one reconcile step of one run, shared by ``llm2llm run`` and the operator.

A step observes (the iterations and stage markers committed in storage, the jobs the launcher knows), asks
the pure planner what to do, does it through the launcher, mirrors the result into experiment tracking, and
hands back the new status. The local runner and the operator differ only in what they plug in:

=================  ==================================  ===============================================
                   ``llm2llm run``                     the operator
=================  ==================================  ===============================================
launcher           Ray Jobs API (a private local head)  KubeRay RayJob, or a cluster's Ray Jobs API
status store       ``<output>/<run>/status.json``       the resource's status subresource
run identity       uid kept in ``run.json``             ``metadata.uid`` and ``metadata.generation``
=================  ==================================  ===============================================

Nothing here is remembered between steps (level-based): a restarted caller reaches the same decision. A
launcher signals an unreachable backend with ``Transient`` (retry later) and a job the backend refuses with
``Invalid`` (reported as ``Ready=False``); the core never sees a Kubernetes or Ray exception type.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from .launch import entrypoint, job_env
from .planner import Action, Event, Idle, JobObservation, Launch, Observed, Stop, advance
from .spec import AugmentationRunSpec
from .status import STAGES, TERMINAL, RunStatus
from .storage import CorruptFile, RunStorage, StorageError

log = logging.getLogger(__name__)

# Labels (Kubernetes) or metadata (Ray Jobs API) on every job a run launches; run-uid selects a run's jobs.
LABEL_RUN = "llm2llm.io/run"
LABEL_RUN_UID = "llm2llm.io/run-uid"
LABEL_NAMESPACE = "llm2llm.io/namespace"
LABEL_ITERATION = "llm2llm.io/iteration"
LABEL_ATTEMPT = "llm2llm.io/attempt"


class Transient(Exception):
    """Something a step needs (API server, Ray, storage, tracking) is unreachable: try again later."""


class Invalid(Exception):
    """The run cannot go on as written. Reported as condition Ready=False; no job is launched."""

    def __init__(self, reason: str, message: str, phase: str = "Failed"):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.phase = phase  # Pending: something that may still appear or come back (a Secret, the storage)


@dataclass(frozen=True)
class RunRef:
    """Who the run is. ``generation`` is the spec's generation (None for a local run: always re-planned)."""

    name: str
    uid: str
    namespace: str | None = None
    generation: int | None = None


def job_labels(run: RunRef, iteration: int | None = None, attempt: int | None = None) -> dict[str, str]:
    labels = {LABEL_RUN: run.name, LABEL_RUN_UID: run.uid}
    if run.namespace:
        labels[LABEL_NAMESPACE] = run.namespace
    if iteration is not None:
        labels[LABEL_ITERATION] = str(iteration)
    if attempt is not None:
        labels[LABEL_ATTEMPT] = str(attempt)
    return labels


@dataclass(frozen=True)
class JobRequest:
    """One iteration attempt, as every launcher is asked to start it."""

    name: str
    iteration: int
    attempt: int
    entrypoint: str
    env: dict[str, str]
    labels: dict[str, str]


class Launcher(Protocol):
    kind: str

    def observe(self, name: str, iteration: int, attempt: int) -> JobObservation | None:
        """The job's state, or None when it does not exist (never started, or gone)."""

    def submit(self, job: JobRequest) -> bool:
        """Start the job; False when a job of that name already exists (so a retry never makes a second)."""

    def stop(self, name: str) -> None:
        """Ask the job to end and free what it holds; a missing job is not an error."""


@dataclass(frozen=True)
class JobSettings:
    """What the caller adds to every job: the interpreter of the entrypoint and extra environment."""

    python: str = "python"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Step:
    status: RunStatus
    action: Action | None
    events: list[Event]
    submitted: bool = False  # a job was created by this step
    invalid: Invalid | None = None

    @property
    def finished(self) -> bool:
        return self.status.phase in ("Succeeded", "Failed") and self.status.stop_reason is not None


# --- inputs --------------------------------------------------------------------------------------------

def load_status(doc: Any) -> RunStatus:
    """A stored status, or an empty one when it does not parse (storage still has every committed iteration,
    and the jobs keep their deterministic names, so nothing is lost or launched twice)."""
    if not doc:
        return RunStatus()
    try:
        return RunStatus.model_validate(doc)
    except ValueError as err:
        log.warning("the stored status does not parse (%s); starting from an empty one", str(err).splitlines()[0])
        return RunStatus()


def read_status(storage: RunStorage, path: str = "status.json") -> RunStatus:
    """The local runner's status store: a corrupt file counts as no status; unreachable storage raises."""
    try:
        return load_status(storage.read_json(storage.path(path)))
    except CorruptFile as err:
        log.warning("%s; starting from an empty status", err)
        return RunStatus()


def _absolute(uri: str | None, base: str | None, field_name: str) -> str | None:
    if uri is None or "://" in uri:
        return uri
    uri = os.path.expanduser(uri)
    if os.path.isabs(uri):
        return uri
    if base is None:
        raise Invalid("RelativePath", f"spec.{field_name} {uri!r} is a relative path: use an absolute path or a "
                                      "URI, or start the operator with --base-dir (LLM2LLM_BASE_DIR)")
    return os.path.normpath(os.path.join(base, uri))


def resolve_paths(spec: AugmentationRunSpec, base: str | None) -> AugmentationRunSpec:
    """Jobs run in another working directory (or on another machine): make local paths absolute, against
    ``base`` (the runner's working directory, the operator's --base-dir). Without a base a relative path is
    an error. Models are built-in names or folders, and a folder given as ./relative resolves the same way."""
    spec = spec.model_copy(deep=True)
    spec.data.seed = _absolute(spec.data.seed, base, "data.seed")  # type: ignore[assignment]
    spec.data.test = _absolute(spec.data.test, base, "data.test")
    spec.output = _absolute(spec.output, base, "output")  # type: ignore[assignment]
    for name, model in (("student.model", spec.student), ("teacher.model", spec.teacher)):
        if model is spec.teacher and spec.teacher.kind == "openai":
            continue  # the endpoint's model name
        if model.model.startswith(("./", "../", "~/")):  # a folder (spec.BUILTIN_MODELS are names)
            model.model = _absolute(model.model, base, name)  # type: ignore[assignment]
    return spec


# --- the step ------------------------------------------------------------------------------------------

def finished(status: RunStatus, generation: int | None) -> bool:
    """A finished run whose spec has not changed since: nothing can change, skip storage and the launcher.
    Without a generation (a local run) the planner always looks again: a raised maxIterations goes on."""
    return generation is not None and status.phase in ("Succeeded", "Failed") and status.stop_reason is not None \
        and status.observed_generation == generation and status.finished_at is not None


def observe(storage: RunStorage, launcher: Launcher, status: RunStatus, now: datetime | None = None) -> Observed:
    try:
        iterations = storage.iterations()
        n = len(iterations)
        done = tuple(s for s in STAGES if storage.stage_done(n, s) is not None)
    except StorageError as err:
        # Said in status (not a retry hidden in a log): the run goes on by itself once the storage is back.
        raise Invalid("StorageUnavailable", f"spec.output {storage.output}: {err}", "Pending") from None
    jobs: dict[str, JobObservation] = {}
    for rec in status.jobs:
        # A stopped job stays watched until it is really gone: the next attempt must not overlap it.
        if rec.state in TERMINAL and not rec.releasing:
            continue
        ob = launcher.observe(rec.name, rec.iteration, rec.attempt)
        if ob is not None:
            jobs[rec.name] = ob
    return Observed(iterations=iterations, jobs=jobs, stages_done=done, now=now or datetime.now(timezone.utc))


def step(run: RunRef, spec: AugmentationRunSpec, status: RunStatus, *, storage: RunStorage, launcher: Launcher,
         job: JobSettings, tracker: Any | None = None, now: datetime | None = None) -> Step:
    """One reconcile of one run. ``spec`` is validated and has its paths resolved; ``tracker`` is an
    ``llm2llm.tracking.MlflowTracker`` (or None). Raises ``Transient``; an ``Invalid`` becomes Ready=False."""
    if finished(status, run.generation):
        return Step(status, Idle(status.phase), [])
    before = status.model_copy(deep=True)
    try:
        status = status.model_copy(deep=True)
        status.set_condition("Ready", True, "SpecValid", "spec and its references are valid", run.generation)
        observed = observe(storage, launcher, status, now)
        new, action, events = advance(spec, status, observed, run_name=run.name, run_uid=run.uid,
                                      generation=run.generation)
        new.output = storage.uri()
        submitted = _carry_out(action, run, spec, launcher, job, events)
    except Invalid as bad:
        return refuse(before, bad, run.generation)
    if tracker is not None:
        # Cheap unless something is new (an iteration, a phase, the end); never raises.
        url = tracker.update(new, storage)
        if url:
            new.mlflow_run_url = url
    return Step(new, action, events, submitted)


def refuse(status: RunStatus, bad: Invalid, generation: int | None) -> Step:
    """Ready=False with the reason; a run under way keeps its phase (it just launches nothing new)."""
    status = status.model_copy(deep=True)
    old = status.condition("Ready")
    changed = old is None or old.status != "False" or old.reason != bad.reason or old.message != bad.message
    status.observed_generation = generation
    status.set_condition("Ready", False, bad.reason, bad.message, generation)
    if not status.jobs:
        status.phase = bad.phase  # type: ignore[assignment]
    events = [Event(bad.reason, bad.message, warning=True)] if changed else []
    return Step(status, None, events, invalid=bad)


def job_request(run: RunRef, spec: AugmentationRunSpec, action: Launch, job: JobSettings) -> JobRequest:
    return JobRequest(
        name=action.name, iteration=action.iteration, attempt=action.attempt,
        entrypoint=entrypoint(run.name, run.uid, spec, action.iteration, action.attempt, spec.ray.python or job.python),
        env=job_env(spec, job.env),
        labels=job_labels(run, action.iteration, action.attempt),
    )


def _carry_out(action: Action, run: RunRef, spec: AugmentationRunSpec, launcher: Launcher, job: JobSettings,
               events: list[Event]) -> bool:
    if isinstance(action, Launch):
        return launcher.submit(job_request(run, spec, action, job))
    if isinstance(action, Stop):
        launcher.stop(action.name)
        if action.announce:
            # The planner already recorded how this attempt ended (Suspended, or Failed by deadline).
            events.append(Event("JobStopped", f"{action.name}: {action.reason}", warning=action.reason != "Suspended"))
    return False


__all__ = [
    "Invalid", "JobRequest", "JobSettings", "Launcher", "RunRef", "Step", "Transient", "finished", "job_labels",
    "job_request", "load_status", "observe", "read_status", "refuse", "resolve_paths", "step",
]
