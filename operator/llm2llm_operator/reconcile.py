"""One reconcile of one AugmentationRun: validate, observe, ask the planner, carry out its action.

Level-based: everything is recomputed from the resource, storage and the launcher on every call; the
process remembers nothing between calls. Kopf is not imported here: ``reconcile`` returns what to
write (status) and say (events), and raises ``Transient`` when something it needs is unreachable.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llm2llm.launch import JobsApiLauncher, entrypoint, job_env
from llm2llm.planner import Action, Event, Idle, JobObservation, Launch, Observed, Stop, advance
from llm2llm.spec import GROUP, PLURAL, VERSION, AugmentationRunSpec, SpecError, parse_spec
from llm2llm.status import STAGES, TERMINAL, RunStatus
from llm2llm.storage import RunStorage, StorageError

from .rayjob import RayJobLauncher, TemplateError, parse_cluster_template, rayjob_manifest
from .settings import Settings

log = logging.getLogger(__name__)

# Errors of the API server or the network: worth a retry, never a verdict on the spec.
_K8S_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
# What JobSubmissionClient raises when the dashboard is down or answers an error.
_RAY_ERRORS = (OSError, RuntimeError)


class Transient(Exception):
    """Something the reconcile needs (API server, Ray, storage) is unreachable: retry later."""


class Invalid(Exception):
    """The run cannot start as written. Reported as condition Ready=False; no job is launched."""

    def __init__(self, reason: str, message: str, phase: str = "Failed"):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.phase = phase  # Pending: a missing reference that may still appear (Secret, ConfigMap)


@dataclass
class Outcome:
    status: dict[str, Any] | None  # the whole new status, or None when unchanged
    events: list[Event] = field(default_factory=list)
    action: Action | None = None
    launcher: str | None = None
    submitted: bool = False  # a job was created by this call
    invalid: Invalid | None = None
    phase: str | None = None


@dataclass
class Context:
    """The outside world, injected so tests can fake it."""

    settings: Settings
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    jobs_api: Callable[[str], JobsApiLauncher] = JobsApiLauncher

    @classmethod
    def connect(cls, settings: Settings, api: client.ApiClient,
                jobs_api: Callable[[str], JobsApiLauncher] = JobsApiLauncher) -> Context:
        return cls(settings, client.CoreV1Api(api), client.CustomObjectsApi(api), jobs_api)


@dataclass
class _Target:
    spec: AugmentationRunSpec  # with local paths made absolute
    storage: RunStorage
    kind: str  # jobs-api | rayjob
    launcher: Any  # JobsApiLauncher | RayJobLauncher
    template: dict[str, Any] | None = None


def reconcile(body: dict[str, Any], ctx: Context) -> Outcome:
    meta = body["metadata"]
    generation = meta.get("generation")
    old = body.get("status") or {}
    status = _load_status(old)
    if _finished(status, generation):
        return Outcome(None, action=Idle(status.phase), phase=status.phase)
    before = status.model_copy(deep=True)
    try:
        target = _prepare(body, ctx)
        status.set_condition("Ready", True, "SpecValid", "spec and its references are valid", generation)
        observed = _observe(target, status)
        new, action, events = advance(target.spec, status, observed, run_name=meta["name"], run_uid=meta["uid"],
                                      generation=generation)
        new.output = target.storage.uri()
        submitted = _carry_out(action, target, body, new, events, ctx)
    except Invalid as bad:
        return _invalid(before, old, bad, generation)
    wire = new.wire()
    return Outcome(wire if wire != old else None, events, action, target.kind, submitted, phase=new.phase)


# --- validation ----------------------------------------------------------------------------------

def _load_status(doc: dict[str, Any]) -> RunStatus:
    try:
        return RunStatus.model_validate(doc)
    except ValueError:
        log.warning("status does not parse; starting from an empty one (storage still has the iterations)")
        return RunStatus()


def _finished(status: RunStatus, generation: int | None) -> bool:
    """A finished run whose spec has not changed since: nothing can change, skip storage and Ray."""
    return status.phase in ("Succeeded", "Failed") and status.stop_reason is not None \
        and status.observed_generation == generation and status.finished_at is not None


def _prepare(body: dict[str, Any], ctx: Context) -> _Target:
    meta = body["metadata"]
    ns = meta["namespace"]
    try:
        spec = parse_spec(body.get("spec"), f"{ns}/{meta['name']}")
    except SpecError as err:
        raise Invalid("InvalidSpec", "; ".join(f"spec.{p}" for p in err.problems)) from None
    spec = _localize(spec, ctx.settings.base_dir)
    try:
        storage = RunStorage(spec.output, meta["name"])
    except StorageError as err:
        raise Invalid("OutputUnsupported", f"spec.output: {err}") from None
    _check_data(spec, storage)
    _check_secret(spec, ns, ctx)
    kind = spec.ray.launcher if spec.ray.launcher != "local" else ctx.settings.default_launcher
    if kind == "jobs-api":
        address = spec.ray.address or ctx.settings.ray_address
        if not address:
            raise Invalid("NoRayAddress", "the jobs-api launcher needs spec.ray.address (or the operator's "
                                          "--ray-address for spec.ray.launcher=local)")
        try:
            launcher = ctx.jobs_api(address)
        except _RAY_ERRORS as err:
            raise Transient(f"Ray dashboard {address} unreachable: {err}") from err
        return _Target(spec, storage, kind, launcher)
    template = None
    if spec.ray.cluster_template:
        template = _cluster_template(spec.ray.cluster_template, ns, ctx)
    elif not spec.ray.cluster_selector:
        raise Invalid("NoRayCluster", "the rayjob launcher needs spec.ray.clusterSelector (a shared RayCluster) "
                                      "or spec.ray.clusterTemplate (a ConfigMap with a RayCluster spec)")
    return _Target(spec, storage, kind, RayJobLauncher(ctx.custom, ns), template)


def _absolute(uri: str | None, base: str | None, field_name: str) -> str | None:
    if uri is None or "://" in uri or os.path.isabs(uri):
        return uri
    if base is None:
        raise Invalid("RelativePath", f"spec.{field_name} {uri!r} is a relative path: use an absolute path or a "
                                      "URI, or start the operator with --base-dir (LLM2LLM_BASE_DIR)")
    return os.path.join(base, uri)


def _localize(spec: AugmentationRunSpec, base: str | None) -> AugmentationRunSpec:
    """Jobs run elsewhere and the operator has no meaningful working directory: resolve relative
    local paths against the operator's base dir, in the spec the job is given too."""
    spec = spec.model_copy(deep=True)
    spec.data.seed = _absolute(spec.data.seed, base, "data.seed")  # type: ignore[assignment]
    spec.data.test = _absolute(spec.data.test, base, "data.test")
    spec.output = _absolute(spec.output, base, "output")  # type: ignore[assignment]
    for model in (spec.student, spec.teacher):
        if base and os.sep in model.model and not os.path.isabs(model.model) \
                and os.path.exists(os.path.join(base, model.model)):
            model.model = os.path.join(base, model.model)
    return spec


