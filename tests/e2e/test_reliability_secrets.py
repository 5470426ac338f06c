"""Secrets and RBAC.

- A teacher API key planted in a Secret never shows up anywhere the operator or a job writes: the
  AugmentationRun, Events, the operator's log (verbose), RayJob manifests, the job's log, every file in
  the run's storage (raw bytes, and decoded Parquet/JSON: Parquet is zstd-compressed, so raw bytes alone
  could hide a leak).
- RBAC on AugmentationRuns is ordinary namespaced RBAC: no access across namespaces.
- Who may hand a Secret to a job: only a Secret its owner labelled llm2llm.io/teacher-key=true. The operator
  reads Secrets with its own rights, so without the opt-in anyone who may create a run could have any key
  of the namespace sent to an endpoint of their choosing (a confused deputy).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import textwrap

import pytest
import pyarrow.parquet as pq
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llm2llm.launch import API_KEY_ENV
from llm2llm.planner import job_name
from llm2llm.spec import GROUP, PLURAL, VERSION
from tests.e2e.test_operator_harness import REPO, Api, augrun_crd, run_doc, wait_for  # noqa: F401
from tests.e2e.test_reliability_harness import SecretScanner, start_operator

TEMPLATE = {
    "rayVersion": "2.60.0",
    "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
        {"name": "ray-head", "image": "rayproject/ray:2.60.0"}]}}},
    "workerGroupSpecs": [{
        "groupName": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "rayStartParams": {},
        "template": {"spec": {"containers": [{"name": "ray-worker", "image": "rayproject/ray:2.60.0"}]}}}],
}

# The job's part, run as its own process with the environment a Ray pod would have (runtimeEnvYAML's
# env_vars, the Secret resolved by "the kubelet"). Attempt 1 runs the real prepare stage, then calls the real
# OpenAI teacher client with the key (endpoint 127.0.0.1:1 refuses at once) and dies of it, logging at DEBUG;
# attempt 2 skips prepare (its marker) and commits the iteration as the job does.
JOB = textwrap.dedent("""
    import logging, os, shlex, sys, pathlib
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from llm2llm.launch import API_KEY_ENV, decode_run
    from llm2llm.spec import spec_to_wire
    from llm2llm.status import IterationStatus, now
    from llm2llm_jobs.iteration import Iteration
    from llm2llm_jobs.teach import make_teacher

    argv = shlex.split(sys.argv[1])
    name, uid, spec = decode_run(argv[argv.index("--run") + 1])
    attempt = int(argv[argv.index("--attempt") + 1])
    it = Iteration(name, uid, spec, 0, attempt, pathlib.Path(sys.argv[2]))
    if not it.store.exists(it.store.path("run.json")):
        it.store.write_json(it.store.path("run.json"), {"name": name, "uid": uid, "spec": spec_to_wire(spec)})
    prep = it._stage("prepare", it.prepare)
    if attempt == 1:
        teacher = make_teacher(spec.teacher, None, os.environ.get(API_KEY_ENV),
                               key_pins=os.environ.get(API_KEY_ENV + "_ENDPOINTS"))
        teacher.max_retries = 0
        logging.info("teacher: %r", teacher)
        teacher.complete([[{"role": "user", "content": "2+2?"}]], n=1, temperature=1.0, top_p=1.0, max_tokens=8,
                         seed=1)  # raises: the job fails as a real one would
    it.store.write_iteration(IterationStatus(index=0, attempt=attempt, train_rows=prep["train_rows"],
                                             seed_accuracy=0.5, failures=1, job=os.environ["RAY_JOB_SUBMISSION_ID"],
                                             started_at=now(), finished_at=now()))
    print("job committed", flush=True)
