"""The product on a real Kubernetes node, as a user runs it: the chart installs the operator as a pod,
`kubectl apply -f examples/cluster/run.yaml`, KubeRay starts a head and two worker pods per iteration, the
iteration trains with DeepSpeed across the worker pods, infers, teaches and commits, and the run ends
Succeeded. The head pod, where the driver runs, has no usable model cache: nothing the workers read may be
made or resolved on the driver's side. Then `node.py down` must leave nothing behind.

Needs root, the node's Debian packages (scripts/node-prereqs.sh), the binaries of tests/cluster/build.sh
and the images of `make images`.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.argocd.health import RunHealthLog
from tests.e2e.conftest import REPO, node_mod

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]

RUN_YAML = REPO / "examples" / "cluster" / "run.yaml"
VALUES = REPO / "examples" / "cluster" / "values-node.yaml"
OPERATOR_NS = "llm2llm-system"


def _wait(fn, what: str, timeout: float, every: float = 2.0, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def test_a_pod_runs_and_reaches_services_by_name(node):
    """The node's basics: a pod starts from a locally imported image, cluster DNS resolves a Service, and
    the Service's ClusterIP reaches the API server from inside the pod."""
    ns = "smoke"
    node.kubectl("create", "namespace", ns, check=False)
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


def _driver_without_models(tmp_path: Path) -> Path:
    """examples/cluster/run.yaml with the head pod's model cache made unusable (a path under /dev/null cannot
    be created). The head runs the driver, which must resolve no model and build nothing a worker reads: the
    worker pods resolve models themselves and read only what the shared volume or Ray's object store holds
    (the head's /tmp is its own, as every pod's is)."""
    docs = [d for d in yaml.safe_load_all(RUN_YAML.read_text()) if d]
    template = next(d for d in docs if d["kind"] == "ConfigMap")
    cluster = yaml.safe_load(template["data"]["rayClusterSpec"])
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    head.setdefault("env", []).append({"name": "LLM2LLM_CACHE", "value": "/dev/null/llm2llm-cache"})
    template["data"]["rayClusterSpec"] = yaml.safe_dump(cluster, sort_keys=False)
    out = tmp_path / "run.yaml"
    out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


