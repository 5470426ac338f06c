"""The thin Kopf layer: when to reconcile, and how to report it. The decisions live in reconcile.py.

Handlers are sync (they call the blocking Kubernetes and Ray clients), so Kopf runs them in its thread
pool; they never sleep: waiting is Kopf's job (TemporaryError delays, the timer's interval).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from llm2llm.spec import GROUP, PLURAL, VERSION

from . import metrics
from .reconcile import Context, Transient, cleanup, reconcile

FINALIZER = f"{GROUP}/finalizer"
EVENT_RETRIES = 10  # bounded retries of the create/update/resume handler; the timer keeps going anyway
DELETE_RETRIES = 10  # then the run is let go with a warning rather than stuck in Terminating
TRANSIENT_DELAY = 5.0
BUSY_DELAY = 0.5

# One reconcile at a time per run: the timer and the event handlers may fire together.
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def register(ctx: Context) -> None:
    """Register the handlers on Kopf's default registry (once per process)."""
    cfg = ctx.settings

    @kopf.on.startup(id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Our status schema is strict and would prune Kopf's own status keys: keep Kopf's progress
        # and diff-base in annotations instead.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.persistence.finalizer = FINALIZER
        # Our own events are explicit (one per planner event); only Kopf's warnings become events.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "llm2llm-operator"
        settings.execution.max_workers = 8  # sync handlers: bounded threads (the default is CPU-based)
        # We watch one known resource in a fixed list of namespaces (or all): no need to scan the cluster
        # for namespaces and CRDs, which a namespaced install's RBAC (rightly) does not allow.
        settings.scanning.disabled = True

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile", retries=EVENT_RETRIES)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", retries=EVENT_RETRIES)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile", retries=EVENT_RETRIES, field="spec")
    def on_change(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        _reconcile(body, ctx, logger, from_timer=False)

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


def _reconcile(body: kopf.Body, ctx: Context, logger: logging.Logger, from_timer: bool) -> None:
    meta = body.metadata
    lock = _lock(meta.uid)
    if not lock.acquire(blocking=False):
        if from_timer:
            return  # the other reconcile does the work
        raise kopf.TemporaryError("another reconcile of this run is in progress", delay=BUSY_DELAY)
    started = time.monotonic()
    try:
        # Kopf's body may be a watch event behind: decide on the latest resource.
        fresh = _get(ctx, meta.namespace, meta.name)
        if fresh is None or fresh["metadata"]["uid"] != meta.uid:
            return
        outcome = reconcile(fresh, ctx)
        if outcome.status is not None:
            _write_status(ctx, fresh, outcome.status)
        for ev in outcome.events:
            kopf.event(fresh, type="Warning" if ev.warning else "Normal", reason=ev.reason, message=ev.message)
        if outcome.submitted:
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


def _get(ctx: Context, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return ctx.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise Transient(f"cannot read {ns}/{name}: {err.status} {err.reason}") from err
    except OSError as err:
        raise Transient(f"cannot read {ns}/{name}: {err}") from err


def _write_status(ctx: Context, body: dict[str, Any], status: dict[str, Any]) -> None:
    """Replace the status through the status subresource. A merge patch replaces lists whole; keys
    that disappeared are nulled. Unconditional on purpose: this operator is the only status writer and
    the per-run lock serializes it, while Kopf's own annotation patches would make a resourceVersion
    precondition fail for nothing. A spec change meanwhile shows as an older observedGeneration, and
    the update handler reconciles again."""
    meta = body["metadata"]
    patch: dict[str, Any] = dict(status)
    for key in body.get("status") or {}:
        patch.setdefault(key, None)
    try:
        ctx.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
            {"status": patch},
            _content_type="application/merge-patch+json")
    except ApiException as err:
        raise Transient(f"cannot write status: {err.status} {err.reason}: {err.body}") from err
    except OSError as err:
        raise Transient(f"cannot write status: {err}") from err
