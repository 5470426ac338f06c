"""One reconcile of one AugmentationRun: check the resource, then one step of the shared control core.

What is the operator's own: reading the resource and its references (the teacher key's and MLflow's Secrets,
the cluster template), the admins' allow-lists, and choosing the launcher (KubeRay RayJob or a cluster's Ray
Jobs API). Observing, planning, launching, the status and tracking are ``llm2llm.control.step``, the same code
``llm2llm run`` runs. Kopf is not imported here: ``reconcile`` returns what to write (status) and say
(events), and raises ``Transient`` when something it needs is unreachable.
"""

from __future__ import annotations

import base64
import fnmatch
import logging
import posixpath
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llm2llm import endpoints
from llm2llm.control import Invalid, JobSettings, RunRef, Transient, load_status, refuse, resolve_paths, step
from llm2llm.jobsapi import JobsApiLauncher
from llm2llm.planner import Action, Event
from llm2llm.spec import GROUP, PLURAL, VERSION, AugmentationRunSpec, SecretKeyRef, SpecError, parse_spec
from llm2llm.status import TERMINAL
from llm2llm.storage import RunStorage, StorageError
from llm2llm.uris import UnsupportedURI, check_uris

from .rayjob import RayJobLauncher, TemplateError, parse_cluster_template
from .settings import Settings

log = logging.getLogger(__name__)

# Errors of the API server or the network: worth a retry, never a verdict on the spec.
_K8S_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)

# A run may hand a Secret to its teacher (or to MLflow) only when the Secret's owner opted in with a label, and
# pinned where its value may go (endpoints.ENDPOINTS_ANNOTATION). The operator lists Secrets by that label, so
# it never even receives one that is not meant for it; labelling a Secret needs `update secrets`.
SECRET_OPT_IN_LABEL = "llm2llm.io/teacher-key"
MLFLOW_OPT_IN_LABEL = "llm2llm.io/mlflow-credentials"
SECRET_ENDPOINTS_ANNOTATION = endpoints.ENDPOINTS_ANNOTATION


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
    jobs_api: Callable[[str], Any] = JobsApiLauncher
    # MLflow trackers by run uid: only a cache (a tracker finds its MLflow runs again by tag after a restart).
    trackers: dict[tuple, Any] = field(default_factory=dict)
    _trackers_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls, settings: Settings, api: client.ApiClient, jobs_api: Callable[[str], Any] = JobsApiLauncher) -> Context:
        return cls(settings, client.CoreV1Api(api), client.CustomObjectsApi(api), jobs_api)


@dataclass
class _Target:
    spec: AugmentationRunSpec  # with local paths made absolute
    storage: RunStorage
    launcher: Any  # a control.Launcher: JobsApiLauncher or RayJobLauncher
    env: dict[str, str] = field(default_factory=dict)
    tracker: Any | None = None


def reconcile(body: dict[str, Any], ctx: Context) -> Outcome:
    meta = body["metadata"]
    old = body.get("status") or {}
    status = load_status(old)
    ref = RunRef(meta["name"], meta["uid"], meta["namespace"], meta.get("generation"))
    try:
        target = _prepare(body, ctx)
    except Invalid as bad:
        result = refuse(status, bad, ref.generation)
        kind = None
    else:
        settings = JobSettings(python=ctx.settings.job_python, env=target.env)
        result = step(ref, target.spec, status, storage=target.storage, launcher=target.launcher, job=settings,
                      tracker=target.tracker)
        kind = target.launcher.kind
    wire = result.status.wire()
    return Outcome(wire if wire != old else None, result.events, result.action, kind, result.submitted,
                   result.invalid, result.status.phase)


# --- checking the resource -------------------------------------------------------------------------------

