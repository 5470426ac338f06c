"""The RayJob manifest builder, the clusterTemplate parser and the RayJob status mapping (pure)."""

from __future__ import annotations

import json

import pytest
import yaml

from llm2llm.launch import entrypoint, job_env
from llm2llm.spec import parse_spec
from llm2llm_operator.rayjob import TemplateError, observe_rayjob, parse_cluster_template, rayjob_manifest

RUN = {"metadata": {"name": "demo", "namespace": "research", "uid": "u-1"}}
TEMPLATE = {
    "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
        {"name": "ray-head", "image": "ray:1", "env": [{"name": "LLM2LLM_TEACHER_API_KEY", "value": "stale"}]},
        {"name": "sidecar", "image": "side:1"}]}}},
    "workerGroupSpecs": [{"groupName": "w", "minReplicas": 0, "maxReplicas": 2, "template": {"spec": {
        "containers": [{"name": "ray-worker", "image": "ray:1"}]}}}],
}


def _spec(**ray):
    return parse_spec({
        "data": {"seed": "/d/seed.jsonl"}, "output": "s3://b/runs", "activeDeadlineSeconds": 600,
        "teacher": {"kind": "openai", "endpoint": "https://x/v1", "apiKeySecretRef": {"name": "oa", "key": "tok"}},
        "ray": {"launcher": "rayjob", **ray},
    })


def _manifest(spec, template=None, key_pins=None):
    cmd = entrypoint("demo", "u-1", spec, 2, 3, "/usr/bin/python3")
    return rayjob_manifest(run=RUN, spec=spec, name="demo-abc-i2-a3", iteration=2, attempt=3, entrypoint=cmd,
                           env=job_env(spec), cluster_template=template, key_pins=key_pins)


def test_manifest_with_cluster_selector():
    m = _manifest(_spec(clusterSelector={"ray.io/cluster": "shared"}))
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    assert m["metadata"]["name"] == "demo-abc-i2-a3" and m["metadata"]["namespace"] == "research"
    assert m["metadata"]["labels"] == {"llm2llm.io/run": "demo", "llm2llm.io/run-uid": "u-1",
                                       "llm2llm.io/iteration": "2", "llm2llm.io/attempt": "3"}
    owner = m["metadata"]["ownerReferences"][0]
    assert owner == {"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun", "name": "demo", "uid": "u-1",
                     "controller": True, "blockOwnerDeletion": True}
    spec = m["spec"]
    assert spec["entrypoint"].startswith("/usr/bin/python3 -m llm2llm_jobs.iteration --run ")
    assert spec["entrypoint"].endswith("--iteration 2 --attempt 3")
    assert spec["clusterSelector"] == {"ray.io/cluster": "shared"}
    assert "rayClusterSpec" not in spec and "shutdownAfterJobFinishes" not in spec  # never on a shared cluster
    assert spec["submissionMode"] == "K8sJobMode" and spec["activeDeadlineSeconds"] == 600
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": job_env(_spec())}


def test_manifest_with_template_overrides_image_and_references_the_secret():
    m = _manifest(_spec(clusterTemplate="pool", image="job:2"), TEMPLATE, key_pins="https://x/v1")
    cluster = m["spec"]["rayClusterSpec"]
    assert m["spec"]["shutdownAfterJobFinishes"] is True and "clusterSelector" not in m["spec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    ref = [{"name": "LLM2LLM_TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "oa", "key": "tok"}}},
           {"name": "LLM2LLM_TEACHER_API_KEY_ENDPOINTS", "value": "https://x/v1"}]  # the Secret's own pins
    assert head[0]["env"] == ref and worker[0]["env"] == ref  # replaces a literal of the same name
    assert head[0]["image"] == worker[0]["image"] == "job:2" and head[1] == {"name": "sidecar", "image": "side:1"}
    assert TEMPLATE["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "ray:1"  # not mutated


def test_manifest_without_image_or_key_keeps_the_template_but_no_key_of_its_own():
    spec = parse_spec({"data": {"seed": "/s"}, "output": "/o", "ray": {"launcher": "rayjob", "clusterTemplate": "p"}})
    m = _manifest(spec, TEMPLATE)
    cluster = m["spec"]["rayClusterSpec"]
    assert "activeDeadlineSeconds" not in m["spec"]
    # A key (or a pin) written into the template by its author never reaches the pods: only the checked Secret's.
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] == []
    assert cluster["workerGroupSpecs"] == TEMPLATE["workerGroupSpecs"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][1] == {"name": "sidecar", "image": "side:1"}