def _check_data(spec: AugmentationRunSpec, storage: RunStorage) -> None:
    """Catch a mistyped data.seed/data.test before any job is launched, where the operator can tell.

    Jobs read the data, not the operator, and they may see another filesystem (a volume, the image), so
    a path is judged only when the operator sees where it should be: a local file whose folder exists
    here, or a URI on the output's own filesystem (which the operator must reach anyway). Anything
    else is left to the job's prepare stage."""
    for name, uri in (("data.seed", spec.data.seed), ("data.test", spec.data.test)):
        if uri is None:
            continue
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError):
            continue  # no driver here; the job may have one
        if fs.protocol != storage.fs.protocol and "://" in uri:
            continue
        try:
            missing = fs.exists(posixpath.dirname(path)) and not fs.isfile(path)
        except OSError:
            continue  # unreachable from here says nothing about the job's view
        if missing:
            raise Invalid("DataNotFound", f"spec.{name}: {uri} is not a file (its folder exists, so a typo?)")


# A run may hand a Secret to its teacher only when the Secret's owner opted in. The operator reads Secrets
# with its own rights, so without this anyone allowed to create a run could send any key in the namespace to
# an endpoint of their choosing (a confused deputy); labelling a Secret needs `update secrets`.
SECRET_OPT_IN_LABEL = "llm2llm.io/teacher-key"
SECRET_ENDPOINTS_ANNOTATION = "llm2llm.io/allowed-endpoints"


