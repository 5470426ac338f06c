"""The KubeRay launcher: one RayJob (ray.io/v1) per iteration attempt.

``rayjob_manifest`` and ``observe_rayjob`` are pure (plain dicts in and out); ``RayJobLauncher`` does
the API calls. Stop deletes the RayJob rather than setting ``spec.suspend``: the planner's Stop ends
the attempt (as ``ray job stop`` does with the Jobs API launcher), deleting frees the cluster's GPUs
at once (KubeRay deletes the RayCluster it owns), and the next attempt resumes from the last committed
stage in storage. A suspended RayJob would sit there needing a resume the planner has no action for.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llm2llm.launch import API_KEY_ENV
from llm2llm.planner import JobObservation
from llm2llm.spec import API_VERSION, KIND, AugmentationRunSpec

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TEMPLATE_KEY = "rayClusterSpec"  # the key of the clusterTemplate ConfigMap

# Labels on every job the operator creates; run-uid selects a run's jobs (names can be reused).
LABEL_RUN = "llm2llm.io/run"
LABEL_RUN_UID = "llm2llm.io/run-uid"
LABEL_ITERATION = "llm2llm.io/iteration"
LABEL_ATTEMPT = "llm2llm.io/attempt"


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


def _cluster_spec(template: dict[str, Any], spec: AugmentationRunSpec) -> dict[str, Any]:
    cluster = copy.deepcopy(template)
    ref = spec.teacher.api_key_secret_ref
    for group in _groups(cluster):
        # KubeRay's convention: the Ray container is the first one; sidecars keep their own images.
        ray = group["template"]["spec"]["containers"][0]
        if spec.ray.image:
            ray["image"] = spec.ray.image
        if ref is not None:
            # Only a reference travels: the kubelet resolves the value inside the pod.
            env = [e for e in ray.get("env") or [] if e.get("name") != API_KEY_ENV]
            env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
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
) -> dict[str, Any]:
    """The RayJob for one attempt. ``run`` is the AugmentationRun (its metadata is used); ``spec`` its
    parsed spec; ``cluster_template`` the parsed clusterTemplate when the spec names one."""
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
        job["rayClusterSpec"] = _cluster_spec(cluster_template, spec)
        job["shutdownAfterJobFinishes"] = True  # a cluster per job: give the GPUs back when it ends
    else:
        raise ValueError("the rayjob launcher needs spec.ray.clusterSelector or spec.ray.clusterTemplate")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {
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
    """RayJobs in one namespace. Names are the planner's deterministic job names, so a create after a
    crash meets 409 AlreadyExists instead of making a second job."""

    def __init__(self, api: client.CustomObjectsApi, namespace: str):
        self.api = api
        self.namespace = namespace

    def submit(self, manifest: dict[str, Any]) -> bool:
        """Returns False when the RayJob already existed. Strict: a template field KubeRay's schema does
        not know is an error to report, not something to drop silently."""
        try:
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest,
                                                     field_validation="Strict")
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def observe(self, name: str, iteration: int, attempt: int) -> JobObservation | None:
        return observe_rayjob(self.get(name), iteration, attempt)

    def stop(self, name: str) -> None:
        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                     propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                raise

    def delete_all(self, run_uid: str) -> list[str]:
        """Delete every RayJob of a run (whatever status says); returns their names."""
        try:
            items = self.api.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, label_selector=f"{LABEL_RUN_UID}={run_uid}")["items"]
        except ApiException as err:
            if err.status == 404:  # KubeRay's CRD is not installed: there can be no RayJobs
                return []
            raise
        names = [item["metadata"]["name"] for item in items]
        for name in names:
            self.stop(name)
        return names