def test_template_author_cannot_pin_a_key_to_their_own_endpoint():
    evil = {"headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray-head", "image": "ray:1", "env": [
        {"name": "LLM2LLM_TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "someone-elses", "key": "k"}}},
        {"name": "LLM2LLM_TEACHER_API_KEY_ENDPOINTS", "value": "https://attacker.example"},
        {"name": "KEEP", "value": "1"}]}]}}}}
    spec = parse_spec({"data": {"seed": "/s"}, "output": "/o", "ray": {"launcher": "rayjob", "clusterTemplate": "p"}})
    env = _manifest(spec, evil)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "KEEP", "value": "1"}]


def test_a_rayjob_being_deleted_is_not_finished_until_it_is_gone():
    obj = {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}
    assert observe_rayjob(obj, 0, 1).phase == "Running"
    assert observe_rayjob(None, 0, 1) is None


def test_manifest_needs_a_cluster():
    with pytest.raises(ValueError, match="clusterSelector or spec.ray.clusterTemplate"):
        _manifest(_spec())


@pytest.mark.parametrize("data,words", [
    (None, "has no key"),
    ({"rayClusterSpec": "a: [b"}, "not valid YAML"),
    ({"rayClusterSpec": "- 1"}, "headGroupSpec"),
    ({"rayClusterSpec": "headGroupSpec: {template: {spec: {containers: []}}}"}, "headGroupSpec.template"),
    ({"rayClusterSpec": yaml.safe_dump({**TEMPLATE, "workerGroupSpecs": [{"template": {}}]})}, "workerGroupSpecs[0]"),
])
def test_bad_templates(data, words):
    with pytest.raises(TemplateError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_cluster_template(data, "pool")


def test_good_template_parses():
    assert parse_cluster_template({"rayClusterSpec": yaml.safe_dump(TEMPLATE)}, "pool") == TEMPLATE


def _job(**status):
    return {"metadata": {"name": "j"}, "status": status} if status else {"metadata": {"name": "j"}}


@pytest.mark.parametrize("obj,phase", [
    (_job(), "Pending"),
    (_job(jobDeploymentStatus="Initializing"), "Pending"),
    (_job(jobDeploymentStatus="Waiting"), "Pending"),
    (_job(jobDeploymentStatus="Suspended"), "Pending"),
    (_job(jobDeploymentStatus="Running", jobStatus="RUNNING"), "Running"),
    (_job(jobDeploymentStatus="Retrying"), "Running"),
    (_job(jobDeploymentStatus="SomethingNew"), "Running"),  # unknown: never call it finished
    (_job(jobDeploymentStatus="Running", jobStatus="SUCCEEDED"), "Running"),  # KubeRay has not finished yet
    (_job(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"), "Succeeded"),
    (_job(jobDeploymentStatus="Complete", jobStatus="FAILED"), "Failed"),
    (_job(jobDeploymentStatus="Complete", jobStatus="STOPPED"), "Failed"),
    (_job(jobDeploymentStatus="Complete"), "Failed"),
    (_job(jobDeploymentStatus="Failed", jobStatus="FAILED"), "Failed"),
    (_job(jobDeploymentStatus="ValidationFailed", reason="ValidationFailed", message="bad spec"), "Failed"),
])
def test_status_mapping(obj, phase):
    ob = observe_rayjob(obj, 4, 2)
    assert (ob.phase, ob.iteration, ob.attempt) == (phase, 4, 2)


def test_status_messages():
    assert observe_rayjob(None, 0, 1) is None  # gone: the planner decides what that means
    assert observe_rayjob(_job(jobDeploymentStatus="Failed", reason="DeadlineExceeded", message="too slow"), 0, 1
                          ).message == "DeadlineExceeded; too slow"
    assert observe_rayjob(_job(jobDeploymentStatus="Complete", jobStatus="STOPPED"), 0, 1).message == \
        "Ray job ended STOPPED"
    assert len(observe_rayjob(_job(jobDeploymentStatus="Failed", message="x" * 2000), 0, 1).message) == 500