def _check_secret(spec: AugmentationRunSpec, ns: str, ctx: Context) -> None:
    ref = spec.teacher.api_key_secret_ref
    if ref is None:
        return
    where = f"spec.teacher.apiKeySecretRef: Secret {ns}/{ref.name}"
    try:
        secret = ctx.core.read_namespaced_secret(ref.name, ns)
    except ApiException as err:
        if err.status == 404:
            raise Invalid("SecretNotFound", f"{where} not found", "Pending") from None
        raise Transient(f"cannot read Secret {ns}/{ref.name}: {err.status} {err.reason}") from err
    except _K8S_ERRORS as err:
        raise Transient(f"cannot read Secret {ns}/{ref.name}: {err}") from err
    meta = secret.metadata
    if ((meta.labels if meta else None) or {}).get(SECRET_OPT_IN_LABEL) != "true":
        raise Invalid("SecretNotAllowed", f"{where} is not labelled {SECRET_OPT_IN_LABEL}=true: a run may only "
                                          "use a Secret its owner has opted in", "Pending")
    allowed = ((meta.annotations if meta else None) or {}).get(SECRET_ENDPOINTS_ANNOTATION)
    if allowed is not None:
        prefixes = [p.strip() for p in allowed.split(",") if p.strip()]
        if not any((spec.teacher.endpoint or "").startswith(p) for p in prefixes):
            raise Invalid("EndpointNotAllowed", f"spec.teacher.endpoint {spec.teacher.endpoint!r} is not among the "
                                                f"endpoints Secret {ns}/{ref.name} allows "
                                                f"({SECRET_ENDPOINTS_ANNOTATION}: {allowed})", "Pending")
    if ref.key not in (secret.data or {}) and ref.key not in (secret.string_data or {}):
        raise Invalid("SecretKeyNotFound", f"{where} has no key {ref.key!r}", "Pending")


def _cluster_template(name: str, ns: str, ctx: Context) -> dict[str, Any]:
    try:
        cm = ctx.core.read_namespaced_config_map(name, ns)
    except ApiException as err:
        if err.status == 404:
            raise Invalid("ClusterTemplateNotFound", f"spec.ray.clusterTemplate: ConfigMap {ns}/{name} not found",
                          "Pending") from None
        raise Transient(f"cannot read ConfigMap {ns}/{name}: {err.status} {err.reason}") from err
    except _K8S_ERRORS as err:
        raise Transient(f"cannot read ConfigMap {ns}/{name}: {err}") from err
    try:
        return parse_cluster_template(cm.data, name)
    except TemplateError as err:
        raise Invalid("ClusterTemplateInvalid", f"spec.ray.clusterTemplate: {err}", "Pending") from None


def _invalid(status: RunStatus, old: dict[str, Any], bad: Invalid, generation: int | None) -> Outcome:
    before = status.condition("Ready")
    changed = before is None or before.status != "False" or before.reason != bad.reason or before.message != bad.message
    status.observed_generation = generation
    status.set_condition("Ready", False, bad.reason, bad.message, generation)
    if not status.jobs:  # a run under way keeps its phase; it just launches nothing new
        status.phase = bad.phase  # type: ignore[assignment]
    events = [Event(bad.reason, bad.message, warning=True)] if changed else []
    wire = status.wire()
    return Outcome(wire if wire != old else None, events, None, invalid=bad, phase=status.phase)


# --- observing and acting ------------------------------------------------------------------------

def _observe(target: _Target, status: RunStatus) -> Observed:
    try:
        iterations = target.storage.iterations()
        n = len(iterations)
        done = tuple(s for s in STAGES if target.storage.stage_done(n, s) is not None)
    except StorageError as err:
        # Not a Kopf retry with backoff, hidden in the operator's log: say it in status, and let the
        # timer look again (the run goes on by itself once the storage is back).
        raise Invalid("StorageUnavailable", f"spec.output {target.spec.output}: {err}", "Pending") from None
    jobs: dict[str, JobObservation] = {}
    for rec in status.jobs:
        if rec.state in TERMINAL:
            continue  # its outcome is already in status; the job itself may be long gone
        try:
            ob = target.launcher.observe(rec.name, rec.iteration, rec.attempt)
        except (*_K8S_ERRORS, *_RAY_ERRORS) as err:
            raise Transient(f"cannot observe job {rec.name}: {err}") from err
        if ob is not None:
            jobs[rec.name] = ob
    return Observed(iterations=iterations, jobs=jobs, stages_done=done)


