"""The KubeRay launcher: one RayJob (ray.io/v1) per iteration attempt.

``rayjob_manifest`` and ``observe_rayjob`` are pure (plain dicts in and out); ``RayJobLauncher`` does
the API calls. Stop deletes the RayJob rather than setting ``spec.suspend``: the planner's Stop ends
the attempt (as ``ray job stop`` does with the Jobs API launcher), deleting frees the cluster's GPUs
at once (KubeRay deletes the RayCluster it owns), and the next attempt resumes from the last committed
stage in storage. A suspended RayJob would sit there needing a resume the planner has no action for.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import urllib3
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llm2llm.control import LABEL_ATTEMPT, LABEL_ITERATION, LABEL_RUN, LABEL_RUN_UID, Invalid, JobRequest, Transient
from llm2llm.launch import API_KEY_ENDPOINTS_ENV, API_KEY_ENV
from llm2llm.planner import JobObservation
from llm2llm.spec import API_VERSION, KIND, AugmentationRunSpec

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TEMPLATE_KEY = "rayClusterSpec"  # the key of the clusterTemplate ConfigMap
# Errors of the API server or the network: worth a retry.
_K8S_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
__all__ = ["LABEL_ATTEMPT", "LABEL_ITERATION", "LABEL_RUN", "LABEL_RUN_UID", "RayJobLauncher", "observe_rayjob",
           "parse_cluster_template", "rayjob_manifest"]


class TemplateError(ValueError):
    """The clusterTemplate ConfigMap does not hold a usable RayCluster spec."""


def parse_cluster_template(data: dict[str, str] | None, name: str) -> dict[str, Any]:
    """The RayCluster spec in a clusterTemplate ConfigMap's data, checked just enough to patch it."""
    text = (data or {}).get(TEMPLATE_KEY)
    if not text:
        raise TemplateError(f"ConfigMap {name!r} has no key {TEMPLATE_KEY!r}")
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TemplateError(f"ConfigMap {name!r} key {TEMPLATE_KEY!r} is not valid YAML: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("headGroupSpec"), dict):
        raise TemplateError(f"ConfigMap {name!r} key {TEMPLATE_KEY!r} must be a RayCluster spec with headGroupSpec")
    for i, group in enumerate(_groups(spec)):
        containers = (((group or {}).get("template") or {}).get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
            where = "headGroupSpec" if i == 0 else f"workerGroupSpecs[{i - 1}]"
            raise TemplateError(f"ConfigMap {name!r}: {where}.template.spec.containers must list the Ray container")
    return spec


def _groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"], *(cluster.get("workerGroupSpecs") or [])]


def _cluster_spec(template: dict[str, Any], spec: AugmentationRunSpec, key_pins: str | None) -> dict[str, Any]:
    cluster = copy.deepcopy(template)
    ref = spec.teacher.api_key_secret_ref
    for group in _groups(cluster):
        # KubeRay's convention: the Ray container is the first one; sidecars keep their own images.
        ray = group["template"]["spec"]["containers"][0]
        if spec.ray.image:
            ray["image"] = spec.ray.image
        # The key and where it may go come from the checked Secret only, never from the template's author.
        env = [e for e in ray.get("env") or [] if e.get("name") not in (API_KEY_ENV, API_KEY_ENDPOINTS_ENV)]
        if ref is not None and key_pins:
            # Only a reference travels: the kubelet resolves the value inside the pod.
            env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
            env.append({"name": API_KEY_ENDPOINTS_ENV, "value": key_pins})
        if env or "env" in ray:
            ray["env"] = env
    return cluster


def rayjob_manifest(
    *,
    run: dict[str, Any],
    spec: AugmentationRunSpec,
    name: str,
    iteration: int,
    attempt: int,
    entrypoint: str,
    env: dict[str, str],
    cluster_template: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    key_pins: str | None = None,
) -> dict[str, Any]:
    """The RayJob for one attempt. ``run`` is the AugmentationRun (its metadata is used); ``spec`` its
    parsed spec; ``cluster_template`` the parsed clusterTemplate when the spec names one; ``key_pins`` the
    endpoints the teacher key's Secret allows (``control.job_request`` makes the rest)."""
    meta = run["metadata"]
    job: dict[str, Any] = {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": env}, sort_keys=True),
        "submissionMode": "K8sJobMode",
    }
    if spec.active_deadline_seconds:
        job["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ray.cluster_selector:
        job["clusterSelector"] = dict(spec.ray.cluster_selector)
    elif cluster_template is not None:
        job["rayClusterSpec"] = _cluster_spec(cluster_template, spec, key_pins)
        job["shutdownAfterJobFinishes"] = True  # a cluster per job: give the GPUs back when it ends
    else:
        raise ValueError("the rayjob launcher needs spec.ray.clusterSelector or spec.ray.clusterTemplate")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels or {
                LABEL_RUN: meta["name"],
                LABEL_RUN_UID: meta["uid"],
                LABEL_ITERATION: str(iteration),
                LABEL_ATTEMPT: str(attempt),
            },
            "ownerReferences": [{
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": job,
    }


# KubeRay's jobDeploymentStatus values that are not finished, by planner phase. Anything unknown
# counts as Running: never declare a job finished on a status we do not understand.
_PENDING = {"", "New", "Initializing", "Waiting", "Suspending", "Suspended"}
_FAILED = {"Failed", "ValidationFailed"}


def observe_rayjob(obj: dict[str, Any] | None, iteration: int, attempt: int) -> JobObservation | None:
    """A RayJob's status as the planner sees it; None when the RayJob is gone."""
    if obj is None:
        return None
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        # Being deleted (foreground: its RayCluster and pods go first). Not finished until it is gone.
        return JobObservation(iteration=iteration, attempt=attempt, phase="Running", message="being deleted")
    st = obj.get("status") or {}
    deployment = st.get("jobDeploymentStatus") or ""
    job_status = st.get("jobStatus") or ""
    message = "; ".join(str(x) for x in (st.get("reason"), st.get("message")) if x)
    if deployment == "Complete":
        phase = "Succeeded" if job_status == "SUCCEEDED" else "Failed"
        if phase == "Failed" and not message:
            message = f"Ray job ended {job_status or 'without a status'}"
    elif deployment in _FAILED:
        phase = "Failed"
        message = message or f"RayJob {deployment}"
    elif deployment in _PENDING:
        phase = "Pending"
    else:
        phase = "Running"
    return JobObservation(iteration=iteration, attempt=attempt, phase=phase, message=message[-500:])  # type: ignore[arg-type]


class RayJobLauncher:
    """RayJobs in one namespace: the control core's launcher for the rayjob launcher. Names are the planner's
    deterministic job names, so a create after a crash meets 409 AlreadyExists instead of making a second
    job. ``owner``, ``spec``, ``template`` and ``key_pins`` describe the run whose jobs are submitted (not
    needed to observe, stop or clean up)."""

    kind = "rayjob"

    def __init__(self, api: client.CustomObjectsApi, namespace: str, *, owner: dict[str, Any] | None = None,
                 spec: AugmentationRunSpec | None = None, template: dict[str, Any] | None = None,
                 key_pins: str | None = None):
        self.api = api
        self.namespace = namespace
        self.owner, self.spec, self.template, self.key_pins = owner, spec, template, key_pins

    def submit(self, job: JobRequest) -> bool:
        """Returns False when the RayJob already existed. Strict: a template field KubeRay's schema does
        not know is an error to report, not something to drop silently."""
        assert self.owner is not None and self.spec is not None, "a launcher for submitting is bound to its run"
        manifest = rayjob_manifest(run={"metadata": self.owner}, spec=self.spec, name=job.name,
                                   iteration=job.iteration, attempt=job.attempt, entrypoint=job.entrypoint,
                                   env=job.env, cluster_template=self.template, labels=job.labels,
                                   key_pins=self.key_pins)
        try:
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest,
                                                     field_validation="Strict")
        except ApiException as err:
            if err.status == 409:
                return False
            if err.status in (400, 403, 422):
                # The API server refused the job itself (e.g. a template KubeRay's schema rejects).
                raise Invalid("JobRejected", f"creating {job.name} failed: {err.status} {_api_message(err)}",
                              "Pending") from None
            raise Transient(f"cannot create job {job.name}: {err.status} {err.reason}") from err
        except _K8S_ERRORS as err:
            raise Transient(f"cannot create job {job.name}: {err}") from err
        return True

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise Transient(f"cannot read RayJob {self.namespace}/{name}: {err.status} {err.reason}") from err
        except _K8S_ERRORS as err:
            raise Transient(f"cannot read RayJob {self.namespace}/{name}: {err}") from err

    def observe(self, name: str, iteration: int, attempt: int) -> JobObservation | None:
        return observe_rayjob(self.get(name), iteration, attempt)

    def stop(self, name: str) -> None:
        """Delete the RayJob in the foreground: it stays (and is observed) until the RayCluster and pods it owns
        are gone, so the planner's next attempt never runs beside them."""
        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                     propagation_policy="Foreground")
        except ApiException as err:
            if err.status != 404:
                raise Transient(f"cannot delete RayJob {self.namespace}/{name}: {err.status} {err.reason}") from err
        except _K8S_ERRORS as err:
            raise Transient(f"cannot delete RayJob {self.namespace}/{name}: {err}") from err

    def delete_all(self, run_uid: str) -> list[str]:
        """Delete every RayJob of a run (whatever status says); returns their names."""
        try:
            items = self.api.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, label_selector=f"{LABEL_RUN_UID}={run_uid}")["items"]
        except ApiException as err:
            if err.status == 404:  # KubeRay's CRD is not installed: there can be no RayJobs
                return []
            raise Transient(f"cannot list RayJobs in {self.namespace}: {err.status} {err.reason}") from err
        except _K8S_ERRORS as err:
            raise Transient(f"cannot list RayJobs in {self.namespace}: {err}") from err
        names = [item["metadata"]["name"] for item in items]
        for name in names:
            self.stop(name)
        return names


def _api_message(err: ApiException) -> str:
    try:
        return json.loads(err.body or "{}").get("message") or str(err.reason)
    except (ValueError, AttributeError):
        return str(err.reason)