""")


def _seed(path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scan_storage(scanner: SecretScanner, root) -> int:
    files = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files += 1
        rel = f"storage:{path.relative_to(root)}"
        scanner.scan(rel, path.read_bytes())
        if path.suffix == ".parquet":
            scanner.scan(rel + " (decoded)", json.dumps(pq.read_table(path).to_pylist(), default=str))
    return files


def test_api_key_never_leaks(control_plane, augrun_crd, namespace, tmp_path, capsys):  # noqa: F811
    key = f"sk-reliability-{secrets.token_hex(12)}"
    core = client.CoreV1Api(control_plane.api)
    api = Api(control_plane, namespace)
    core.create_namespaced_secret(namespace, {"metadata": {
        "name": "teacher-key", "labels": {"llm2llm.io/teacher-key": "true"},
        "annotations": {"llm2llm.io/allowed-endpoints": "http://127.0.0.1:1/v1"}}, "stringData": {"token": key}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "pool"},
                                                  "data": {"rayClusterSpec": yaml.safe_dump(TEMPLATE)}})
    op = start_operator(control_plane, tmp_path / "operator.log", namespace, "--verbose")
    out = tmp_path / "out"
    try:
        doc = run_doc("keyed", out, data={"seed": str(_seed(tmp_path / "seed.jsonl"))}, loop={"maxIterations": 1},
                      teacher={"kind": "openai", "endpoint": "http://127.0.0.1:1/v1", "model": "gpt-test",
                               "apiKeySecretRef": {"name": "teacher-key", "key": "token"}},
                      ray={"launcher": "rayjob", "clusterTemplate": "pool"})
        api.create_run(doc)
        uid = api.run("keyed")["metadata"]["uid"]
        a1, a2 = job_name("keyed", uid, 0, 1), job_name("keyed", uid, 0, 2)
        logs = []

        def play(name: str) -> subprocess.CompletedProcess:
            """KubeRay and the kubelet: run the job with the pod's environment."""
            job = wait_for(lambda: api.rayjob(name), f"the RayJob {name}")
            api.set_rayjob_status(name, jobDeploymentStatus="Running", jobStatus="RUNNING")
            env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
            ref, pin = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][-2:]
            assert ref["name"] == API_KEY_ENV and pin == {"name": API_KEY_ENV + "_ENDPOINTS", "value": "http://127.0.0.1:1/v1"}
            sel = ref["valueFrom"]["secretKeyRef"]
            value = base64.b64decode(core.read_namespaced_secret(sel["name"], namespace).data[sel["key"]]).decode()
            assert value == key
            env = {**os.environ, **env_vars, API_KEY_ENV: value, pin["name"]: pin["value"], "RAY_JOB_SUBMISSION_ID": name,
                   "OPENAI_LOG": "debug"}
            env.pop("RAY_ADDRESS", None)
            ran = subprocess.run([sys.executable, "-c", JOB, job["spec"]["entrypoint"], str(tmp_path / "scratch")],
                                 env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
            logs.append(ran.stdout + ran.stderr)
            return ran

        first = play(a1)
        assert first.returncode != 0 and "APIConnectionError" in first.stderr, first.stderr[-3000:]
        # KubeRay reports a failed job with the tail of its logs in the RayJob's status message.
        api.set_rayjob_status(a1, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed",
                              message="Job entrypoint command failed with exit code 1, last available logs "
                                      "(truncated to 20,000 chars):\n" + first.stderr[-20_000:])
        wait_for(lambda: any(j["state"] == "Failed" for j in api.status("keyed").get("jobs", [])), "attempt 1 Failed")
        second = play(a2)
        assert second.returncode == 0 and "job committed" in second.stdout, second.stderr[-3000:]
        api.set_rayjob_status(a2, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
        wait_for(lambda: api.status("keyed").get("phase") == "Succeeded", "phase Succeeded")
        wait_for(lambda: "RunSucceeded" in api.event_reasons("keyed"), "the RunSucceeded event")
        assert "APIConnectionError" in api.status("keyed")["jobs"][0]["message"]  # the log tail did travel
        metrics = op.metrics()
    finally:
        op.stop()

    # The scanner finds the key where it does belong (positive control).
    control = SecretScanner(key)
    planted = core.read_namespaced_secret("teacher-key", namespace).data
    assert control.scan("the Secret itself", json.dumps(planted)) == 1

    scanner = SecretScanner(key)
    sanitize = control_plane.api.sanitize_for_serialization
    scanner.scan("AugmentationRun", json.dumps(api.run("keyed")))
    events = core.list_namespaced_event(namespace).items
    scanner.scan("Events", json.dumps(sanitize(events)))
    scanner.scan("operator log (stdout+stderr, --verbose)", op.log_path.read_bytes())
    scanner.scan("operator /metrics", metrics)
    rayjobs = api.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs")["items"]
    assert sorted(j["metadata"]["name"] for j in rayjobs) == sorted([a1, a2])
    for rj in rayjobs:
        text = json.dumps(rj)
        assert "secretKeyRef" in text
        scanner.scan(f"RayJob {rj['metadata']['name']}", text)
    for i, text in enumerate(logs, 1):
        scanner.scan(f"job attempt {i} stdout+stderr (DEBUG)", text)
    root = out / "keyed"
    files = _scan_storage(scanner, root)
    assert (root / "iter-0" / "_ITERATION.json").exists() and (root / "data" / "seed.parquet").exists()
    assert (root / "run.json").exists()
    with capsys.disabled():
        print(f"\nsecret scan: {len(scanner.scanned)} sources, {sum(scanner.scanned.values())} bytes, "
              f"{files} storage files, {len(events)} events: {len(scanner.leaks)} hit(s)")
    assert scanner.leaks == []


# --- RBAC ----------------------------------------------------------------------------------------

def _role(rbac, ns: str, name: str, user: str, verbs: list[str], resources=("augmentationruns",)) -> None:
    rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": [
        {"apiGroups": [GROUP], "resources": list(resources), "verbs": verbs}]})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})


