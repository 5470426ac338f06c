"""Smoke tests of the test control plane: each one checks real API server behaviour."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "test.llm2llm.io", "v1", "widgets"
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": VERSION, "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {"type": "object",
                             "properties": {"size": {"type": "integer", "minimum": 1}}},
                    "status": {"type": "object",
                               "properties": {"phase": {"type": "string"}}},
                },
            }},
        }],
    },
}


@pytest.fixture(scope="session")
def widget_crd(control_plane):
    control_plane.apply(WIDGET_CRD)
    control_plane.wait_crd_established(WIDGET_CRD["metadata"]["name"])
    return WIDGET_CRD["metadata"]["name"]


@pytest.fixture
def objs(control_plane):
    return client.CustomObjectsApi(control_plane.api)


def widget(name: str, size: int = 1) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget",
            "metadata": {"name": name}, "spec": {"size": size}}


def test_namespace_create_and_get(control_plane):
    core = client.CoreV1Api(control_plane.api)
    name = control_plane.new_namespace("ns-smoke")
    ns = core.read_namespace(name)
    assert ns.metadata.name == name
    assert ns.status.phase == "Active"
    assert name in [n.metadata.name for n in core.list_namespace().items]


def test_crd_established(control_plane, widget_crd):
    crd = client.ApiextensionsV1Api(control_plane.api).read_custom_resource_definition(widget_crd)
    established = [c for c in crd.status.conditions if c.type == "Established"]
    assert established and established[0].status == "True"


def test_custom_resource_create_and_schema(objs, namespace, widget_crd):
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w1", 3))
    got = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1")
    assert got["spec"] == {"size": 3}
    assert got["metadata"]["uid"]
    # The CRD's openAPI schema is enforced: minimum: 1.
    with pytest.raises(ApiException) as e:
        objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w2", 0))
    assert e.value.status == 422


def test_status_subresource(objs, namespace, widget_crd):
    objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w"))
    got = objs.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "w", {"status": {"phase": "Ready"}})
    assert got["status"] == {"phase": "Ready"}
    # With a status subresource, the main endpoint ignores status changes (and vice versa).
    got = objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "w", {"spec": {"size": 2}, "status": {"phase": "Bogus"}})
    assert got["spec"] == {"size": 2}
    assert got["status"] == {"phase": "Ready"}
    got = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w")
    assert got["status"] == {"phase": "Ready"}


def test_watch_event(objs, namespace, widget_crd):
    created = objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w"))
    objs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w",
                                        {"spec": {"size": 5}})
    # Watching from the creation's resourceVersion delivers every later change: no race.
    w = watch.Watch()
    events = []
    for ev in w.stream(objs.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                       resource_version=created["metadata"]["resourceVersion"],
                       timeout_seconds=30):
        events.append((ev["type"], ev["object"]["spec"]["size"]))
        w.stop()
    assert events == [("MODIFIED", 5)]


def test_rbac_via_impersonation(control_plane, namespace):
    sa = f"system:serviceaccount:{namespace}:bot"
    as_bot = client.CoreV1Api(control_plane.impersonating(sa))
    with pytest.raises(ApiException) as e:
        as_bot.list_namespaced_config_map(namespace)
    assert e.value.status == 403

    rbac = client.RbacAuthorizationV1Api(control_plane.api)
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "read-cm"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "bot-read-cm"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
        "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": namespace}]})
    # The RBAC authorizer reads roles from an informer cache: poll until it has caught up.
    deadline = time.monotonic() + 30
    while True:
        try:
            as_bot.list_namespaced_config_map(namespace)
            break
        except ApiException as e:
            if e.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # Only what was granted: creating is still forbidden.
    with pytest.raises(ApiException) as e:
        as_bot.create_namespaced_config_map(namespace, {"metadata": {"name": "x"}})
    assert e.value.status == 403


RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "smoke"},
    "spec": {
        "entrypoint": "python -c 'print(1)'",
        "shutdownAfterJobFinishes": True,
        "rayClusterSpec": {
            "rayVersion": "2.46.0",
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [
                    {"name": "ray-head", "image": "rayproject/ray:2.46.0"}]}},
            },
            "workerGroupSpecs": [{
                "groupName": "workers", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                "rayStartParams": {},
                "template": {"spec": {"containers": [
                    {"name": "ray-worker", "image": "rayproject/ray:2.46.0"}]}},
            }],
        },
    },
}


def test_rayjob_validated_by_kuberay_schema(objs, namespace):
    created = objs.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", RAYJOB)
    assert created["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1

    bad = copy.deepcopy(RAYJOB)
    bad["metadata"]["name"] = "bad-type"
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(ApiException) as e:
        objs.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", bad)
    assert e.value.status == 422
    assert "workerGroupSpecs[0].replicas" in json.loads(e.value.body)["message"]

    # A misspelt field is silently pruned by default; Strict field validation refuses it.
    typo = copy.deepcopy(RAYJOB)
    typo["metadata"]["name"] = "typo"
    typo["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(ApiException) as e:
        objs.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", typo,
                                             field_validation="Strict")
    assert e.value.status in (400, 422)
    assert "shutdownAfterJobFinish" in e.value.body


def test_kubectl_reports_server_version(kubectl):
    out = kubectl("version", "-o", "json").stdout
    assert json.loads(out)["serverVersion"]["gitVersion"] == "v1.34.4"


def test_helm_runs(control_plane, namespace):
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    helm = str(control_plane.tools_bin / "helm")
    out = subprocess.run([helm, "version", "--short"], check=True, capture_output=True,
                         text=True, env=env).stdout
    assert out.startswith("v3.")
    # Helm reaches the API server too (releases are Secrets; none yet).
    out = subprocess.run([helm, "list", "-n", namespace, "-o", "json"], check=True,
                         capture_output=True, text=True, env=env).stdout
    assert json.loads(out) == []
