"""The thin Kopf layer: when to reconcile, and how to report it. The decisions live in reconcile.py.

Handlers are sync (they call the blocking Kubernetes and Ray clients), so Kopf runs them in its thread
pool; they never sleep: waiting is Kopf's job (TemporaryError delays, the timer's interval).

What a new run costs the API server is what bounds a storm of them (docs/reliability.md, section 4), so the
layer spends as few requests as it can: Kopf keeps its handler progress and last-handled spec in this
process's memory (``_MemoryProgress``, ``_MemoryDiffBase``) rather than in annotations (one merge patch of
the resource per reconcile saved), a reconcile decides on Kopf's body when its status is the one this
process wrote last (``_Written``) instead of reading the resource again, and a new run's first reconcile runs
on the event that announces it rather than a watch round trip later (``_submit_early``), and in a storm of new
runs every first job goes out before the runs' finalizer patches, status writes and Events (``_NewRuns``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from typing import Any, Callable

import kopf
from kubernetes.client.exceptions import ApiException

from llm2llm.spec import GROUP, PLURAL, VERSION

from . import metrics
from .reconcile import Context, Outcome, Transient, cleanup, reconcile

FINALIZER = f"{GROUP}/finalizer"
EVENT_RETRIES = 10  # bounded retries of the create/update/resume handler; the timer keeps going anyway
DELETE_RETRIES = 10  # then the run is let go with a warning rather than stuck in Terminating
TRANSIENT_DELAY = 5.0
BUSY_DELAY = 0.5
# How long a new run's finalizer patch may wait for the first jobs of other new runs (see _NewRuns).
FINALIZER_HOLD_S = 3.0

# One reconcile at a time per run: the timer and the event handlers may fire together.
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


class _Written:
    """The status this process last wrote to each run (by uid), to tell whether Kopf's body is current.

    Only this operator writes a run's status, and only under the run's lock, so a body whose status is the
    one last written here is as current as a GET would be (for the spec too: a newer spec comes with its own
    update event). So is a body with no status of a run this process never wrote: the watch starts from a
    consistent list, so a status another process wrote before this one started is in it. Anything else (a
    body an event behind our last write, a write that failed or timed out and may have landed) reads the
    resource first."""

    _UNKNOWN = object()

    def __init__(self) -> None:
        self._status: dict[str, Any] = {}
        self._guard = threading.Lock()

    def current(self, uid: str, status: Any) -> bool:
        with self._guard:
            last = self._status.get(uid)
        return last is not self._UNKNOWN and (last or None) == (status or None)

    def wrote(self, uid: str, status: dict[str, Any] | None) -> None:
        with self._guard:
            self._status[uid] = status if status is not None else self._UNKNOWN

    def forget(self, uid: str) -> None:
        with self._guard:
            self._status.pop(uid, None)


_written = _Written()


class _MemoryProgress(kopf.AnnotationsProgressStorage):
    """Kopf's per-handler progress (retries, delays, success) in this process's memory, by run uid.

    Persisting it in annotations costs a patch of the resource per reconcile, and it buys nothing here: a
    restarted operator redoes a handler, which is one more level-based reconcile (deterministic job names:
    never a second job). Only the touch that wakes a delayed retry still patches the resource (an annotation,
    as before): it is what makes Kopf come back to the run."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix=prefix)
        self._records: dict[tuple[str, str], Any] = {}
        self._guard = threading.Lock()

    def fetch(self, *, key: Any, body: kopf.Body) -> Any:
        with self._guard:
            return self._records.get((body.metadata.uid, key))

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        with self._guard:
            self._records[(body.metadata.uid, key)] = dict(record)

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        with self._guard:
            self._records.pop((body.metadata.uid, key), None)

    def forget(self, uid: str) -> None:
        with self._guard:
            for k in [k for k in self._records if k[0] == uid]:
                del self._records[k]


