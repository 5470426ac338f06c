"""The product on a real Kubernetes node, as a user runs it: the chart installs the operator as a pod,
`kubectl apply` of examples/cluster/run.yaml (its data and output on a real S3 server, tracked in an MLflow
pod), KubeRay starts a head and two worker pods per iteration, the iteration trains with DeepSpeed across the
worker pods, infers, teaches and commits, and the run ends Succeeded, through a worker pod, the head pod and
the operator pod deleted on the way (tests/e2e/node_scenario.py). The head pod, where the driver runs, has no
usable model cache: nothing the workers read may be made or resolved on the driver's side. Then `kubectl
delete augrun` removes its RayJobs, RayClusters and data, and `node.py down` must leave nothing behind.

Needs root, the node's Debian packages (scripts/node-prereqs.sh), the binaries of tests/cluster/build.sh
and the images of `make images`.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import node_mod
from tests.e2e.node_scenario import BUCKET, MLFLOW_NS, OPERATOR_NS, RUN_NS, Scenario, cluster_run
from tests.e2e.node_scenario import wait as _wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]


def test_a_pod_runs_and_reaches_services_by_name(node):
    """The node's basics: a pod starts from a locally imported image, cluster DNS resolves a Service, and
    the Service's ClusterIP reaches the API server from inside the pod."""
    ns = f"smoke-{secrets.token_hex(3)}"  # its own: a namespace of an earlier session may still be terminating
    node.kubectl("create", "namespace", ns)
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": ns},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "probe", "image": "llm2llm/operator:dev", "imagePullPolicy": "Never",
            "command": ["python", "-c",
                        "import socket, ssl, urllib.request;"
                        "ip = socket.gethostbyname('kubernetes.default.svc.cluster.local');"
                        "ctx = ssl.create_default_context(cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt');"
                        "code = urllib.request.urlopen('https://kubernetes.default.svc/readyz', context=ctx).status;"
                        "print('resolved', ip, 'readyz', code)"]}]},
    }
    node.kubectl("apply", "-f", "-", input=json.dumps(pod))
    phase = _wait(lambda: node.kubectl("get", "pod", "probe", "-n", ns, "-o", "jsonpath={.status.phase}")
                  .stdout.strip() in ("Succeeded", "Failed") and
                  node.kubectl("get", "pod", "probe", "-n", ns, "-o", "jsonpath={.status.phase}").stdout.strip(),
                  "the probe pod to finish", 180,
                  on_timeout=lambda: node.kubectl("describe", "pod", "probe", "-n", ns, check=False).stdout)
    logs = node.kubectl("logs", "probe", "-n", ns).stdout
    assert phase == "Succeeded", logs
    assert re.search(r"resolved 10\.96\.0\.1 readyz 200", logs), logs
    node.kubectl("delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def demo(node, tmp_path_factory):
    """The whole cluster scenario once (tests/e2e/node_scenario.py): the demo on S3 with MLflow tracking, three
    faults on the way, then `kubectl delete augrun`. The tests below check what it saw."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("node-s3"), host=node_mod.NODE_IP)
    endpoint = server.start(bucket=BUCKET)
    scenario = Scenario(node, endpoint, tmp_path_factory.mktemp("scenario"))
    try:
        scenario.run()
        assert scenario.status.get("phase") == "Succeeded", \
            f"{json.dumps(scenario.status, indent=1)[-3000:]}\n{scenario.diagnostics()}"
        print(f"\ndemo in pods (S3, MLflow, 3 faults): {len(scenario.status['iterations'])} iteration(s) in "
              f"{scenario.elapsed:.0f}s; faults: " + ", ".join(
                  f"{f.name} pod at {f.at:.0f}s (past its stage {f.recovered_after:.0f}s later)"
                  for f in scenario.faults.values() if f.recovered_after is not None))
        yield scenario
    except BaseException:
        print(scenario.diagnostics())
        raise
    finally:
        try:
            # Every run goes through the operator's finalizer while the operator still runs (after the uninstall
            # nothing would remove it, and the namespace would stay Terminating).
            scenario.kubectl("delete", "augrun", "--all", "-n", RUN_NS, "--wait=true", "--timeout=180s", check=False)
            node.helm("uninstall", "llm2llm", "-n", OPERATOR_NS, check=False)
            for ns in (RUN_NS, MLFLOW_NS):
                node.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        finally:
            server.stop()


def test_demo_succeeds_in_pods_with_per_iteration_figures_and_events(demo):
    st = demo.status
    its = st["iterations"]
    assert len(its) == 2 and all(it["job"] for it in its)
    assert all(it.get("seedAccuracy") is not None and it.get("seconds", {}).get("train") for it in its)
    header, row = [re.split(r"\s{2,}", line.strip()) for line in demo.augruns_table.strip().splitlines()][:2]
    assert header[:6] == ["NAME", "PHASE", "ITERATION", "SEED-ACC", "TEST-ACC", "AUGMENTED"]
    assert row[0] == "demo" and row[1] == "Succeeded" and len(row) >= 7, row
    for reason in ("IterationStarted", "JobFailed", "Retrying", "IterationSucceeded", "RunSucceeded"):
        assert reason in demo.described, (reason, demo.described[-2500:])
    # Argo CD's verdict (health.lua in Argo CD's own Lua) on every status the run showed, faults and retries
    # included: Progressing while Pending or Running, Healthy once Succeeded, never Degraded.
    demo.argocd.check_succeeded_run()


def test_training_ran_on_two_worker_pods_never_on_the_head(demo):
    fs = demo.fs()
    for i in range(len(demo.status["iterations"])):
        done = json.loads(fs.cat_file(f"{BUCKET}/runs/demo/iter-{i}/train/_DONE.json"))
        hosts = set(done["worker_hosts"])
        assert len(hosts) >= 2 and hosts <= demo.worker_pods, (hosts, demo.worker_pods)
        print(f"iteration {i}: training workers on {sorted(hosts)}")


def test_teacher_replies_are_json_of_the_tasks_schema(demo):
    import pyarrow.parquet as pq

    run = next(d for d in cluster_run(demo.s3.url) if d["kind"] == "AugmentationRun")
    max_tokens = run["spec"]["teacher"]["maxTokens"]
    fs = demo.fs()
    for i, it in enumerate(demo.status["iterations"]):
        if not it.get("generated"):
            continue
        assert it["teacherReplyFormat"] == "json" and it["rejected"].get("bad_format", 0) == 0, it
        with fs.open(f"{BUCKET}/runs/demo/iter-{i}/filter/rejected.parquet", "rb") as f:
            rejected = pq.read_table(f).to_pylist()
        assert all(r["completion_tokens"] == max_tokens for r in rejected if r["reason"] == "unparseable"), rejected


def test_worker_and_head_faults_resume_from_the_last_committed_stage(demo):
    """A worker pod killed while Ray Train workers run on it, then the head pod (the driver) while the teach
    stage runs: each fails its attempt, and the retry redoes no committed stage; no row is lost or doubled."""
    import pyarrow.parquet as pq

    jobs = demo.status["jobs"]
    print("iteration 0's attempts: " + "; ".join(f"a{j['attempt']} {j['state']}: {j.get('message', '')[:160]}"
                                                 for j in jobs if j["iteration"] == 0))
    fs = demo.fs()
    final = {s: json.loads(fs.cat_file(f"{BUCKET}/runs/demo/iter-0/{s}/_DONE.json"))
             for s in ("prepare", "train", "infer", "score", "teach", "filter", "merge")}
    for fault in (demo.faults["worker"], demo.faults["head"]):
        assert fault.recovered_after is not None, fault.name
        # The attempt it hit did not commit the iteration: a retry (a new attempt) followed.
        hit = jobs[fault.jobs_before - 1]
        assert hit["state"] == "Failed" and len(jobs) > fault.jobs_before, (fault.name, jobs)
        assert fault.markers_at_retry is not None, fault.name
        for stage, marker in fault.markers_at_retry.items():  # committed before the retry: kept, not redone
            assert final[stage] == marker, (fault.name, stage, marker, final[stage])
        redone = [s for s in final if s not in fault.markers_at_retry]
        assert all(final[s]["attempt"] > hit["attempt"] for s in redone), (fault.name, redone, final)
        print(f"{fault.name} fault: attempt {hit['attempt']} failed; the retry kept "
              f"{sorted(fault.markers_at_retry)} and ran {redone}")

    def table(path):
        with fs.open(f"{BUCKET}/runs/demo/{path}", "rb") as f:
            return pq.read_table(f)
    seed, kept, merged = table("data/seed.parquet"), table("iter-0/filter/kept.parquet"), table("iter-0/merge/train.parquet")
    ids = merged.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == seed.num_rows + kept.num_rows  # nothing lost, nothing twice
    assert set(seed.column("id").to_pylist()) | set(kept.column("id").to_pylist()) == set(ids)
    generated = table("iter-0/teach/generated.parquet").column("id").to_pylist()
    assert len(generated) == len(set(generated))  # a teach shard redone after the head fault did not add twice


def test_one_rayjob_per_iteration_and_attempt_across_an_operator_restart(demo):
    op = demo.faults["operator"]
    assert len(set(demo.operator_pods)) >= 2 and op.target in demo.operator_pods
    seen = [(int(j["metadata"]["labels"]["llm2llm.io/iteration"]), int(j["metadata"]["labels"]["llm2llm.io/attempt"]))
            for j in demo.rayjobs]
    assert len(seen) == len(set(seen)), seen
    assert sorted(j["metadata"]["name"] for j in demo.rayjobs) == sorted(j["name"] for j in demo.status["jobs"])
    # Each RayJob was run by the real KubeRay; the last attempt of each iteration succeeded.
    by_name = {j["metadata"]["name"]: j for j in demo.rayjobs}
    for it in demo.status["iterations"]:
        assert by_name[it["job"]]["status"]["jobStatus"] == "SUCCEEDED", by_name[it["job"]]["status"]


def test_object_storage_holds_one_copy_of_each_file(demo):
    rel = [k.split("/runs/demo/", 1)[1] for k in demo.keys]
    assert "run.json" in rel and "data/seed.parquet" in rel
    for i in range(len(demo.status["iterations"])):
        train = [k for k in rel if k.startswith(f"iter-{i}/train/")]
        models = {k.split("/")[2] for k in train if k.split("/")[2].startswith("model")}
        done = json.loads(demo.fs().cat_file(f"{BUCKET}/runs/demo/iter-{i}/train/_DONE.json"))
        assert models == {done["model_dir"]}, train  # one model folder: the committing attempt's
        assert not [k for k in train if "/model" in k and k.count("/model") > 1], train  # never nested
        assert not [k for k in train if "/_ray-a" in k], train  # Ray Train's records removed
    assert not [k for k in rel if ".tmp" in k]


def test_mlflow_has_one_parent_run_and_one_nested_run_per_iteration(demo):
    runs = demo.mlflow_runs()
    parents = [r for r in runs if r.data.tags.get("llm2llm.io/kind") == "run"]
    children = [r for r in runs if r.data.tags.get("llm2llm.io/kind") == "iteration"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("llm2llm.io/namespace") == RUN_NS
    assert sorted(int(r.data.tags["llm2llm.io/iteration"]) for r in children) == list(range(len(demo.status["iterations"])))
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    assert "seed_accuracy" in parent.data.metrics and parent.data.params.get("student.model") == "smollm2-135m"
    assert demo.status["mlflowRunUrl"].endswith(parent.info.run_id), demo.status["mlflowRunUrl"]
    assert demo.mlflow_password not in json.dumps(demo.status)


def test_deleting_the_run_removes_its_rayjobs_clusters_and_data(demo):
    demo.delete()
    print(f"kubectl delete augrun: RayJobs, RayClusters and data gone in {demo.deleted_after:.0f}s")
    assert demo.leftovers == {"rayjobs": [], "rayclusters": [], "objects": []}


def test_a_shared_raycluster_keeps_the_runs_engines_and_trainers_warm(demo):
    """The rayjob launcher on a shared RayCluster (clusterSelector): each iteration is its own RayJob, and the
    run's warm training workers and vLLM engine, started by iteration 0's job, serve iteration 1's too; once the
    run ends they are gone and the cluster is still up for the next run."""
    from ray.util.state import list_actors

    docs = cluster_run(demo.s3.url)
    template = next(d for d in docs if d["kind"] == "ConfigMap")
    run = next(d for d in docs if d["kind"] == "AugmentationRun")
    cluster = yaml.safe_load(template["data"]["rayClusterSpec"])
    demo.apply([{"apiVersion": "ray.io/v1", "kind": "RayCluster",
                 "metadata": {"name": "shared-cpu", "labels": {"ray.io/cluster": "shared-cpu"}}, "spec": cluster}],
               ns=RUN_NS)
    run["metadata"]["name"] = "warm"
    run["spec"]["ray"] = {"launcher": "rayjob", "clusterSelector": {"ray.io/cluster": "shared-cpu"},
                          "image": "llm2llm/job-cpu:dev"}
    run["spec"]["loop"] = {"maxIterations": 2, "stopWhen": {"noFailures": False}}
    run["spec"].pop("tracking", None)
    demo.apply([run], ns=RUN_NS)
    try:
        st = _wait(lambda: (s := demo.get_json("augrun", "warm", "-n", RUN_NS).get("status", {})).get("phase")
                   in ("Succeeded", "Failed") and s, "the run on the shared cluster", 1500, every=5,
                   on_timeout=demo.diagnostics)
        assert st["phase"] == "Succeeded" and len(st["iterations"]) == 2, json.dumps(st)[-2000:]
        assert len({it["job"] for it in st["iterations"]}) == 2  # one RayJob per iteration, on one cluster
        fs = demo.fs()
        marker = lambda i, stage: json.loads(fs.cat_file(f"{BUCKET}/runs/warm/iter-{i}/{stage}/_DONE.json"))
        trainers = [marker(i, "train")["trainers"] for i in range(2)]
        engines = [marker(i, "infer")["engines"] for i in range(2)]
        assert [t["reused"] for t in trainers[0]] == [False, False] and all(t["reused"] for t in trainers[1])
        assert [t["pid"] for t in trainers[0]] == [t["pid"] for t in trainers[1]]
        assert len({t["node"] for t in trainers[0]}) == 2  # a rank per worker pod
        assert engines[1][0]["reused"] and engines[1][0]["pid"] == engines[0][0]["pid"]
        print(f"\nshared cluster: train {marker(0, 'train')['seconds']:.0f}s then {marker(1, 'train')['seconds']:.0f}s, "
              f"infer {marker(0, 'infer')['seconds']:.0f}s then {marker(1, 'infer')['seconds']:.0f}s")
        head = demo.pods("ray.io/cluster=shared-cpu,ray.io/node-type=head")[0]
        alive = list_actors(address=f"http://{head['status']['podIP']}:8265", filters=[("state", "=", "ALIVE")],
                            limit=1000)
        uid = demo.get_json("augrun", "warm", "-n", RUN_NS)["metadata"]["uid"]
        assert not [a.name for a in alive if a.name and uid in a.name], alive  # gone with the run
        assert head["status"]["phase"] == "Running"  # the shared cluster stays
    finally:
        demo.kubectl("delete", "augrun", "warm", "-n", RUN_NS, "--wait=false", check=False)
        demo.kubectl("delete", "raycluster", "shared-cpu", "-n", RUN_NS, "--wait=false", check=False)


def test_down_leaves_no_process_rule_bridge_or_mount(node):
    if node.owned is None:
        pytest.skip("the node was up before the session (make cluster): not ours to take down")
    before_rules = json.loads((node.owned.workdir / "iptables.before.json").read_text())
    node.owned.stop()
    assert node_mod.node_processes() == []
    assert node_mod.node_mounts(node.owned.workdir) == []
    assert not node_mod.bridge_exists()
    assert node_mod.iptables_rules() == before_rules
    assert not node_mod.STATE_DIR.exists()
    assert not Path(f"/var/lib/cni/networks/{node_mod.CNI_NETWORK}").exists()