def _prepare(body: dict[str, Any], ctx: Context) -> _Target:
    meta = body["metadata"]
    ns = meta["namespace"]
    try:
        spec = parse_spec(body.get("spec"), f"{ns}/{meta['name']}")
    except SpecError as err:
        raise Invalid("InvalidSpec", "; ".join(f"spec.{p}" for p in err.problems)) from None
    spec = resolve_paths(spec, ctx.settings.base_dir)
    try:
        storage = RunStorage(spec.output, meta["name"])
    except StorageError as err:
        raise Invalid("OutputUnsupported", f"spec.output: {err}") from None
    try:  # a scheme without a driver here (gs:// without gcsfs): the job images have the drivers the operator has
        check_uris(spec)
    except UnsupportedURI as bad:
        raise Invalid("OutputUnsupported" if bad.field == "output" else "DataUnsupported", str(bad)) from None
    _check_data(spec, storage)
    env: dict[str, str] = {"LLM2LLM_BASE_DIR": ctx.settings.base_dir} if ctx.settings.base_dir else {}
    pins = _teacher_key(spec, ns, ctx)
    tracker = _tracker(spec, meta, ctx)
    kind = spec.ray.launcher if spec.ray.launcher != "local" else ctx.settings.default_launcher
    if kind == "jobs-api":
        address = spec.ray.address or ctx.settings.ray_address
        if not address:
            raise Invalid("NoRayAddress", "the jobs-api launcher needs spec.ray.address (or the operator's "
                                          "--ray-address for spec.ray.launcher=local)")
        _check_ray_address(spec.ray.address, ctx.settings)
        try:
            launcher = ctx.jobs_api(address)
        except Transient:
            raise
        except (OSError, RuntimeError) as err:
            raise Transient(f"Ray dashboard {address} unreachable: {err}") from err
        return _Target(spec, storage, launcher, env, tracker)
    template = None
    if spec.ray.cluster_template:
        _check_template_allowed(spec.ray.cluster_template, ns, ctx.settings)
        template = _cluster_template(spec.ray.cluster_template, ns, ctx)
    elif not spec.ray.cluster_selector:
        raise Invalid("NoRayCluster", "the rayjob launcher needs spec.ray.clusterSelector (a shared RayCluster) "
                                      "or spec.ray.clusterTemplate (a ConfigMap with a RayCluster spec)")
    launcher = RayJobLauncher(ctx.custom, ns, owner=meta, spec=spec, template=template, key_pins=pins)
    return _Target(spec, storage, launcher, env, tracker)


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


def _check_ray_address(address: str | None, settings: Settings) -> None:
    """spec.ray.address makes the operator send requests to a URL of the run author's choosing: only the
    addresses the cluster admin allowed (the operator's own --ray-address always is)."""
    if address is None or address == settings.ray_address:
        return
    try:
        target = endpoints.parse_endpoint(address)
    except endpoints.EndpointError as err:
        raise Invalid("RayAddressNotAllowed", f"spec.ray.address: {err}") from None
    allowed = [endpoints.parse_endpoint(a) for a in settings.allowed_ray_addresses]
    if not any(a.covers(target) for a in allowed):
        listed = ", ".join(settings.allowed_ray_addresses) or "none"
        raise Invalid("RayAddressNotAllowed", f"spec.ray.address {address} is not among the Ray addresses the "
                                              f"operator's admin allows (chart value operator.allowedRayAddresses: "
                                              f"{listed})")


def _check_template_allowed(name: str, ns: str, settings: Settings) -> None:
    """A cluster template is a pod spec that KubeRay runs with its rights: only templates the admin allowed."""
    if any(fnmatch.fnmatchcase(f"{ns}/{name}", p if "/" in p else f"*/{p}") for p in settings.allowed_cluster_templates):
        return
    listed = ", ".join(settings.allowed_cluster_templates) or "none"
    raise Invalid("ClusterTemplateNotAllowed", f"spec.ray.clusterTemplate {ns}/{name} is not among the templates "
                                               f"the operator's admin allows (chart value "
                                               f"operator.allowedClusterTemplates: {listed})", "Pending")


def _opted_in_secret(ref: SecretKeyRef, ns: str, label: str, where: str, ctx: Context) -> Any:
    """The Secret ``ref`` names, only if its owner labelled it for this purpose: listed by that label, so an
    unlabelled Secret never reaches the operator."""
    try:
        found = ctx.core.list_namespaced_secret(ns, label_selector=f"{label}=true",
                                                field_selector=f"metadata.name={ref.name}").items
    except ApiException as err:
        if err.status == 403:
            raise Invalid("SecretNotReadable", f"{where}: the operator may not read Secrets in namespace {ns} (the "
                                               "chart grants it only in watchNamespaces or rbac.secretNamespaces)",
                          "Pending") from None
        raise Transient(f"cannot list Secrets in {ns}: {err.status} {err.reason}") from err
    except _K8S_ERRORS as err:
        raise Transient(f"cannot list Secrets in {ns}: {err}") from err
    if not found:
        raise Invalid("SecretNotFound", f"{where}: no Secret {ns}/{ref.name} labelled {label}=true (it does not "
                                        "exist, or its owner has not opted it in for this use)", "Pending")
    secret = found[0]
    if ref.key not in (secret.data or {}) and ref.key not in (secret.string_data or {}):
        raise Invalid("SecretKeyNotFound", f"{where}: Secret {ns}/{ref.name} has no key {ref.key!r}", "Pending")
    return secret


