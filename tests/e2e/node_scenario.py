"""The demo in pods as a cluster user runs it, with the faults a cluster has (tests/e2e/test_node.py).

``Scenario.run()`` does it all once and keeps what it saw; the tests read it. On the real node of
tests/cluster/node.py:

- storage: the run's data and output in object storage, a real S3 server (versitygw, tests/s3server.py) on the
  node's bridge address; the operator and the Ray pods get its credentials from Secrets;
- tracking: an MLflow server with basic auth as a pod (the image of tests/cluster/mlflow/Dockerfile); the run
  names it in spec.tracking.mlflow, with credentials from an opted-in, pinned Secret;
- the operator from the chart, as a pod; the run from examples/cluster/run.yaml, with the head pod's model cache
  unusable (nothing a worker reads may come from the driver);
- faults, each once: a worker pod deleted while Ray Train workers run on it, the head pod deleted while the teach
  stage runs, the operator pod deleted while iteration 1 runs; then `kubectl delete augrun` with deleteData.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.argocd.health import RunHealthLog
from tests.e2e.conftest import REPO, node_mod

RUN_YAML = REPO / "examples" / "cluster" / "run.yaml"
VALUES = REPO / "examples" / "cluster" / "values-node.yaml"
OPERATOR_NS = "llm2llm-system"
RUN_NS = "demo-pods"
MLFLOW_NS = "mlflow"
MLFLOW_URI = f"http://mlflow.{MLFLOW_NS}.svc.cluster.local:5000"
BUCKET = "llm2llm-node"
EXPERIMENT = "llm2llm-node"


def wait(fn: Callable[[], Any], what: str, timeout: float, every: float = 2.0, on_timeout=lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def _secret(name: str, ns: str, data: dict[str, str], labels=None, annotations=None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data}


def _aws_env(secret: str, endpoint: str) -> list[dict[str, Any]]:
    """What a pod needs to use the S3 server: the key pair by reference, the endpoint by value."""
    return [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "AWS_SECRET_ACCESS_KEY",
             "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_SECRET_ACCESS_KEY"}}},
            {"name": "AWS_ENDPOINT_URL", "value": endpoint}, {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}]


def mlflow_manifests(user: str, password: str) -> list[dict[str, Any]]:
    ini = ("[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:////data/basic_auth.db\n"
           f"admin_username = {user}\nadmin_password = {password}\n"
           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    labels = {"app": "mlflow"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MLFLOW_NS}},
        _secret("mlflow-auth", MLFLOW_NS, {"basic_auth.ini": ini, "flask-secret": secrets.token_hex(16)}),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mlflow", "namespace": MLFLOW_NS},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"containers": [{
                 "name": "mlflow", "image": "llm2llm/mlflow:dev", "imagePullPolicy": "Never",
                 # Host header check: the Service's DNS name (the operator) and ClusterIPs (this test, on the node).
                 "args": ["--app-name", "basic-auth", "--allowed-hosts", "mlflow.mlflow.svc.cluster.local:5000,10.*"],
                 "env": [{"name": "MLFLOW_AUTH_CONFIG_PATH", "value": "/config/basic_auth.ini"},
                         {"name": "MLFLOW_FLASK_SERVER_SECRET_KEY",
                          "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "flask-secret"}}}],
                 "ports": [{"containerPort": 5000}],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": 5000}, "periodSeconds": 2},
                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1536Mi"}},
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "auth", "mountPath": "/config"}]}],
                 "volumes": [{"name": "data", "emptyDir": {}},
                             {"name": "auth", "secret": {"secretName": "mlflow-auth",
                                                         "items": [{"key": "basic_auth.ini", "path": "basic_auth.ini"}]}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mlflow", "namespace": MLFLOW_NS},
         "spec": {"selector": labels, "ports": [{"port": 5000, "targetPort": 5000}]}},
    ]


# The head fault's window: the driver holds on right before the teach stage's commit marker (its shards are
# committed already), and goes on by itself after this long in an attempt the test does not kill.
PAUSE = [{"name": "LLM2LLM_PAUSE_BEFORE_MARKER", "value": "teach"}, {"name": "LLM2LLM_PAUSE_SECONDS", "value": "120"}]


def cluster_run(s3_endpoint: str, pause: bool = False) -> list[dict[str, Any]]:
    """examples/cluster/run.yaml on object storage, tracked in MLflow, with room for the faults' retries;
    ``pause``: the head holds on before the teach marker (PAUSE)."""
    docs = [d for d in yaml.safe_load_all(RUN_YAML.read_text()) if d]
    template = next(d for d in docs if d["kind"] == "ConfigMap")
    cluster = yaml.safe_load(template["data"]["rayClusterSpec"])
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        container.setdefault("env", []).extend(_aws_env("s3-credentials", s3_endpoint))
    # The driver runs on the head: it must resolve no model and build nothing a worker reads (a path under
    # /dev/null cannot be created, so any attempt fails loudly).
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "LLM2LLM_CACHE", "value": "/dev/null/llm2llm-cache"})
    if pause:
        cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].extend(PAUSE)
    template["data"]["rayClusterSpec"] = yaml.safe_dump(cluster, sort_keys=False)
    run = next(d for d in docs if d["kind"] == "AugmentationRun")
    run["spec"]["data"].update(seed=f"s3://{BUCKET}/examples/demo/seed.jsonl",
                               test=f"s3://{BUCKET}/examples/demo/test.jsonl")
    run["spec"].update(output=f"s3://{BUCKET}/runs", deleteData=True, retry={"maxAttempts": 4, "backoffSeconds": 5},
                       tracking={"mlflow": {"trackingUri": MLFLOW_URI, "experiment": EXPERIMENT,
                                            "credentialsSecretRef": {"name": "mlflow-credentials",
                                                                     "key": "credentials"}}})
    return docs


@dataclass
class Fault:
    name: str
    target: str = ""  # the pod deleted
    at: float = 0.0  # seconds since apply
    status_before: dict[str, Any] = field(default_factory=dict)
    markers_before: dict[str, dict[str, Any]] = field(default_factory=dict)  # committed stages at that moment
    # The committed stages when the run launched its next job after the fault (a retry resumes from these).
    markers_at_retry: dict[str, dict[str, Any]] | None = None
    jobs_before: int = 0  # jobs the run had launched when the fault hit
    recovered_after: float | None = None  # seconds until the run moved past the fault's stage


@dataclass
class Scenario:
    node: Any
    s3: Any  # tests.s3server.S3Endpoint, reachable from pods
    workdir: Path
    status: dict[str, Any] = field(default_factory=dict)
    uid: str = ""
    elapsed: float = 0.0
    faults: dict[str, Fault] = field(default_factory=dict)
    worker_pods: set[str] = field(default_factory=set)
    rayjobs: list[dict[str, Any]] = field(default_factory=list)  # at the end, before the run is deleted
    keys: list[str] = field(default_factory=list)  # the run's objects in S3 at the end
    argocd: RunHealthLog = field(default_factory=RunHealthLog)
    operator_pods: list[str] = field(default_factory=list)
    mlflow_user: str = "llm2llm-admin"
    mlflow_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    mlflow_ip: str = ""
    described: str = ""
    augruns_table: str = ""
    deleted_after: float | None = None  # seconds from `kubectl delete augrun` to no RayJob/RayCluster/data left
    leftovers: dict[str, Any] = field(default_factory=dict)

    # --- small helpers -------------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, **kw):
        return self.node.kubectl(*args, check=check, **kw)

    def apply(self, docs: list[dict[str, Any]], ns: str | None = None) -> None:
        self.kubectl("apply", *(["-n", ns] if ns else []), "-f", "-", input=yaml.safe_dump_all(docs))

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.s3.access_key, secret=self.s3.secret_key, endpoint_url=self.s3.url,
                                 skip_instance_cache=True)

    def get_json(self, *args: str) -> dict[str, Any]:
        out = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return self.get_json("pods", "-n", RUN_NS, "-l", selector).get("items", [])

    def run_obj(self) -> dict[str, Any]:
        return self.get_json("augrun", "demo", "-n", RUN_NS)

    def markers(self) -> dict[str, dict[str, Any]]:
        """The committed stage markers of the iteration in flight."""
        fs = self.fs()
        n = len(self.status.get("iterations", []))
        out = {}
        for path in fs.glob(f"{BUCKET}/runs/demo/iter-{n}/*/_DONE.json"):
            out[path.split("/")[-2]] = json.loads(fs.cat_file(path))
        return out

    def diagnostics(self) -> str:
        return "\n".join([
            self.kubectl("get", "augrun,rayjob,raycluster,pods", "-n", RUN_NS, "-o", "wide", check=False).stdout,
            self.kubectl("describe", "augrun", "demo", "-n", RUN_NS, check=False).stdout[-3000:],
            self.kubectl("logs", "-n", OPERATOR_NS, "deploy/llm2llm-llm2llm-operator", "--tail=80", check=False).stdout,
        ])

    # --- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        # An earlier session's namespaces may still be terminating: apply would be refused in them. A run whose
        # operator went before it (a session cut short) keeps its finalizer: nobody is left to handle it.
        for ns in (RUN_NS, MLFLOW_NS, OPERATOR_NS):
            if self.get_json("namespace", ns).get("metadata", {}).get("deletionTimestamp"):
                for run in self.get_json("augruns", "-n", ns).get("items", []):
                    self.kubectl("patch", "augrun", run["metadata"]["name"], "-n", ns, "--type=merge",
                                 "-p", '{"metadata":{"finalizers":[]}}', check=False)
            wait(lambda ns=ns: not self.get_json("namespace", ns).get("metadata", {}).get("deletionTimestamp"),
                 f"namespace {ns} to finish terminating", 300, every=3)
        fs = self.fs()
        for f in ("seed.jsonl", "test.jsonl"):
            fs.pipe_file(f"{BUCKET}/examples/demo/{f}", (REPO / "examples" / "demo" / f).read_bytes())
        if fs.exists(f"{BUCKET}/runs/demo"):
            fs.rm(f"{BUCKET}/runs/demo", recursive=True)
        self.apply(mlflow_manifests(self.mlflow_user, self.mlflow_password))
        keys = {"AWS_ACCESS_KEY_ID": self.s3.access_key, "AWS_SECRET_ACCESS_KEY": self.s3.secret_key}
        self.apply([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RUN_NS}},
            _secret("s3-credentials", OPERATOR_NS, keys),
            _secret("s3-credentials", RUN_NS, keys),
            # Opted in for MLflow, and pinned to the tracking server: the operator sends it nowhere else.
            _secret("mlflow-credentials", RUN_NS, {"credentials": f"{self.mlflow_user}:{self.mlflow_password}"},
                    labels={"llm2llm.io/mlflow-credentials": "true"},
                    annotations={"llm2llm.io/allowed-endpoints": MLFLOW_URI}),
        ])
        # Helm installs a chart's CRDs once and never upgrades them: a node kept from an earlier session may have
        # an older CRD. Users upgrade it the same way (docs/install.md).
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                     str(REPO / "crds" / "llm2llm.io_augmentationruns.yaml"))
        values = self.workdir / "values-s3.yaml"
        values.write_text(yaml.safe_dump({
            "operator": {"env": _aws_env("s3-credentials", self.s3.url)},
            "rbac": {"secretNamespaces": [RUN_NS]},  # the MLflow credentials' Secret
        }))
        self.node.helm("upgrade", "--install", "llm2llm", str(REPO / "charts" / "llm2llm-operator"), "-n",
                       OPERATOR_NS, "-f", str(VALUES), "-f", str(values), "--wait", "--timeout", "180s")
        wait(lambda: self.kubectl("rollout", "status", "deploy/mlflow", "-n", MLFLOW_NS, "--timeout=5s",
                                  check=False).returncode == 0, "the MLflow pod", 300, every=3)
        self.mlflow_ip = self.get_json("svc", "mlflow", "-n", MLFLOW_NS)["spec"]["clusterIP"]

    # --- the run with its faults -----------------------------------------------------------------------------
    def run(self) -> "Scenario":
        self.setup()
        started = time.monotonic()
        self.apply(cluster_run(self.s3.url, pause=True), ns=RUN_NS)
        self.operator_pods = [p["metadata"]["name"] for p in self.get_json(
            "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=llm2llm-operator").get("items", [])]
        todo = ["worker", "head", "operator"]
        while True:
            obj = self.run_obj()
            self.argocd.see(obj)
            self.status = obj.get("status", {})
            self.uid = obj.get("metadata", {}).get("uid", self.uid)
            self.worker_pods |= {p["metadata"]["name"] for p in self.pods("ray.io/node-type=worker")}
            now = time.monotonic() - started
            if self.status.get("phase") in ("Succeeded", "Failed"):
                break
            if now > 2700:
                raise AssertionError(f"the run did not finish in {now:.0f}s\n{self.diagnostics()}")
            job = self.status.get("activeJob") or {}
            if todo and todo[0] == "worker" and self.status.get("stage") == "train" and job.get("iteration") == 0:
                pod = self._pod_running("ray.io/node-type=worker", "TrainerActor|RayTrainWorker", job["name"])
                if pod:
                    self._fault("worker", pod, now)
                    todo.pop(0)
            elif todo and todo[0] == "head" and self.status.get("stage") == "teach" and job.get("iteration") == 0 \
                    and self._teach_holding():
                pod = self._pod_running("ray.io/node-type=head", None, job["name"])
                if pod:
                    self._fault("head", pod, now)
                    todo.pop(0)
                    # The next attempts' clusters come from the template: no more pauses.
                    self.apply([d for d in cluster_run(self.s3.url) if d["kind"] == "ConfigMap"], ns=RUN_NS)
            elif todo and todo[0] == "operator" and job.get("iteration") == 1:
                self._fault("operator", self.operator_pods[0], now, ns=OPERATOR_NS)
                todo.pop(0)
                wait(lambda: [p for p in self.get_json("pods", "-n", OPERATOR_NS, "-l",
                                                       "app.kubernetes.io/name=llm2llm-operator")["items"]
                              if p["metadata"]["name"] not in self.operator_pods
                              and all(c.get("ready") for c in p.get("status", {}).get("containerStatuses", []))
                              and p.get("status", {}).get("containerStatuses")],
                     "a new operator pod to be ready", 300, every=2)
                self.operator_pods = [p["metadata"]["name"] for p in self.get_json(
                    "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=llm2llm-operator")["items"]
                    if not p["metadata"].get("deletionTimestamp")] + self.operator_pods
            self._recovered(now)
            time.sleep(2)
        self.elapsed = time.monotonic() - started

        # The run is Succeeded once its last iteration is committed in storage; its Ray job may still be exiting.
        def finished_rayjobs():
            items = self.get_json("rayjobs", "-n", RUN_NS, "-l", f"llm2llm.io/run-uid={self.uid}").get("items", [])
            done = all((j.get("status") or {}).get("jobDeploymentStatus") in ("Complete", "Failed") for j in items)
            return items if done else None

        self.rayjobs = wait(finished_rayjobs, "the run's RayJobs to finish", 300, every=3,
                            on_timeout=self.diagnostics)
        self.keys = sorted(self.fs().find(f"{BUCKET}/runs/demo"))
        self.described = self.kubectl("describe", "augrun", "demo", "-n", RUN_NS).stdout
        self.augruns_table = self.kubectl("get", "augruns", "-n", RUN_NS).stdout
        return self

    def _teach_holding(self) -> bool:
        """The teach stage's shards are committed and its marker is not: the driver is in PAUSE."""
        fs = self.fs()
        stage = f"{BUCKET}/runs/demo/iter-0/teach"
        return bool(fs.glob(f"{stage}/shard-*.json")) and not fs.exists(f"{stage}/_DONE.json")

    def _pod_running(self, selector: str, process: str | None, job: str) -> str | None:
        """A Running pod of the active job's RayCluster (with ``process`` running in it, when given)."""
        rj = self.get_json("rayjob", job, "-n", RUN_NS)
        cluster = (rj.get("status") or {}).get("rayClusterName")
        if not cluster:
            return None
        for pod in self.pods(f"{selector},ray.io/cluster={cluster}"):
            if pod.get("status", {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
                continue
            name = pod["metadata"]["name"]
            if process is None:
                return name
            ps = self.kubectl("exec", "-n", RUN_NS, name, "--", "pgrep", "-f", process, check=False, timeout=30)
            if ps.returncode == 0 and ps.stdout.strip():
                return name
        return None

    def _fault(self, name: str, pod: str, now: float, ns: str = RUN_NS) -> None:
        fault = Fault(name, pod, now, json.loads(json.dumps(self.status)), self.markers(),
                      jobs_before=len(self.status.get("jobs", [])))
        # At once, as a node failure or an OOM kill does: with the default grace period (30 s) a stage of this
        # size simply finishes before the pod goes.
        self.kubectl("delete", "pod", pod, "-n", ns, "--grace-period=0", "--force", "--wait=false")
        self.faults[name] = fault

    def _recovered(self, now: float) -> None:
        """A fault is over once the run is past the stage it hit (a later stage or iteration committed)."""
        for fault in self.faults.values():
            if fault.markers_at_retry is None and len(self.status.get("jobs", [])) > fault.jobs_before:
                fault.markers_at_retry = self.markers()
            if fault.recovered_after is not None:
                continue
            before = fault.status_before
            done_before = len(before.get("iterations", []))
            done_now = len(self.status.get("iterations", []))
            stage = {"worker": "train", "head": "teach"}.get(fault.name)
            if done_now > done_before or (stage and stage in self.markers()):
                fault.recovered_after = now - fault.at

    # --- deletion ---------------------------------------------------------------------------------------------
    def delete(self) -> None:
        """`kubectl delete augrun` (deleteData: true): its RayJobs, their RayClusters and its data go."""
        t0 = time.monotonic()
        self.kubectl("delete", "augrun", "demo", "-n", RUN_NS, "--wait=true", "--timeout=300s")

        def gone():
            left = {kind: [i["metadata"]["name"] for i in self.get_json(kind, "-n", RUN_NS).get("items", [])]
                    for kind in ("rayjobs", "rayclusters")}
            left["objects"] = self.fs().find(f"{BUCKET}/runs/demo")
            self.leftovers = left
            return not any(left.values())

        wait(gone, "the run's RayJobs, RayClusters and data to go", 300, every=3,
             on_timeout=lambda: json.dumps(self.leftovers))
        self.deleted_after = time.monotonic() - t0

    def mlflow_runs(self) -> list[Any]:
        """Every MLflow run of this AugmentationRun, asked from the node through the Service's ClusterIP."""
        import os
        from unittest import mock

        from mlflow import MlflowClient

        creds = {"MLFLOW_TRACKING_USERNAME": self.mlflow_user, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password}
        with mock.patch.dict(os.environ, creds):  # the client reads them from the environment; restored after
            client = MlflowClient(tracking_uri=f"http://{self.mlflow_ip}:5000")
            exp = client.get_experiment_by_name(EXPERIMENT)
            assert exp is not None, f"no MLflow experiment {EXPERIMENT}"
            return list(client.search_runs([exp.experiment_id], filter_string=f"tags.`llm2llm.io/uid` = '{self.uid}'",
                                           max_results=100))