class _MemoryDiffBase(kopf.AnnotationsDiffBaseStorage):
    """The last-handled essence (spec, labels, annotations) Kopf compares a run with to tell an update, kept in
    this process's memory by run uid (no annotation patch). After a restart every run counts as new, and its
    create handler reconciles it: the same level-based reconcile as resume."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix=prefix)
        self._essences: dict[str, Any] = {}
        self._guard = threading.Lock()

    def fetch(self, *, body: kopf.Body) -> Any:
        with self._guard:
            return self._essences.get(body.metadata.uid)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        with self._guard:
            self._essences[body.metadata.uid] = essence

    def forget(self, uid: str) -> None:
        with self._guard:
            self._essences.pop(uid, None)


_progress = _MemoryProgress(GROUP)
_diffbase = _MemoryDiffBase(GROUP)


def register(ctx: Context) -> None:
    """Register the handlers on Kopf's default registry (once per process)."""
    cfg = ctx.settings
    new_runs = _NewRuns(FINALIZER_HOLD_S)

    @kopf.on.startup(id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        new_runs.settings = settings
        # Kopf's progress and diff-base in memory (see _MemoryProgress): not in our status, whose strict
        # schema would prune them, nor in annotations, which cost a patch of the resource per reconcile.
        settings.persistence.progress_storage = _progress
        settings.persistence.diffbase_storage = _diffbase
        settings.persistence.finalizer = FINALIZER
        # Our own events are explicit (one per planner event); only Kopf's warnings become events.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "llm2llm-operator"
        # Sync handlers: bounded threads (the default is CPU-based). A reconcile mostly waits on the API server,
        # so more threads absorb a storm of new runs faster, up to where they take the GIL from Kopf's own event
        # loop (16 beat 32 here: docs/reliability.md, section 4).
        settings.execution.max_workers = cfg.workers
        # We watch one known resource in a fixed list of namespaces (or all): no need to scan the cluster
        # for namespaces and CRDs, which a namespaced install's RBAC (rightly) does not allow.
        settings.scanning.disabled = True

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile", retries=EVENT_RETRIES)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", retries=EVENT_RETRIES)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile", retries=EVENT_RETRIES, field="spec")
    def on_change(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        _reconcile(body, ctx, logger, from_timer=False)

    # type None: the listing Kopf starts its watch with (runs created while the operator was starting up).
    @kopf.on.event(GROUP, VERSION, PLURAL, id="submit-new")
    async def on_new(type: str | None, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        if type in ("ADDED", None) and _brand_new(body):
            await new_runs.submit(functools.partial(_submit_early, body, ctx, logger))

    # The first tick waits an interval: at creation the event handler is already reconciling.
    @kopf.timer(GROUP, VERSION, PLURAL, id="timer", interval=cfg.interval, initial_delay=cfg.interval)
    def on_timer(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        if body.metadata.get("deletionTimestamp"):
            return
        _reconcile(body, ctx, logger, from_timer=True)

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup")
    def on_delete(body: kopf.Body, logger: logging.Logger, retry: int, **_: Any) -> None:
        uid = body.metadata.uid
        try:
            stopped, deleted = cleanup(dict(body), ctx)
        except Transient as err:
            metrics.RECONCILE_ERRORS.labels(kind="delete").inc()
            if retry < DELETE_RETRIES:
                raise kopf.TemporaryError(f"cleanup: {err}", delay=TRANSIENT_DELAY) from err
            kopf.warn(body, reason="CleanupFailed", message=f"gave up after {retry} retries: {err}")
            logger.error("cleanup of %s gave up: %s", body.metadata.name, err)
            stopped, deleted = [], False
        if stopped:
            kopf.info(body, reason="JobsStopped", message=", ".join(stopped))
        logger.info("deleted: stopped %d job(s)%s", len(stopped), ", deleted the run's data" if deleted else "")
        metrics.set_phase(uid, None)
        with _locks_guard:
            _locks.pop(uid, None)
        _written.forget(uid)
        _progress.forget(uid)
        _diffbase.forget(uid)
        with _early_guard:
            _early.pop(uid, None)


def _brand_new(body: kopf.Body) -> bool:
    """Created just now: Kopf has not handled it yet (no finalizer), nothing has written its status."""
    meta = body.metadata
    return (not body.get("status") and FINALIZER not in (meta.get("finalizers") or [])
            and not meta.get("deletionTimestamp"))


class _NewRuns:
    """Runs the early submits of new runs in Kopf's handler threads, and holds each new run's finalizer patch
    until the submits queued behind it are out (at most ``hold_s``).

    Kopf patches a new run's finalizer right after its event handlers return, and the create handler's status
    patch and Event follow that patch's watch event. In a storm of new runs those three writes of the runs
    already submitted take the API server's CPU from the RayJob creates still queued: on 2 cores a patch of the
    run costs it about twice a RayJob create. Holding the patch while submits are pending puts every first job
    ahead of the bookkeeping; with no storm nothing is pending once a run's own submit is done, and nothing
    waits. Only the event loop touches the counter (this is an async handler's state), so it needs no lock."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.settings: kopf.OperatorSettings | None = None  # Kopf's, from the startup handler: its executor
        self._pending = 0
        self._idle = asyncio.Event()  # bound to the loop at its first use

    async def submit(self, fn: Callable[[], None]) -> None:
        self._pending += 1
        self._idle.clear()
        try:
            executor = self.settings.execution.executor if self.settings is not None else None
            # Kopf's context (its loggers' and handlers' variables) goes with the call, as for its sync handlers.
            await asyncio.get_running_loop().run_in_executor(executor, contextvars.copy_context().run, fn)
        finally:
            self._pending -= 1
            if not self._pending:
                self._idle.set()
        if self._pending:
            try:
                await asyncio.wait_for(self._idle.wait(), self.hold_s)
            except TimeoutError:
                pass  # a steady stream of new runs: let this one's bookkeeping go


# A new run's early reconcile, by uid, until a handler of the run commits it: (generation, outcome).
_early: dict[str, tuple[Any, Outcome]] = {}
_early_guard = threading.Lock()


def _submit_early(body: kopf.Body, ctx: Context, logger: logging.Logger) -> None:
    """A new run's first reconcile, in the cycle of the event that announced the run. Kopf runs the create
    handler only in the next cycle, after its finalizer patch has come back through the watch, and under a
    storm of new runs that round trip was most of the wait for the first job. So the job is submitted now;
    the outcome (status, events) is kept, and the create handler writes it, without a second reconcile, if
    nothing has changed since (same generation, still no status). The status is written only then because a
    write now would fail Kopf's finalizer patch (a resourceVersion precondition) and cost it a round. Between
    the two the run is in the crash window "job created, status not yet written": a restarted operator's
    reconcile meets the job (AlreadyExists) and records it. A busy or failing early reconcile is simply left
    to the create handler."""
    meta = body.metadata
    lock = _lock(meta.uid)
    if not lock.acquire(blocking=False):
        return
    started = time.monotonic()
    try:
        outcome = reconcile(dict(body), ctx)
        if outcome.submitted:
            metrics.JOBS_SUBMITTED.labels(launcher=outcome.launcher or "unknown").inc()
            logger.info("submitted %s", getattr(outcome.action, "name", "?"))
        with _early_guard:
            _early[meta.uid] = (meta.get("generation"), outcome)
    except Transient as err:
        metrics.RECONCILE_ERRORS.labels(kind="transient").inc()
        logger.debug("early reconcile left to the create handler: %s", err)
    finally:
        lock.release()
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def _reconcile(body: kopf.Body, ctx: Context, logger: logging.Logger, from_timer: bool) -> None:
    meta = body.metadata
    lock = _lock(meta.uid)
    if not lock.acquire(blocking=False):
        if from_timer:
            return  # the other reconcile does the work
        raise kopf.TemporaryError("another reconcile of this run is in progress", delay=BUSY_DELAY)
    started = time.monotonic()
    try:
        # Kopf's body may be a watch event behind our last status write: then decide on the latest resource.
        # (dict(body) pins the raw event: Kopf replaces a live body's content with each new event, never mutates it.)
        fresh: dict[str, Any] | None = dict(body)
        with _early_guard:
            early = _early.pop(meta.uid, None)
        if (early is not None and early[0] == meta.get("generation") and not body.get("status")
                and _written.current(meta.uid, None)):
            outcome, committing = early[1], True  # the early reconcile of this very state: write it
        else:
            if not _written.current(meta.uid, body.get("status")):
                fresh = _read(ctx, meta.namespace, meta.name)
                if fresh is None or fresh["metadata"]["uid"] != meta.uid:
                    return
            outcome, committing = reconcile(fresh, ctx), False
        if outcome.status is not None:
            _written.wrote(meta.uid, None)  # until the write is known to have landed (or not)
            _written.wrote(meta.uid, _write_status(ctx, fresh, outcome.status))
        elif fresh.get("status") and not _written.current(meta.uid, fresh.get("status")):
            _written.wrote(meta.uid, fresh["status"])  # read from the server: the current status
        for ev in outcome.events:
            kopf.event(fresh, type="Warning" if ev.warning else "Normal", reason=ev.reason, message=ev.message)
        if outcome.submitted and not committing:  # the early reconcile counted its own
            metrics.JOBS_SUBMITTED.labels(launcher=outcome.launcher or "unknown").inc()
            logger.info("submitted %s", getattr(outcome.action, "name", "?"))
        if outcome.phase:
            metrics.set_phase(meta.uid, outcome.phase)
        if outcome.invalid is not None:
            if outcome.events:  # log transitions, not every tick
                logger.warning("%s: %s", outcome.invalid.reason, outcome.invalid.message)
            if outcome.invalid.reason == "InvalidSpec" and not from_timer:
                # Only a new spec can fix it, and that triggers the update handler: do not retry.
                raise kopf.PermanentError(outcome.invalid.message)
    except Transient as err:
        metrics.RECONCILE_ERRORS.labels(kind="transient").inc()
        raise kopf.TemporaryError(str(err), delay=TRANSIENT_DELAY) from err
    except kopf.PermanentError:
        metrics.RECONCILE_ERRORS.labels(kind="invalid").inc()
        raise
    except Exception:  # a bug: Kopf logs it and retries with its default backoff
        metrics.RECONCILE_ERRORS.labels(kind="unexpected").inc()
        raise
    finally:
        lock.release()
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def _read(ctx: Context, ns: str, name: str) -> dict[str, Any] | None:
    """The run as the server holds it now. A list by name rather than a GET: this read is the exception (a body
    behind this process's last status write, the first reconcile of a run after a restart), and list is what
    Kopf's watch needs anyway, so the chart grants no verb for it alone (list covers get)."""
    try:
        items = ctx.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                         field_selector=f"metadata.name={name}")["items"]
        return items[0] if items else None
    except ApiException as err:
        raise Transient(f"cannot read {ns}/{name}: {err.status} {err.reason}") from err
    except OSError as err:
        raise Transient(f"cannot read {ns}/{name}: {err}") from err


def _write_status(ctx: Context, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any] | None:
    """Replace the status through the status subresource; returns the status the server now holds. A merge
    patch replaces lists whole; keys that disappeared are nulled. Unconditional on purpose: this operator is
    the only status writer and the per-run lock serializes it, while Kopf's own patches (the finalizer, a
    retry's touch) would make a resourceVersion precondition fail for nothing. A spec change meanwhile shows
    as an older observedGeneration, and the update handler reconciles again."""
    meta = body["metadata"]
    patch: dict[str, Any] = dict(status)
    for key in body.get("status") or {}:
        patch.setdefault(key, None)
    try:
        written = ctx.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
            {"status": patch},
            _content_type="application/merge-patch+json")
    except ApiException as err:
        raise Transient(f"cannot write status: {err.status} {err.reason}: {err.body}") from err
    except OSError as err:
        raise Transient(f"cannot write status: {err}") from err
    return (written or {}).get("status") if isinstance(written, dict) else None