def _pins(secret: Any, ref: SecretKeyRef, ns: str, url: str | None, where: str) -> str:
    pins = ((secret.metadata.annotations if secret.metadata else None) or {}).get(SECRET_ENDPOINTS_ANNOTATION)
    why = endpoints.check(url, pins)
    if why is not None:
        raise Invalid("EndpointNotAllowed", f"{where}: Secret {ns}/{ref.name} may not be sent to {url!r}: {why} "
                                            f"(its owner pins endpoints with the annotation "
                                            f"{SECRET_ENDPOINTS_ANNOTATION})", "Pending")
    return pins  # type: ignore[return-value]


def _teacher_key(spec: AugmentationRunSpec, ns: str, ctx: Context) -> str | None:
    """The endpoints the teacher key is pinned to (passed on to the job beside the key), or None."""
    ref = spec.teacher.api_key_secret_ref
    if ref is None:
        return None
    where = "spec.teacher.apiKeySecretRef"
    secret = _opted_in_secret(ref, ns, SECRET_OPT_IN_LABEL, where, ctx)
    return _pins(secret, ref, ns, spec.teacher.endpoint, where)


def _tracker(spec: AugmentationRunSpec, meta: dict[str, Any], ctx: Context) -> Any | None:
    """The run's MLflow tracker (cached per run and config), credentials from its opted-in, pinned Secret."""
    cfg = spec.tracking.mlflow if spec.tracking is not None else None
    if cfg is None:
        return None
    credentials = None
    if cfg.credentials_secret_ref is not None:
        ref, where = cfg.credentials_secret_ref, "spec.tracking.mlflow.credentialsSecretRef"
        secret = _opted_in_secret(ref, meta["namespace"], MLFLOW_OPT_IN_LABEL, where, ctx)
        _pins(secret, ref, meta["namespace"], cfg.tracking_uri, where)
        credentials = _secret_value(secret, ref.key)
    key = (meta["uid"], cfg.model_dump_json(), credentials)
    with ctx._trackers_lock:
        if key not in ctx.trackers:
            from llm2llm.tracking import tracker_for

            for old in [k for k in ctx.trackers if k[0] == meta["uid"]]:
                del ctx.trackers[old]  # the config or the credentials changed
            # None when MLflow is not installed (warned once per run)
            ctx.trackers[key] = tracker_for(spec, meta["name"], meta["uid"], namespace=meta["namespace"],
                                            credentials=credentials)
        return ctx.trackers[key]


def _secret_value(secret: Any, key: str) -> str:
    if key in (secret.string_data or {}):
        return secret.string_data[key]
    return base64.b64decode(secret.data[key]).decode("utf-8", errors="replace").strip()


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


# --- deletion ------------------------------------------------------------------------------------

def cleanup(body: dict[str, Any], ctx: Context) -> tuple[list[str], bool]:
    """Stop the run's jobs and, with spec.deleteData, delete its storage. Returns (stopped jobs, data
    deleted). Works from the raw spec as far as it can when the spec does not parse."""
    meta = body["metadata"]
    ns, uid = meta["namespace"], meta["uid"]
    stopped = RayJobLauncher(ctx.custom, ns).delete_all(uid)
    with ctx._trackers_lock:
        for key in [k for k in ctx.trackers if k[0] == uid]:
            del ctx.trackers[key]
    status = load_status(body.get("status") or {})
    try:
        spec = resolve_paths(parse_spec(body.get("spec")), ctx.settings.base_dir)
    except (SpecError, Invalid):
        return stopped, False
    running = [r.name for r in status.jobs if (r.state not in TERMINAL or r.releasing) and r.name not in stopped]
    address = spec.ray.address or ctx.settings.ray_address
    jobs_api = spec.ray.launcher == "jobs-api" or (spec.ray.launcher == "local"
                                                   and ctx.settings.default_launcher == "jobs-api")
    if running and jobs_api and address:
        try:
            _check_ray_address(spec.ray.address, ctx.settings)
        except Invalid:
            address = None  # never contact an address the admin does not allow, not even to stop a job
        if address:
            try:
                launcher = ctx.jobs_api(address)
            except (OSError, RuntimeError) as err:
                raise Transient(f"cannot stop Ray jobs at {address}: {err}") from err
            for name in running:
                launcher.stop(name)
                stopped.append(name)
    if not spec.delete_data:
        return stopped, False
    try:
        RunStorage(spec.output, meta["name"]).delete_all()
    except (StorageError, OSError) as err:
        raise Transient(f"cannot delete {spec.output}/{meta['name']}: {err}") from err
    return stopped, True


__all__ = ["Context", "Invalid", "Outcome", "Transient", "cleanup", "reconcile", "GROUP", "VERSION", "PLURAL"]