def test_demo_runs_in_pods_through_the_chart_and_kuberay(node, tmp_path):
    # The demo data on the node's shared volume (what `make cluster` puts there), and no earlier run's output.
    shared = node_mod.SHARED_DIR
    (shared / "examples" / "demo").mkdir(parents=True, exist_ok=True)
    for f in ("seed.jsonl", "test.jsonl"):
        shutil.copy(REPO / "examples" / "demo" / f, shared / "examples" / "demo" / f)
    shutil.rmtree(shared / "runs" / "demo", ignore_errors=True)
    node_mod.own_shared()

    node.helm("upgrade", "--install", "llm2llm", str(REPO / "charts" / "llm2llm-operator"), "-n", OPERATOR_NS,
              "--create-namespace", "-f", str(VALUES), "--wait", "--timeout", "180s")
    deploy = yaml.safe_load(node.kubectl("get", "deploy", "-n", OPERATOR_NS, "-o", "yaml").stdout)["items"][0]
    pod_spec = deploy["spec"]["template"]["spec"]
    # The operator runs as a pod under the chart's ServiceAccount: its only credentials.
    assert pod_spec["serviceAccountName"] == deploy["metadata"]["name"]

    ns = "demo-pods"
    node.kubectl("create", "namespace", ns, check=False)
    started = time.monotonic()
    node.kubectl("apply", "-n", ns, "-f", str(_driver_without_models(tmp_path)))

    worker_pods: set[str] = set()
    argocd = RunHealthLog()  # the run at each status seen, for Argo CD's health check

    def status():
        # Remember every Ray worker pod KubeRay started (clusters are deleted when their job ends).
        names = node.kubectl("get", "pods", "-n", ns, "-l", "ray.io/node-type=worker", "-o",
                             "jsonpath={.items[*].metadata.name}", check=False).stdout.split()
        worker_pods.update(names)
        out = node.kubectl("get", "augrun", "demo", "-n", ns, "-o", "json", check=False)
        run_obj = json.loads(out.stdout) if out.returncode == 0 else {}
        argocd.see(run_obj)
        st = run_obj.get("status", {})
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    def diagnostics() -> str:
        return "\n".join([
            node.kubectl("get", "augrun,rayjob,raycluster,pods", "-n", ns, "-o", "wide", check=False).stdout,
            node.kubectl("describe", "augrun", "demo", "-n", ns, check=False).stdout[-3000:],
            node.kubectl("logs", "-n", OPERATOR_NS, "deploy/llm2llm-llm2llm-operator", "--tail=60",
                         check=False).stdout,
        ])

    st = _wait(status, "the demo run to finish in pods", 2400, every=5, on_timeout=diagnostics)
    elapsed = time.monotonic() - started
    assert st["phase"] == "Succeeded", f"{json.dumps(st, indent=1)[-3000:]}\n{diagnostics()}"
    print(f"\ndemo in pods: {len(st['iterations'])} iteration(s) in {elapsed:.0f}s")
    # Argo CD's verdict (charts/llm2llm-operator/health.lua in Argo CD's Lua) on every status the run showed:
    # Progressing while Pending or Running, Healthy once Succeeded, never Degraded.
    argocd.check_succeeded_run()
    print(f"Argo CD health: {len(argocd.objects)} statuses, phases {sorted(set(map(str, argocd.phases())))}")

    its = st["iterations"]
    assert len(its) >= 1 and all(it["job"] for it in its)
    assert len({it["job"] for it in its}) == len(its)  # one RayJob per iteration
    # Each RayJob was run by the real KubeRay: it made the cluster, ran the job, recorded the outcome. (The
    # run is Succeeded once the last iteration is committed in storage; its Ray job may still be exiting.)
    for it in its:
        def rayjob_status(name=it["job"]):
            st = json.loads(node.kubectl("get", "rayjob", name, "-n", ns, "-o", "json").stdout)["status"]
            return st if st.get("jobDeploymentStatus") in ("Complete", "Failed") else None

        rj = _wait(rayjob_status, f"RayJob {it['job']} to complete", 180)
        assert rj["jobDeploymentStatus"] == "Complete" and rj["jobStatus"] == "SUCCEEDED", rj

    # Training ran on two distinct worker pods in every iteration, never on the head.
    for i in range(len(its)):
        done = json.loads((shared / "runs" / "demo" / f"iter-{i}" / "train" / "_DONE.json").read_text())
        hosts = set(done["worker_hosts"])
        assert len(hosts) >= 2, done
        assert hosts <= worker_pods, (hosts, worker_pods)
        print(f"iteration {i}: training workers on {sorted(hosts)}")

    # The vLLM teacher in the job image replies in JSON that the task's schema shapes: no reply has a label
    # outside task.labels, and none is unparseable unless teacher.maxTokens cut it off.
    run = next(d for d in yaml.safe_load_all(RUN_YAML.read_text()) if d and d["kind"] == "AugmentationRun")
    max_tokens = run["spec"]["teacher"]["maxTokens"]
    for i, it in enumerate(its):
        if not it.get("generated"):
            continue
        assert it["teacherReplyFormat"] == "json" and it["rejected"].get("bad_format", 0) == 0, it
        rejected = pq.read_table(shared / "runs" / "demo" / f"iter-{i}" / "filter" / "rejected.parquet").to_pylist()
        assert all(r["completion_tokens"] == max_tokens for r in rejected if r["reason"] == "unparseable"), rejected

    header, row = [re.split(r"\s{2,}", line.strip()) for line in
                   node.kubectl("get", "augruns", "-n", ns).stdout.strip().splitlines()][:2]
    assert header[:6] == ["NAME", "PHASE", "ITERATION", "SEED-ACC", "TEST-ACC", "AUGMENTED"]
    assert row[0] == "demo" and row[1] == "Succeeded" and len(row) >= 7, row
    described = node.kubectl("describe", "augrun", "demo", "-n", ns).stdout
    assert "IterationSucceeded" in described and "RunSucceeded" in described, described[-2000:]

    node.kubectl("delete", "namespace", ns, "--wait=false")
    node.helm("uninstall", "llm2llm", "-n", OPERATOR_NS, check=False)


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