def _carry_out(action: Action, target: _Target, body: dict[str, Any], new: RunStatus, events: list[Event],
               ctx: Context) -> bool:
    """Do what the planner decided. Returns True when a job was created."""
    meta = body["metadata"]
    if isinstance(action, Launch):
        return _launch(action, target, meta, ctx.settings)
    if isinstance(action, Stop):
        try:
            target.launcher.stop(action.name)
        except (*_K8S_ERRORS, *_RAY_ERRORS) as err:
            raise Transient(f"cannot stop job {action.name}: {err}") from err
        # The planner already recorded how this attempt ended (Suspended, or Failed by deadline).
        events.append(Event("JobStopped", f"{action.name}: {action.reason}", warning=action.reason != "Suspended"))
    return False


def _launch(action: Launch, target: _Target, meta: dict[str, Any], settings: Settings) -> bool:
    spec = target.spec
    python = spec.ray.python or settings.job_python
    cmd = entrypoint(meta["name"], meta["uid"], spec, action.iteration, action.attempt, python)
    env = job_env(spec, {"LLM2LLM_BASE_DIR": settings.base_dir} if settings.base_dir else None)
    try:
        if target.kind == "rayjob":
            manifest = rayjob_manifest(run={"metadata": meta}, spec=spec, name=action.name, iteration=action.iteration,
                                       attempt=action.attempt, entrypoint=cmd, env=env,
                                       cluster_template=target.template)
            return target.launcher.submit(manifest)
        labels = {"llm2llm.io/run": meta["name"], "llm2llm.io/run-uid": meta["uid"],
                  "llm2llm.io/namespace": meta["namespace"]}
        return target.launcher.submit(action.name, cmd, env, labels)
    except ApiException as err:
        if err.status in (400, 403, 422):
            # The API server refused the job itself (e.g. a template KubeRay's schema rejects).
            raise Invalid("JobRejected", f"creating {action.name} failed: {err.status} {_api_message(err)}",
                          "Pending") from None
        raise Transient(f"cannot create job {action.name}: {err.status} {err.reason}") from err
    except (*_K8S_ERRORS, *_RAY_ERRORS) as err:
        raise Transient(f"cannot submit job {action.name}: {err}") from err


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body or "{}").get("message") or str(err.reason)
    except (ValueError, AttributeError):
        return str(err.reason)


# --- deletion ------------------------------------------------------------------------------------

def cleanup(body: dict[str, Any], ctx: Context) -> tuple[list[str], bool]:
    """Stop the run's jobs and, with spec.deleteData, delete its storage. Returns (stopped jobs, data
    deleted). Works from the raw spec as far as it can when the spec does not parse."""
    meta = body["metadata"]
    ns, uid = meta["namespace"], meta["uid"]
    try:
        stopped = RayJobLauncher(ctx.custom, ns).delete_all(uid)
    except _K8S_ERRORS as err:
        raise Transient(f"cannot delete RayJobs: {err}") from err
    status = _load_status(body.get("status") or {})
    try:
        spec = _localize(parse_spec(body.get("spec")), ctx.settings.base_dir)
    except (SpecError, Invalid):
        return stopped, False
    running = [r.name for r in status.jobs if r.state not in TERMINAL and r.name not in stopped]
    address = spec.ray.address or ctx.settings.ray_address
    jobs_api = spec.ray.launcher == "jobs-api" or (spec.ray.launcher == "local"
                                                   and ctx.settings.default_launcher == "jobs-api")
    if running and jobs_api and address:
        try:
            launcher = ctx.jobs_api(address)
            for name in running:
                launcher.stop(name)
                stopped.append(name)
        except _RAY_ERRORS as err:
            raise Transient(f"cannot stop Ray jobs at {address}: {err}") from err
    if not spec.delete_data:
        return stopped, False
    try:
        RunStorage(spec.output, meta["name"]).delete_all()
    except (StorageError, OSError) as err:
        raise Transient(f"cannot delete {spec.output}/{meta['name']}: {err}") from err
    return stopped, True


__all__ = ["Context", "Invalid", "Outcome", "Transient", "cleanup", "reconcile", "GROUP", "VERSION", "PLURAL"]
