"""The operator against a real kube-apiserver with KubeRay's real CRDs.

The operator runs as a subprocess (`python -m llm2llm_operator`), as in a pod. No KubeRay controller
runs here (and no kubelet, no garbage collector): where KubeRay would report on a RayJob, the test
writes the RayJob's status itself, and everything deleted must have been deleted by the operator.
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llm2llm.planner import job_name
from llm2llm.spec import SpecError, parse_run
from llm2llm.status import IterationStatus, TokenCounts
from llm2llm.storage import RunStorage
from tests.e2e.test_operator_harness import Api, augrun_crd, operator, run_doc, wait_for  # noqa: F401

SECRET_VALUE = "sk-test-DO-NOT-LEAK-4f1c2a"


@pytest.fixture
def api(control_plane, namespace) -> Api:
    return Api(control_plane, namespace)


def _iteration(index: int, job: str, failures: int, kept: int, seed_acc: float, test_acc: float) -> IterationStatus:
    return IterationStatus(
        index=index, attempt=1, train_rows=10 + index, train_steps=8, train_loss=1.5, seed_accuracy=seed_acc,
        test_accuracy=test_acc, failures=failures, generated=kept + 1, kept=kept, rejected={"duplicate": 1},
        seconds={"train": 3.0, "infer": 1.0}, tokens=TokenCounts(teacher_prompt=100, teacher_completion=50),
        job=job, datasets={"train": f"/x/iter-{index}/merge/train.parquet"},
    )


def _state(api: Api, run: str, job: str) -> str | None:
    return next((j.get("state") for j in api.status(run).get("jobs", []) if j["name"] == job), None)


def _table(kubectl, namespace: str) -> list[list[str]]:
    out = kubectl("get", "augruns", "-n", namespace).stdout
    return [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]


def test_crd_is_accepted_with_cel_rules(control_plane, augrun_crd, api):
    crds = control_plane.dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    crd = crds.get(name=augrun_crd).to_dict()
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert len(spec["x-kubernetes-validations"]) >= 5
    # The API server fills in defaults, but never switches on an optional feature: an absent
    # loop.stopWhen.plateau stays absent (a `{}` default once made it plateau-stop every run).
    created = api.create_run(run_doc("defaults", "/tmp/out", loop={"maxIterations": 3}))
    assert created["spec"]["loop"] == {"maxIterations": 3, "stopWhen": {"noFailures": True}, "select": "failures"}
    assert created["spec"]["student"]["training"]["lr"] == 2e-5


def test_rayjob_lifecycle(api, operator, kubectl, namespace, tmp_path, capsys):
    op = operator(namespace)
    out = tmp_path / "out"
    started = time.monotonic()
    api.create_run(run_doc("life", out))
    uid = api.run("life")["metadata"]["uid"]
    a1, a2, b1 = job_name("life", uid, 0, 1), job_name("life", uid, 0, 2), job_name("life", uid, 1, 1)
    job = wait_for(lambda: api.rayjob(a1), "the first RayJob")
    latency = time.monotonic() - started
    with capsys.disabled():
        print(f"\napply -> RayJob created: {latency:.2f}s")
    assert latency < 30

    # Exactly one RayJob, named by the planner, accepted under KubeRay's real schema.
    assert api.rayjobs(uid) == [a1]
    meta, spec = job["metadata"], job["spec"]
    assert meta["labels"] == {"llm2llm.io/run": "life", "llm2llm.io/run-uid": uid, "llm2llm.io/iteration": "0",
                              "llm2llm.io/attempt": "1", "llm2llm.io/namespace": meta["namespace"]}
    assert meta["ownerReferences"] == [{"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun", "name": "life",
                                        "uid": uid, "controller": True, "blockOwnerDeletion": True}]
    assert "llm2llm_jobs.iteration" in spec["entrypoint"] and "--iteration 0 --attempt 1" in spec["entrypoint"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "shared"} and "rayClusterSpec" not in spec
    assert spec["submissionMode"] == "K8sJobMode"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"

    wait_for(lambda: api.status("life").get("iterationLabel") == "1/2", "status iteration 1/2")
    rows = _table(kubectl, namespace)
    assert rows[0][:6] == ["NAME", "PHASE", "ITERATION", "SEED-ACC", "TEST-ACC", "AUGMENTED"]
    assert rows[1][:3] == ["life", "Running", "1/2"]

    # KubeRay's part: the job runs, then fails -> attempt 2 after the (1 s) backoff.
    api.set_rayjob_status(a1, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_for(lambda: _state(api, "life", a1) == "Running", "job state Running")
    api.set_rayjob_status(a1, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", message="boom")
    wait_for(lambda: api.rayjob(a2), "the retry RayJob (attempt 2)")
    rec = api.status("life")["jobs"][0]
    assert rec["state"] == "Failed" and "boom" in rec["message"]

    # The job commits its iteration (manifest in storage), then KubeRay reports Complete.
    store = RunStorage(str(out), "life")
    store.write_iteration(_iteration(0, a2, failures=4, kept=3, seed_acc=0.5, test_acc=0.4))
    api.set_rayjob_status(a2, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    wait_for(lambda: api.rayjob(b1), "the RayJob of iteration 1")
    st = wait_for(lambda: (s := api.status("life")) and s["iterations"] and s, "iteration 0 in status")
    assert st["iterations"][0]["seedAccuracy"] == 0.5 and st["iterations"][0]["kept"] == 3
    assert st["iterations"][0]["job"] == a2 and st["iterationLabel"] == "2/2"

    store.write_iteration(_iteration(1, b1, failures=2, kept=2, seed_acc=0.75, test_acc=0.5))
    api.set_rayjob_status(b1, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    wait_for(lambda: api.status("life").get("phase") == "Succeeded", "phase Succeeded")
    st = api.status("life")
    succeeded = api.condition("life", "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "MaxIterations"
    assert [i["index"] for i in st["iterations"]] == [0, 1] and st["augmentedRows"] == 5
    assert "activeJob" not in st and st["stopReason"] == "MaxIterations"
    assert api.rayjobs(uid) == sorted([a1, a2, b1])
    assert _table(kubectl, namespace)[1][:6] == ["life", "Succeeded", "2/2", "0.75", "0.5", "5"]

    reasons = wait_for(lambda: (r := api.event_reasons("life")) and "RunSucceeded" in r and r,
                       "the RunSucceeded event")
    for reason in ("IterationStarted", "JobFailed", "Retrying", "IterationSucceeded", "RunSucceeded"):
        assert reason in reasons, reasons
    assert reasons.count("IterationSucceeded") == 2

    text = op.metrics()
    assert 'llm2llm_jobs_submitted_total{launcher="rayjob"} 3.0' in text
    assert 'llm2llm_runs{phase="Succeeded"} 1.0' in text
    assert "llm2llm_reconcile_duration_seconds_count" in text


def test_suspend_stops_the_rayjob_and_resume_relaunches(api, operator, namespace, tmp_path):
    operator(namespace)
    api.create_run(run_doc("sus", tmp_path / "out"))
    uid = api.run("sus")["metadata"]["uid"]
    a1, a2 = job_name("sus", uid, 0, 1), job_name("sus", uid, 0, 2)
    wait_for(lambda: api.rayjob(a1), "the first RayJob")
    api.set_rayjob_status(a1, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_for(lambda: _state(api, "sus", a1) == "Running", "job state Running")

    api.patch_spec("sus", {"suspend": True})
    wait_for(lambda: api.rayjob(a1) is None, "the operator to delete the running RayJob")
    wait_for(lambda: api.status("sus").get("phase") == "Suspended", "phase Suspended")
    assert api.condition("sus", "Suspended")["status"] == "True"
    first = api.status("sus")["jobs"][0]
    assert first["state"] == "Suspended" and "suspended" in first["message"]  # not counted as a failed attempt
    assert api.rayjobs(uid) == []

    api.patch_spec("sus", {"suspend": False})
    wait_for(lambda: api.rayjob(a2), "a new attempt after resuming")
    wait_for(lambda: api.status("sus").get("phase") == "Running", "phase Running")
    assert api.condition("sus", "Suspended")["status"] == "False"
    assert api.rayjobs(uid) == [a2]
    reasons = wait_for(lambda: (r := api.event_reasons("sus")) and "JobStopped" in r and r, "the JobStopped event")
    assert "Suspended" in reasons


def test_delete_stops_rayjobs_and_deletes_data_only_when_asked(api, operator, namespace, tmp_path):
    operator(namespace)
    out = tmp_path / "out"
    api.create_run(run_doc("gone", out, deleteData=True))
    api.create_run(run_doc("kept", out))
    uids = {n: api.run(n)["metadata"]["uid"] for n in ("gone", "kept")}
    for name, uid in uids.items():
        wait_for(lambda: api.rayjob(job_name(name, uid, 0, 1)), f"the RayJob of {name}")
        wait_for(lambda: "llm2llm.io/finalizer" in api.run(name)["metadata"].get("finalizers", []), "the finalizer")
        RunStorage(str(out), name).mark_done(0, "prepare", {"rows": 1})

    for name in uids:
        api.delete_run(name)
    for name, uid in uids.items():
        wait_for(lambda: api.run(name) is None, f"{name} to disappear")
        # No garbage collector here: an empty list means the operator deleted them itself.
        assert api.rayjobs(uid) == []
    assert not (out / "gone").exists()
    assert (out / "kept" / "iter-0" / "prepare" / "_DONE.json").exists()


def test_cluster_template_and_api_key_secret(api, operator, namespace, tmp_path, control_plane):
    operator(namespace)
    core = client.CoreV1Api(control_plane.api)
    core.create_namespaced_secret(namespace, {"metadata": {
        "name": "openai", "labels": {"llm2llm.io/teacher-key": "true"},
        "annotations": {"llm2llm.io/allowed-endpoints": "https://llm.example/v1"}}, "stringData": {"token": SECRET_VALUE}})
    template = {
        "rayVersion": "2.60.0",
        "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
            {"name": "ray-head", "image": "rayproject/ray:2.60.0", "env": [{"name": "A", "value": "1"}]},
            {"name": "log-shipper", "image": "fluent/fluent-bit:3"}]}}},
        "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
                              "rayStartParams": {}, "template": {"spec": {"containers": [
                                  {"name": "ray-worker", "image": "rayproject/ray:2.60.0",
                                   "resources": {"limits": {"nvidia.com/gpu": "4"}}}]}}}],
    }
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "a100-pool"},
                                                  "data": {"rayClusterSpec": yaml.safe_dump(template)}})
    doc = run_doc("tpl", tmp_path / "out", activeDeadlineSeconds=7200,
                  teacher={"kind": "openai", "endpoint": "https://llm.example/v1", "model": "gpt-4o-mini",
                           "apiKeySecretRef": {"name": "openai", "key": "token"}},
                  ray={"launcher": "rayjob", "clusterTemplate": "a100-pool", "image": "registry.example/llm2llm-job:1"})
    api.create_run(doc)
    uid = api.run("tpl")["metadata"]["uid"]
    job = wait_for(lambda: api.rayjob(job_name("tpl", uid, 0, 1)), "the RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] == 7200
    assert "clusterSelector" not in spec
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    ref = [{"name": "LLM2LLM_TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "token"}}},
           {"name": "LLM2LLM_TEACHER_API_KEY_ENDPOINTS", "value": "https://llm.example/v1"}]  # the Secret's pin
    assert head[0]["image"] == worker[0]["image"] == "registry.example/llm2llm-job:1"
    assert head[1]["image"] == "fluent/fluent-bit:3"  # sidecars keep their image
    assert head[0]["env"] == [{"name": "A", "value": "1"}, *ref] and worker[0]["env"] == ref
    assert worker[0]["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    text = json.dumps(job)
    assert SECRET_VALUE not in text and "DO-NOT-LEAK" not in text
    assert base64.b64encode(SECRET_VALUE.encode()).decode()[:16] not in text


# --- bad specs ------------------------------------------------------------------------------------

def _doc(**spec):
    return run_doc("bad", "/tmp/out", **spec)


def _named(name):
    d = _doc()
    d["metadata"]["name"] = name
    return d


def _without(key):
    d = _doc()
    del d["spec"][key]
    return d


# (id, manifest, words the API server's message must contain)
REFUSED = [
    ("maxIterations-0", _doc(loop={"maxIterations": 0}), ["spec.loop.maxIterations"]),
    ("maxIterations-string", _doc(loop={"maxIterations": "three"}), ["spec.loop.maxIterations"]),
    ("unknown-teacher-kind", _doc(teacher={"kind": "gpt"}), ["spec.teacher.kind", "Unsupported value"]),
    ("missing-seed", _doc(data={"test": "/t.jsonl"}), ["spec.data.seed", "Required"]),
    ("missing-output", _without("output"), ["spec.output", "Required"]),
    ("negative-lr", _doc(student={"training": {"lr": -0.1}}), ["spec.student.training.lr"]),
    ("temperature-too-high", _doc(teacher={"temperature": 3}), ["spec.teacher.temperature"]),
    ("retry-0-attempts", _doc(retry={"maxAttempts": 0}), ["spec.retry.maxAttempts"]),
    ("unknown-dedup", _doc(filters={"dedup": "fuzzy"}), ["spec.filters.dedup"]),
    ("unknown-field", _doc(student={"foo": 1}), ["spec.student.foo", "unknown field"]),
    ("openai-without-endpoint", _doc(teacher={"kind": "openai"}), ["teacher.endpoint is required"]),
    ("jobs-api-without-address", _doc(ray={"launcher": "jobs-api"}), ["ray.address is required"]),
    ("selector-and-template", _doc(ray={"launcher": "rayjob", "clusterSelector": {"a": "b"},
                                        "clusterTemplate": "t"}), ["mutually exclusive"]),
    ("classification-without-labels", _doc(task={"kind": "classification"}), ["task.labels"]),
    ("micro-batch-above-batch", _doc(student={"training": {"batchSize": 2, "microBatchSize": 4}}),
     ["microBatchSize must not exceed batchSize"]),
    ("plateau-not-below-max", _doc(loop={"maxIterations": 3, "stopWhen": {"plateau": {"iterations": 3}}}),
     ["plateau.iterations must be smaller"]),
    ("template-without-input", _doc(task={"studentTemplate": "Q: {question}"}), ["{input}"]),
    ("bad-name", _named("Bad_Name"), ["metadata.name"]),
    ("name-too-long", _named("r" * 64), ["metadata.name"]),
]


@pytest.mark.parametrize("doc,words", [pytest.param(d, w, id=i) for i, d, w in REFUSED])
def test_bad_spec_is_refused_by_the_api_server(api, augrun_crd, doc, words):
    with pytest.raises(ApiException) as info:
        api.create_run(doc)
    err = info.value
    assert err.status in (400, 422), err  # 400: strict decoding (unknown field); 422: schema and CEL
    message = json.loads(err.body)["message"]
    for word in words:
        assert word in message, message
    # The Python rules (llm2llm validate, the local runner) refuse it too: one meaning, two places.
    with pytest.raises(SpecError):
        parse_run(doc)
    assert api.rayjobs() == []


def test_bad_specs_caught_by_the_operator(api, operator, namespace, tmp_path, control_plane):
    # Default launcher jobs-api without an address, so `launcher: local` has nowhere to go.
    operator(namespace, "--default-launcher", "jobs-api")
    core = client.CoreV1Api(control_plane.api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "nokey", "labels": {"llm2llm.io/teacher-key": "true"},
                                                           "annotations": {"llm2llm.io/allowed-endpoints": "https://llm.example"}},
                                              "stringData": {"other": "x"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "plain"}, "stringData": {"token": "x"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "empty"}, "data": {"x": "y"}})
    nameless = {"headGroupSpec": {"template": {"spec": {"containers": [{"image": "ray:1"}]}}}}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "nameless"},
                                                  "data": {"rayClusterSpec": yaml.safe_dump(nameless)}})
    out = str(tmp_path / "out")
    openai = {"kind": "openai", "endpoint": "https://llm.example/v1"}
    cases = {  # name: (spec overrides, reason, phase, words in the message)
        "no-secret": ({"teacher": {**openai, "apiKeySecretRef": {"name": "missing", "key": "k"}}},
                      "SecretNotFound", "Pending", "Secret"),
        "no-secret-key": ({"teacher": {**openai, "apiKeySecretRef": {"name": "nokey", "key": "token"}}},
                          "SecretKeyNotFound", "Pending", "'token'"),
        # Not labelled by its owner: the operator lists Secrets by that label, so it never even sees this one.
        "not-opted-in": ({"teacher": {**openai, "apiKeySecretRef": {"name": "plain", "key": "token"}}},
                         "SecretNotFound", "Pending", "llm2llm.io/teacher-key=true"),
        "no-template": ({"ray": {"launcher": "rayjob", "clusterTemplate": "missing"}},
                        "ClusterTemplateNotFound", "Pending", "ConfigMap"),
        "empty-template": ({"ray": {"launcher": "rayjob", "clusterTemplate": "empty"}},
                           "ClusterTemplateInvalid", "Pending", "rayClusterSpec"),
        "rejected-template": ({"ray": {"launcher": "rayjob", "clusterTemplate": "nameless"}},
                              "JobRejected", "Pending", "name"),
        "bad-scheme": ({"output_": "foo://bucket/runs"}, "OutputUnsupported", "Failed", "spec.output"),
        "relative-output": ({"output_": "runs"}, "RelativePath", "Failed", "--base-dir"),
        "no-cluster": ({"ray": {"launcher": "rayjob"}}, "NoRayCluster", "Failed", "clusterSelector"),
        "no-address": ({"ray": {"launcher": "local"}}, "NoRayAddress", "Failed", "address"),
    }
    for name, (spec, *_rest) in cases.items():
        api.create_run(run_doc(name, spec.pop("output_", out), **spec))
    for name, (_spec, reason, phase, words) in cases.items():
        cond = wait_for(lambda: (c := api.condition(name, "Ready")) and c["status"] == "False" and c,
                        f"Ready=False on {name}")
        assert cond["reason"] == reason and words in cond["message"], (name, cond)
        assert api.status(name)["phase"] == phase, name
        assert not api.status(name).get("jobs"), name
    assert api.rayjobs() == []
    reasons = wait_for(lambda: api.event_reasons("no-secret"), "the SecretNotFound event")
    assert reasons.count("SecretNotFound") == 1  # one event per transition, not one per reconcile

    # Reference checks are level-based: once the Secret exists, the run starts.
    core.create_namespaced_secret(namespace, {"metadata": {"name": "missing", "labels": {"llm2llm.io/teacher-key": "true"},
                                                           "annotations": {"llm2llm.io/allowed-endpoints": "https://llm.example/v1"}},
                                              "stringData": {"k": "v"}})
    api.patch_spec("no-secret", {"ray": {"launcher": "rayjob", "clusterSelector": {"ray.io/cluster": "shared"}}})
    uid = api.run("no-secret")["metadata"]["uid"]
    wait_for(lambda: api.rayjob(job_name("no-secret", uid, 0, 1)), "the run to start once the Secret exists")
    wait_for(lambda: api.condition("no-secret", "Ready")["status"] == "True", "Ready=True")


def test_operator_restart_mid_run(api, operator, namespace, tmp_path):
    first = operator(namespace)
    out = tmp_path / "out"
    api.create_run(run_doc("restart", out))
    uid = api.run("restart")["metadata"]["uid"]
    a1, b1 = job_name("restart", uid, 0, 1), job_name("restart", uid, 1, 1)
    wait_for(lambda: api.rayjob(a1), "the first RayJob")
    first.kill()

    operator(namespace)  # a fresh process: nothing remembered but what the API and storage hold
    api.set_rayjob_status(a1, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_for(lambda: _state(api, "restart", a1) == "Running", "the new operator to observe the job")
    assert api.rayjobs(uid) == [a1]
    RunStorage(str(out), "restart").write_iteration(_iteration(0, a1, failures=3, kept=2, seed_acc=0.4, test_acc=0.3))
    api.set_rayjob_status(a1, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    wait_for(lambda: api.rayjob(b1), "iteration 1")
    assert api.rayjobs(uid) == sorted([a1, b1])
    wait_for(lambda: [j["name"] for j in api.status("restart")["jobs"]] == [a1, b1], "both jobs in status")
