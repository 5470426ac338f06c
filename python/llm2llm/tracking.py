"""Experiment tracking: an AugmentationRun's status mirrored into MLflow (``spec.tracking.mlflow``).

* One parent MLflow run per AugmentationRun, tagged with the run's name and uid. A restarted runner (or
  operator) finds it again by tag, so a resumed run reuses it: nothing is created twice.
* One nested run per iteration, created once per iteration index (also found by tag), with the
  iteration's figures as metrics and its manifest as an artefact. The parent gets the same metrics with
  ``step`` = iteration index, so MLflow charts show them across iterations.
* Params: the spec, flattened (``student.training.lr``), without secret references or the tracking
  block itself. Artefacts: ``status.json`` on every update, the HTML report at the end.

Metric timestamps come from the iteration's ``finishedAt``, so logging an iteration again writes the same
(key, value, step, timestamp) rows, which MLflow's SQL stores keep once; a fully logged iteration is also
marked with a tag and skipped.

Credentials are only ever references in the spec (``credentialsSecretRef``). The value reaches this
process through the environment: ``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (read by MLflow itself), or ``LLM2LLM_MLFLOW_CREDENTIALS`` holding the Secret
key's value (a token, or ``username:password``), which the tracker puts into MLflow's variables only
while it talks to MLflow. Credentials are never logged, and neither is user info in the tracking URI.

Tracking never fails a run: ``update`` logs a warning when MLflow cannot be reached and tries again at the
next change (after a minute, doubling up to ten minutes while it keeps failing).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from .spec import AugmentationRunSpec, MlflowSpec, spec_to_wire
from .status import IterationStatus, RunStatus

if TYPE_CHECKING:
    from .storage import RunStorage

log = logging.getLogger(__name__)

CREDENTIALS_ENV = "LLM2LLM_MLFLOW_CREDENTIALS"
TAG_RUN = "llm2llm.io/run"
TAG_UID = "llm2llm.io/uid"
TAG_NAMESPACE = "llm2llm.io/namespace"
TAG_KIND = "llm2llm.io/kind"  # run | iteration
TAG_ITERATION = "llm2llm.io/iteration"
TAG_LOGGED = "llm2llm.io/logged"  # set on an iteration's run once all of it is logged
TAG_PHASE = "llm2llm.io/phase"
TAG_STOP = "llm2llm.io/stop-reason"
PARENT_TAG = "mlflow.parentRunId"
RETRY_SECONDS = 60.0
MAX_PARAM_CHARS = 500  # the strictest MLflow server limit; longer values are cut and marked
_SECRET_KEY = re.compile(r"secret|password|passwd|credential|apikey|api_key|bearer", re.IGNORECASE)
_ENV_LOCK = threading.RLock()


def redact_uri(uri: str) -> str:
    """The URI without user info (``https://user:pw@host`` -> ``https://host``)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def flatten_params(spec: AugmentationRunSpec | dict[str, Any]) -> dict[str, str]:
    """The spec as MLflow params: dotted camelCase keys, no secrets, no tracking config."""
    wire = spec_to_wire(spec) if isinstance(spec, AugmentationRunSpec) else dict(spec)
    wire.pop("tracking", None)
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if _SECRET_KEY.search(k):
                    continue
                walk(f"{prefix}.{k}" if prefix else k, v)
            return
        if isinstance(value, (list, tuple)):
            text = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        if isinstance(value, str) and "://" in value:
            text = redact_uri(text)
        if len(text) > MAX_PARAM_CHARS:
            text = text[: MAX_PARAM_CHARS - 20] + f"...[{len(text)} chars]"
        out[prefix] = text

    walk("", wire)
    return out


def iteration_metrics(it: IterationStatus) -> dict[str, float]:
    """The figures of one iteration as MLflow metrics (absent values are left out)."""
    m: dict[str, float | int | None] = {
        "seed_accuracy": it.seed_accuracy,
        "test_accuracy": it.test_accuracy,
        "failures": it.failures,
        "generated": it.generated,
        "kept": it.kept,
        "rejected": sum(it.rejected.values()),
        "train_rows": it.train_rows,
        "train_steps": it.train_steps,
        "train_loss": it.train_loss,
        "teacher_prompt_tokens": it.tokens.teacher_prompt,
        "teacher_completion_tokens": it.tokens.teacher_completion,
        "teacher_tokens": it.tokens.teacher_prompt + it.tokens.teacher_completion,
        "trained_tokens": it.tokens.trained,
        "gpu_seconds": it.gpu_seconds,
        "tokens_per_second": it.tokens_per_second,
        "mfu": it.mfu,
        "seconds_total": sum(it.seconds.values()),
    }
    for stage, secs in it.seconds.items():
        m[f"seconds/{stage}"] = secs
    for reason, n in it.rejected.items():
        m[f"rejected/{reason}"] = n
    return {k: float(v) for k, v in m.items() if v is not None}


def _ms(stamp: str | None) -> int | None:
    if not stamp:
        return None
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class MlflowTracker:
    """Mirrors one AugmentationRun into MLflow. Cheap to call on every status change: it only talks to
    MLflow when there is something new (an iteration, a phase change, the end)."""

    def __init__(
        self,
        config: MlflowSpec,
        *,
        run_name: str,
        run_uid: str,
        spec: AugmentationRunSpec | dict[str, Any] | None = None,
        namespace: str | None = None,
        credentials: str | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ):
        from mlflow import MlflowClient  # the optional extra: pip install 'llm2llm[tracking]'

        self.config = config
        self.run_name, self.run_uid, self.namespace = run_name, run_uid, namespace
        self.params = flatten_params(spec) if spec is not None else {}
        self._credentials = credentials if credentials is not None else os.environ.get(CREDENTIALS_ENV)
        self.client = MlflowClient(tracking_uri=config.tracking_uri)
        self.retry_seconds = retry_seconds
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.url: str | None = None
        self._children: dict[int, str] = {}
        self._logged: set[int] = set()
        self._synced: tuple | None = None
        self._retry_at = 0.0
        self._params_done = False
        self._failures = 0

    # --- public ---------------------------------------------------------------------------------
    def update(self, status: RunStatus, store: RunStorage | None = None) -> str | None:
        """Bring MLflow up to date with ``status``; returns the parent run's URL (None until known).
        Never raises: a failure is a warning, retried at the next call after ``retry_seconds``."""
        key = (tuple((i.index, i.finished_at) for i in status.iterations), status.phase, status.stop_reason)
        if key == self._synced:
            return self.url
        if time.monotonic() < self._retry_at:
            return self.url
        try:
            with self._env():
                self._sync(status, store)
        except Exception as err:  # noqa: BLE001 - tracking must never fail the run
            self._failures += 1
            self._retry_at = time.monotonic() + min(self.retry_seconds * 2 ** (self._failures - 1), 600.0)
            log.warning("MLflow tracking at %s failed (the run goes on; retrying later): %s",
                        redact_uri(self.config.tracking_uri), self._scrub(str(err))[:500])
            return self.url
        self._synced = key
        self._retry_at, self._failures = 0.0, 0
        return self.url

    # --- internals ------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        text = text.replace(self.config.tracking_uri, redact_uri(self.config.tracking_uri))
        if self._credentials:
            for part in {self._credentials, *self._credentials.split(":", 1)}:
                if len(part) >= 4:
                    text = text.replace(part, "***")
        return text

    @contextmanager
    def _env(self) -> Iterator[None]:
        """Bounded HTTP retries (MLflow's default retries for minutes), and the credentials from the
        Secret, only while this tracker talks to MLflow (one tracker at a time per process)."""
        with _ENV_LOCK:
            wanted: dict[str, str] = {}
            if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ:
                wanted["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
            if "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ:
                wanted["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "15"
            if "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ:
                wanted["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
            cred = self._credentials
            if cred:
                user, sep, password = cred.partition(":")
                if sep and user:
                    wanted["MLFLOW_TRACKING_USERNAME"], wanted["MLFLOW_TRACKING_PASSWORD"] = user, password
                else:
                    wanted["MLFLOW_TRACKING_TOKEN"] = cred
            saved = {k: os.environ.get(k) for k in wanted}
            os.environ.update(wanted)
            try:
                yield
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def _experiment(self) -> str:
        if self.experiment_id is not None:
            return self.experiment_id
        from mlflow.exceptions import MlflowException

        name = self.config.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                eid = self.client.create_experiment(name, tags={"llm2llm.io/managed": "true"})
            except MlflowException as err:  # created concurrently by another runner or operator
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise err
                eid = exp.experiment_id
        else:
            eid = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(eid)
        self.experiment_id = eid
        return eid

    def _find(self, extra: str) -> list:
        flt = f"tags.`{TAG_UID}` = {_quote(self.run_uid)} AND {extra}"
        return list(self.client.search_runs([self._experiment()], filter_string=flt, max_results=1000,
                                            order_by=["attributes.start_time ASC"]))

    def _parent(self, status: RunStatus) -> str:
        if self.parent_id is None:
            eid = self._experiment()
            found = self._find(f"tags.`{TAG_KIND}` = 'run'")
            if found:
                run = found[0]  # the oldest, should two runners ever have raced
                if len(found) > 1:
                    log.warning("MLflow: %d parent runs for %s (uid %s); using the oldest, %s", len(found),
                                self.run_name, self.run_uid, run.info.run_id)
                log.info("MLflow: reusing run %s for %s", run.info.run_id, self.run_name)
            else:
                tags = {TAG_RUN: self.run_name, TAG_UID: self.run_uid, TAG_KIND: "run"}
                if self.namespace:
                    tags[TAG_NAMESPACE] = self.namespace
                run = self.client.create_run(eid, start_time=_ms(status.started_at), tags=tags,
                                             run_name=self.run_name)
                log.info("MLflow: created run %s for %s", run.info.run_id, self.run_name)
            self.parent_id = run.info.run_id
            self.url = self._url(eid, self.parent_id)
        if not self._params_done:
            self._log_params(dict(self.client.get_run(self.parent_id).data.params))
            self._params_done = True
        return self.parent_id

    def _log_params(self, existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        changed = sorted(k for k, v in self.params.items() if k in existing and existing[k] != v)
        if changed:  # MLflow params are immutable: the run keeps the values it started with
            log.info("MLflow: spec changed since the run started (%s); params keep their first values",
                     ", ".join(changed[:10]))
        todo = [Param(k, v) for k, v in sorted(self.params.items()) if k not in existing]
        for n in range(0, len(todo), 100):
            self.client.log_batch(self.parent_id, params=todo[n : n + 100], synchronous=True)

    def _url(self, eid: str, run_id: str) -> str:
        base = redact_uri(self.config.tracking_uri).rstrip("/")
        if base.startswith(("http://", "https://")):
            return f"{base}/#/experiments/{eid}/runs/{run_id}"
        return f"runs:/{run_id}"

    def _child(self, it: IterationStatus) -> tuple[str, bool]:
        """The iteration's nested run (created once) and whether it is already fully logged."""
        if it.index in self._children:
            return self._children[it.index], it.index in self._logged
        found = self._find(f"tags.`{TAG_KIND}` = 'iteration' AND tags.`{TAG_ITERATION}` = '{it.index}'")
        if found:
            run = found[0]
            logged = run.data.tags.get(TAG_LOGGED) == "true"
            run_id = run.info.run_id
        else:
            tags = {TAG_RUN: self.run_name, TAG_UID: self.run_uid, TAG_KIND: "iteration",
                    TAG_ITERATION: str(it.index), PARENT_TAG: self.parent_id}
            run = self.client.create_run(self._experiment(), start_time=_ms(it.started_at), tags=tags,
                                         run_name=f"{self.run_name}-iter-{it.index}")
            run_id, logged = run.info.run_id, False
        self._children[it.index] = run_id
        if logged:
            self._logged.add(it.index)
        return run_id, logged

    def _log_iteration(self, it: IterationStatus) -> None:
        from mlflow.entities import Metric, RunTag

        run_id, logged = self._child(it)
        if logged:
            return
        stamp = _ms(it.finished_at) or _ms(it.started_at) or 0
        metrics = iteration_metrics(it)
        # The parent's history (step = iteration) first, then the iteration's own run: a crash in between
        # re-logs the same rows, which the store keeps once.
        self.client.log_batch(self.parent_id, metrics=[Metric(k, v, stamp, it.index) for k, v in metrics.items()],
                              synchronous=True)
        tags = [RunTag("llm2llm.io/attempt", str(it.attempt))]
        if it.job:
            tags.append(RunTag("llm2llm.io/job", it.job))
        if it.stop_reason:
            tags.append(RunTag(TAG_STOP, it.stop_reason))
        self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()], tags=tags,
                              synchronous=True)
        self.client.log_text(run_id, json.dumps(it.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True),
                             "iteration.json")
        self.client.set_terminated(run_id, "FINISHED", end_time=_ms(it.finished_at))
        self.client.set_tag(run_id, TAG_LOGGED, "true")
        self._logged.add(it.index)

    def _sync(self, status: RunStatus, store: RunStorage | None) -> None:
        from mlflow.entities import RunTag

        parent = self._parent(status)
        for it in sorted(status.iterations, key=lambda i: i.index):
            if it.index not in self._logged:
                self._log_iteration(it)
        tags = [RunTag(TAG_PHASE, status.phase)]
        if status.stop_reason:
            tags.append(RunTag(TAG_STOP, status.stop_reason))
        self.client.log_batch(parent, tags=tags, synchronous=True)
        wire = status.model_copy(update={"mlflow_run_url": self.url}).wire()
        self.client.log_text(parent, json.dumps(wire, indent=2, sort_keys=True), "status.json")
        final = status.phase in ("Succeeded", "Failed")
        if final:
            if store is not None:
                self._log_report(parent, store)
            self.client.set_terminated(parent, "FINISHED" if status.phase == "Succeeded" else "FAILED",
                                       end_time=_ms(status.finished_at))
        else:
            run = self.client.get_run(parent)
            if run.info.status != "RUNNING":  # resumed after it had ended (e.g. maxIterations raised)
                self.client.update_run(parent, status="RUNNING")

    def _log_report(self, parent: str, store: RunStorage) -> None:
        try:
            from .report import ReportError, build_report

            page = build_report(store)
        except (ImportError, ReportError) as err:
            log.warning("MLflow: no report artefact: %s", err)
            return
        self.client.log_text(parent, page, "report.html")


def tracker_for(spec: AugmentationRunSpec, run_name: str, run_uid: str, namespace: str | None = None,
                credentials: str | None = None) -> MlflowTracker | None:
    """The tracker a run asks for, or None (no ``spec.tracking.mlflow``, or MLflow is not installed)."""
    cfg = spec.tracking.mlflow if spec.tracking is not None else None
    if cfg is None:
        return None
    try:
        return MlflowTracker(cfg, run_name=run_name, run_uid=run_uid, spec=spec, namespace=namespace,
                             credentials=credentials)
    except ImportError:
        log.warning("spec.tracking.mlflow is set but MLflow is not installed (pip install 'llm2llm[tracking]'); "
                    "not tracking this run")
        return None