def _status(fn) -> int:
    try:
        fn()
        return 200
    except ApiException as err:
        return err.status


def test_rbac_is_namespaced(control_plane, augrun_crd, namespace):  # noqa: F811
    mine, other = namespace, control_plane.new_namespace("rbac-other")
    for ns in (mine, other):
        Api(control_plane, ns).create_run(run_doc("r", "/tmp/out"))
    rbac = client.RbacAuthorizationV1Api(control_plane.api)
    _role(rbac, mine, "augrun-reader", "alice", ["get", "list", "watch"])

    alice = client.CustomObjectsApi(control_plane.impersonating("alice"))
    mallory = client.CustomObjectsApi(control_plane.impersonating("mallory"))  # no bindings at all
    alice_core = client.CoreV1Api(control_plane.impersonating("alice"))

    def ls(api, ns):
        return lambda: api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)

    def get(api, ns):
        return lambda: api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "r")

    # Her own namespace: yes.
    assert [i["metadata"]["name"] for i in ls(alice, mine)()["items"]] == ["r"]
    assert get(alice, mine)()["metadata"]["namespace"] == mine
    observed = {
        "alice list other ns": _status(ls(alice, other)),
        "alice get other ns": _status(get(alice, other)),
        "alice list all namespaces": _status(lambda: alice.list_cluster_custom_object(GROUP, VERSION, PLURAL)),
        "alice create (read-only role)": _status(lambda: alice.create_namespaced_custom_object(
            GROUP, VERSION, mine, PLURAL, run_doc("alices", "/tmp/out"))),
        "alice patch status": _status(lambda: alice.patch_namespaced_custom_object_status(
            GROUP, VERSION, mine, PLURAL, "r", {"status": {"phase": "Succeeded"}})),
        "alice read Secrets": _status(lambda: alice_core.list_namespaced_secret(mine)),
        "mallory list": _status(ls(mallory, mine)),
        "mallory get": _status(get(mallory, mine)),
        "mallory list other ns": _status(ls(mallory, other)),
    }
    assert observed == {k: 403 for k in observed}, observed


def test_a_run_cannot_borrow_a_secret_its_creator_cannot_read(control_plane, augrun_crd, namespace,  # noqa: F811
                                                               tmp_path):
    core = client.CoreV1Api(control_plane.api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "team-key"}, "stringData": {"token": "sk-team"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "pool"},
                                                  "data": {"rayClusterSpec": yaml.safe_dump(TEMPLATE)}})
    _role(client.RbacAuthorizationV1Api(control_plane.api), namespace, "augrun-editor", "bob",
          ["get", "list", "watch", "create"])
    bob = client.CustomObjectsApi(control_plane.impersonating("bob"))
    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(control_plane.impersonating("bob")).read_namespaced_secret("team-key", namespace)
    assert denied.value.status == 403

    op = start_operator(control_plane, tmp_path / "operator.log", namespace)
    try:
        bob.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, run_doc(
            "borrow", tmp_path / "out", teacher={"kind": "openai", "endpoint": "http://bob.example/v1",
                                                 "apiKeySecretRef": {"name": "team-key", "key": "token"}},
            ray={"launcher": "rayjob", "clusterTemplate": "pool"}))
        api = Api(control_plane, namespace)
        uid = api.run("borrow")["metadata"]["uid"]
        # Settled either way: a RayJob (the Secret was handed over) or Ready=False (refused).
        cond = wait_for(lambda: api.rayjob(job_name("borrow", uid, 0, 1))
                        or ((c := api.condition("borrow", "Ready")) and c["status"] == "False" and c),
                        "the operator's decision")
        jobs = api.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs")["items"]
        assert not any("team-key" in json.dumps(j) for j in jobs), "bob's run got team-key into its Ray pods"
        # Listed by the opt-in label only: to the operator an unlabelled Secret does not exist.
        assert cond["reason"] == "SecretNotFound" and "llm2llm.io/teacher-key=true" in cond["message"], cond
        # The Secret's owner opts in, pinning the endpoint the key may go to: bob's endpoint is still refused.
        core.patch_namespaced_secret("team-key", namespace, {"metadata": {
            "labels": {"llm2llm.io/teacher-key": "true"},
            "annotations": {"llm2llm.io/allowed-endpoints": "https://api.openai.com/"}}})
        wait_for(lambda: (c := api.condition("borrow", "Ready")) and c["reason"] == "EndpointNotAllowed",
                 "EndpointNotAllowed once the Secret is opted in for another endpoint")
        assert api.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs")["items"] == []
    finally:
        op.stop()
