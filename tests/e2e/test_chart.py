"""The Helm chart (charts/llm2llm-operator) against real helm and a real kube-apiserver.

- `helm lint` is clean; bad values fail the render with a message naming the key.
- `helm template` output applies with `kubectl apply --server-side` (cluster-wide and namespaced RBAC),
  and `helm install/upgrade/uninstall` do what docs/install.md says (CRDs installed once, never upgraded or
  deleted; runs survive an uninstall).
- The headline: the operator, started exactly as the chart's Deployment starts it (its args and env), with
  the chart's ServiceAccount as its ONLY credentials (a real token from the TokenRequest API, no admin
  fallback), takes an AugmentationRun through the whole RayJob flow: cluster template + API key Secret,
  suspend/resume, two iterations, Succeeded, Events, deletion through the finalizer. The test plays
  KubeRay (RayJob status) and the iteration job (manifests in the run's storage folder).
- Every RBAC verb is necessary: with any single verb removed from the chart's rules, that same flow breaks at
  the step that needs it. One operator watches 14 namespaces at once (one with the full Role, thirteen each
  missing one verb), so the whole proof costs one flow's time instead of fourteen. It runs on a private
  control plane started with the OwnerReferencesPermissionEnforcement admission plugin (as on OpenShift),
  the only way `augmentationruns/finalizers: update` (needed for blockOwnerDeletion) is enforced; the same
  private plane runs the cluster-wide (ClusterRole) flow, which on the shared plane would reconcile other
  tests' runs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from kubernetes import client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from llm2llm.planner import job_name
from llm2llm.spec import GROUP, PLURAL, VERSION
from llm2llm.status import IterationStatus
from llm2llm.storage import RunStorage
from tests.e2e.conftest import KUBERAY_CRDS, Cluster
from tests.argocd.health import argo_health

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llm2llm-operator"
CRD_FILE = REPO / "crds" / "llm2llm.io_augmentationruns.yaml"
RAY = ("ray.io", "v1", "rayjobs")
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from controlplane import ControlPlane, _die_with_parent, free_ports, tail  # noqa: E402

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def augrun_crd(control_plane) -> str:
    """The chart's copy of the CRD (identical to crds/, tests/unit/test_chart_static.py), server-side applied."""
    manifest = yaml.safe_load((CHART / "crds" / CRD_FILE.name).read_text())
    control_plane.apply(manifest)
    control_plane.wait_crd_established(manifest["metadata"]["name"])
    return manifest["metadata"]["name"]


# --- helm ------------------------------------------------------------------------------------------

def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.run([str(cluster.tools_bin / "helm"), *args], env=env, text=True, capture_output=True,
                          timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    return proc


def render(cluster: Cluster, release: str, namespace: str, values: dict[str, Any] | None = None,
           chart: Path = CHART, *extra: str) -> list[dict[str, Any]]:
    """`helm template` with values given as a file (exactly as a user's -f values.yaml)."""
    args = ["template", release, str(chart), "--namespace", namespace, *extra]
    if values:
        args += ["--values", "-"]
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.run([str(cluster.tools_bin / "helm"), *args], env=env, text=True, capture_output=True,
                          input=yaml.safe_dump(values) if values else None, timeout=300)
    if proc.returncode:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def kubectl_apply(cluster: Cluster, docs: list[dict[str, Any]], *extra: str) -> str:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.run([str(cluster.tools_bin / "kubectl"), "apply", "--server-side",
                           "--field-manager=llm2llm-chart-test", *extra, "-f", "-"],
                          input=yaml.safe_dump_all(docs), env=env, text=True, capture_output=True, timeout=120)
    if proc.returncode:
        raise AssertionError(f"kubectl apply --server-side failed:\n{proc.stderr}\n{proc.stdout}")
    return proc.stdout


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return sorted((d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs)


RULE_SECTIONS = ("rules", "secrets")  # files/rbac-rules.yaml: the operator's Role, and its Secrets-only Role


def chart_with_rules(tmp: Path, sections: dict[str, list[dict[str, Any]]]) -> Path:
    """A copy of the chart whose files/rbac-rules.yaml has these rule sections."""
    dest = tmp / f"chart-{time.monotonic_ns()}"
    shutil.copytree(CHART, dest)
    doc = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    doc.update(sections)
    (dest / "files" / "rbac-rules.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def rules_without(perm: tuple[str, str, str]) -> dict[str, list[dict[str, Any]]]:
    group, resource, verb = perm
    doc = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    out: dict[str, list[dict[str, Any]]] = {}
    for section in RULE_SECTIONS:
        out[section] = []
        for rule in doc[section]:
            if rule["apiGroups"] == [group] and rule["resources"] == [resource]:
                rule = {**rule, "verbs": [v for v in rule["verbs"] if v != verb]}
                if not rule["verbs"]:
                    continue
            out[section].append(rule)
    return out


def all_perms() -> list[tuple[str, str, str]]:
    doc = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    return [(g, r, v) for section in RULE_SECTIONS for rule in doc[section] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]]


# --- lint, values, template -------------------------------------------------------------------------

NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
ARGOCD_VALUES = yaml.safe_load((REPO / "examples" / "gitops" / "argocd" / "llm2llm-operator.yaml").read_text()
                               )["spec"]["source"]["helm"]["valuesObject"]


@pytest.mark.parametrize("values", [{}, NAMESPACED, {**NAMESPACED, "peering": {"name": "llm2llm"}, "replicaCount": 2},
                                    {"operator": {"defaultLauncher": "jobs-api", "rayAddress": "http://ray:8265"}},
                                    ARGOCD_VALUES],
                         ids=["defaults", "namespaced", "peering", "jobs-api", "argocd-example"])
def test_helm_lint_is_clean(control_plane, tmp_path, values):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = helm(control_plane, "lint", str(CHART), "--strict", "--values", str(path)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out
    assert "[INFO]" not in out and "[WARNING]" not in out and "[ERROR]" not in out, out


BAD_VALUES = [  # (id, --set arguments, words the error must contain)
    ("namespace-invalid", ["--set", "watchNamespaces={team-a,Team_B}"], ['watchNamespaces[1] "Team_B"', "DNS label"]),
    ("namespace-glob", ["--set", "watchNamespaces={team-*}"], ['watchNamespaces[0] "team-*"', "no globs"]),
    ("namespace-duplicate", ["--set", "watchNamespaces={a,a}"], ['watchNamespaces[1] "a" is listed twice']),
    ("namespaces-not-a-list", ["--set", "watchNamespaces=team-a"], ["watchNamespaces must be a list"]),
    ("launcher-unknown", ["--set", "operator.defaultLauncher=local"],
     ["operator.defaultLauncher must be one of [rayjob, jobs-api]", '"local"']),
    ("jobs-api-without-address", ["--set", "operator.defaultLauncher=jobs-api"],
     ["operator.defaultLauncher=jobs-api needs operator.rayAddress"]),
    ("address-not-http", ["--set", "operator.rayAddress=ray-head:8265"], ["operator.rayAddress must be an http(s)://"]),
    ("no-resources", ["--set", "resources=null"], ["resources.requests.cpu must be set"]),
    ("no-memory-request", ["--set", "resources.requests.memory=null"], ["resources.requests.memory must be set"]),
    ("no-memory-limit", ["--set", "resources.limits=null"], ["resources.limits.memory must be set"]),
    ("replicas-without-peering", ["--set", "replicaCount=2"], ["replicaCount=2 needs peering.name"]),
    ("interval-zero", ["--set", "operator.reconcileInterval=0"], ["operator.reconcileInterval must be a number of seconds > 0"]),
    ("workers-zero", ["--set", "operator.workers=0"], ["operator.workers must be an integer >= 1"]),
    ("workers-fraction", ["--set", "operator.workers=2.5"], ["operator.workers must be an integer >= 1"]),
    ("relative-base-dir", ["--set", "operator.baseDir=data"], ["operator.baseDir must be an absolute path"]),
    ("port-clash", ["--set", "health.port=8000"], ["health.port and metrics.port must differ"]),
    ("port-range", ["--set", "metrics.port=70000"], ["metrics.port must be a port number"]),
    ("sa-without-name", ["--set", "serviceAccount.create=false"], ["serviceAccount.create=false needs serviceAccount.name"]),
    ("ray-address-userinfo", ["--set", "operator.allowedRayAddresses={http://head@evil:8265}"],
     ["operator.allowedRayAddresses[0] must be an http(s):// dashboard URL without user info"]),
    ("templates-not-a-list", ["--set", "operator.allowedClusterTemplates=pool"],
     ["operator.allowedClusterTemplates must be a list"]),
    ("secret-namespace-invalid", ["--set", "rbac.secretNamespaces={Team_B}"],
     ["rbac.secretNamespaces[0] Team_B is not a namespace name"]),
]


@pytest.mark.parametrize("args,words", [pytest.param(a, w, id=i) for i, a, w in BAD_VALUES])
def test_bad_values_fail_with_a_clear_message(control_plane, args, words):
    proc = helm(control_plane, "template", "r", str(CHART), *args, check=False)
    assert proc.returncode != 0, proc.stdout[:2000]
    assert "llm2llm-operator: invalid values:" in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert proc.stdout == ""  # nothing half-rendered


def test_rendered_deployment_is_hardened(control_plane):
    docs = render(control_plane, "r", "ops")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 10001
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["privileged"] is False
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 8000}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LLM2LLM_LIVENESS"] == "http://0.0.0.0:8080/healthz" and env["LLM2LLM_METRICS_PORT"] == "8000"
    assert c["args"] == ["--all-namespaces"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"} and dep["spec"]["replicas"] == 1
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # The RBAC rules are the rules file's, verbatim; cluster-wide, no Secret is readable anywhere by default.
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert role["rules"] == yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())["rules"]
    assert not any(r.get("resources") == ["secrets"] for d in docs for r in d.get("rules") or [])
    assert "LLM2LLM_ALLOWED_CLUSTER_TEMPLATES" not in env and "LLM2LLM_ALLOWED_RAY_ADDRESSES" not in env


def test_secret_rights_only_where_the_admin_says(control_plane):
    """list secrets: a Role per secretNamespaces entry (default: the watched namespaces), never a ClusterRole."""
    def secret_roles(values):
        return sorted((d["kind"], d["metadata"]["namespace"]) for d in render(control_plane, "r", "ops", values)
                      if any(r.get("resources") == ["secrets"] for r in d.get("rules") or []))
    assert secret_roles({"watchNamespaces": ["a", "b"]}) == [("Role", "a"), ("Role", "b")]
    assert secret_roles({"watchNamespaces": ["a", "b"], "rbac": {"secretNamespaces": ["b"]}}) == [("Role", "b")]
    assert secret_roles({"rbac": {"secretNamespaces": ["keys"]}}) == [("Role", "keys")]
    dep = next(d for d in render(control_plane, "r", "ops", {"operator": {
        "allowedClusterTemplates": ["pool", "ml/gpu-*"], "allowedRayAddresses": ["http://ray-head.ray:8265"]}})
        if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLM2LLM_ALLOWED_CLUSTER_TEMPLATES"] == "pool,ml/gpu-*"
    assert env["LLM2LLM_ALLOWED_RAY_ADDRESSES"] == "http://ray-head.ray:8265"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_template_applies_server_side(control_plane, augrun_crd, namespace, mode, kubectl):
    values: dict[str, Any] = {}
    if mode == "namespaced":
        values["watchNamespaces"] = [control_plane.new_namespace("watched-a"), control_plane.new_namespace("watched-b")]
    docs = render(control_plane, namespace, namespace, values, CHART, "--include-crds")
    out = kubectl_apply(control_plane, docs)
    expected = {"ServiceAccount", "Service", "Deployment", "CustomResourceDefinition"}
    expected |= {"ClusterRole", "ClusterRoleBinding"} if mode == "cluster-wide" else {"Role", "RoleBinding"}
    assert {d["kind"] for d in docs} == expected
    assert out.count("serverside-applied") == len(docs), out
    for kind, name, ns in kinds(docs):
        args = ["get", kind.lower(), name, "-o", "json"] + (["-n", ns] if ns else [])
        got = json.loads(kubectl(*args).stdout)
        assert got["metadata"]["name"] == name
    if mode == "namespaced":  # the operator's Role and its Secrets-only Role in each watched namespace
        roles = [d for d in docs if d["kind"] == "Role"]
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(values["watchNamespaces"] * 2)
    # Applying again changes nothing (idempotent, no conflicts with ourselves).
    again = kubectl_apply(control_plane, docs)
    assert again.count("serverside-applied") == len(docs)


def test_helm_install_upgrade_uninstall(control_plane, augrun_crd, namespace, tmp_path, kubectl):
    """What docs/install.md promises: CRDs from crds/ are installed if missing and never upgraded or deleted;
    upgrades roll the Deployment; uninstall removes the operator and its RBAC but leaves runs alone."""
    release = "ops"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"watchNamespaces": [namespace]}))
    helm(control_plane, "install", release, str(CHART), "-n", namespace, "-f", str(values))
    dep = json.loads(kubectl("get", "deploy", f"{release}-llm2llm-operator", "-n", namespace, "-o", "json").stdout)
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == [f"--namespace={namespace}"]
    kubectl("get", "role", f"{release}-llm2llm-operator", "-n", namespace)

    run = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AugmentationRun", "metadata": {"name": "survivor"},
           "spec": {"data": {"seed": "/data/seed.jsonl"}, "output": "/data/out"}}
    client.CustomObjectsApi(control_plane.api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, run)

    # An upgrade with a changed CRD in the chart: helm leaves the installed CRD alone.
    chart = tmp_path / "chart-next"
    shutil.copytree(CHART, chart)
    crd = yaml.safe_load((chart / "crds" / CRD_FILE.name).read_text())
    crd["metadata"].setdefault("annotations", {})["llm2llm.io/chart-test"] = "next"
    (chart / "crds" / CRD_FILE.name).write_text(yaml.safe_dump(crd))
    helm(control_plane, "upgrade", release, str(chart), "-n", namespace, "-f", str(values),
         "--set", "operator.reconcileInterval=10")
    dep = json.loads(kubectl("get", "deploy", f"{release}-llm2llm-operator", "-n", namespace, "-o", "json").stdout)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLM2LLM_RECONCILE_INTERVAL"] == "10" and env["LLM2LLM_WORKERS"] == "16"
    live = json.loads(kubectl("get", "crd", augrun_crd, "-o", "json").stdout)
    assert "llm2llm.io/chart-test" not in (live["metadata"].get("annotations") or {})

    helm(control_plane, "uninstall", release, "-n", namespace)
    for kind in ("deploy", "role", "rolebinding", "serviceaccount", "service"):
        out = kubectl("get", kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={release}", "-o", "name").stdout
        assert out.strip() == "", (kind, out)
    kubectl("get", "crd", augrun_crd)  # still there
    kubectl("get", "augrun", "survivor", "-n", namespace)  # and so is the run


# --- the operator under the chart's ServiceAccount -----------------------------------------------------

def sa_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig whose only credential is a ServiceAccount token from the TokenRequest API (the API server
    signs it; no controller-manager needed), exactly what a pod's projected token would be."""
    token = client.CoreV1Api(cluster.api).create_namespaced_service_account_token(
        sa, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cluster.cp.server,
                                                "certificate-authority": str(cluster.cp.ca_file)}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa}}],
        "current-context": "c",
    }))
    path.chmod(0o600)
    return path


class ChartOperator:
    """`python -m llm2llm_operator` started as the chart's Deployment starts the image's entrypoint: the
    container's args and env, the ServiceAccount's kubeconfig; probed on the Deployment's own probe."""

    def __init__(self, deployment: dict[str, Any], kubeconfig: Path, log: Path):
        (self.container,) = deployment["spec"]["template"]["spec"]["containers"]
        self.kubeconfig, self.log_path = kubeconfig, log
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        probe = self.container["readinessProbe"]["httpGet"]
        self.health_url = f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "ChartOperator":
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM2LLM_")}
        env.update({e["name"]: e["value"] for e in self.container["env"] if "value" in e})
        env.update(KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1")
        env["HOME"] = str(self.log_path.parent)  # the chart's HOME=/tmp, kept per test
        argv = [sys.executable, "-m", "llm2llm_operator", *self.container["args"]]
        with open(self.log_path, "ab") as out:
            out.write(f"=== {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(argv, cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        wait_for(self._ready, f"the operator's readiness probe {self.health_url} (log {self.log_path})",
                 timeout, every=0.3)
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited {self.proc and self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_watching(self, cluster: Cluster, namespace: str, timeout: float = 180.0) -> float:
        """Seconds until Kopf handles runs in `namespace`: a suspended canary run gets Kopf's finalizer, then
        is deleted through it. The readiness probe answers before Kopf's watchers start, and in namespaced
        mode Kopf first retries listing namespaces (not granted) for ~1 minute; see unexpected_denials."""
        started = time.monotonic()
        custom = client.CustomObjectsApi(cluster.api)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "AugmentationRun", "metadata": {"name": "canary"},
            "spec": {"suspend": True, "data": {"seed": "/data/seed.jsonl"}, "output": "/tmp/canary",
                     "ray": {"launcher": "rayjob", "clusterSelector": {"ray.io/cluster": "none"}}}})

        def get() -> dict[str, Any] | None:
            try:
                return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "canary")
            except ApiException as err:
                if err.status == 404:
                    return None
                raise

        wait_for(lambda: "llm2llm.io/finalizer" in (get()["metadata"].get("finalizers") or []),
                 f"Kopf to handle runs in {namespace} (log {self.log_path})", timeout, every=0.5)
        elapsed = time.monotonic() - started
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "canary")
        wait_for(lambda: get() is None, "the canary run to go", 60, every=0.5)
        return elapsed

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self, lines: int = 120) -> str:
        return tail(self.log_path, lines)


def wait_for(fn: Callable[[], Any], what: str, timeout: float = 60.0, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except ApiException as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise StepTimeout(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"[:2000])
        time.sleep(every)


class StepTimeout(AssertionError):
    pass


# Kopf's cluster scanning, which the chart deliberately does not grant (files/rbac-rules.yaml, header): Kopf
# retries, logs a warning and goes on with the exact watchNamespaces and the installed CRD.
KOPF_SCANNING = re.compile(r'cannot (list|watch) resource "(namespaces|customresourcedefinitions)"')


def unexpected_denials(log: str) -> list[str]:
    """Log lines reporting a 403 other than Kopf's optional cluster scanning."""
    return [line for line in log.splitlines()
            if ("403" in line or "Forbidden" in line) and not KOPF_SCANNING.search(line)]


def install_for_operator(cluster: Cluster, release_ns: str, values: dict[str, Any], tmp: Path,
                         role_overrides: dict[str, dict[str, list[dict[str, Any]]]] | None = None
                         ) -> tuple[dict[str, Any], Path]:
    """Renders and server-side applies the chart, and returns its Deployment and a kubeconfig of its
    ServiceAccount. role_overrides: namespace -> rule sections, rendered from a chart copy with those rules.
    The flow's cluster template is one the admin allows (operator.allowedClusterTemplates)."""
    health, metrics = free_ports(2)
    values = {**values, "health": {"port": health}, "metrics": {"port": metrics, "service": {"port": metrics}},
              "operator": {"allowedClusterTemplates": ["ray-template"], **values.get("operator", {}),
                           "reconcileInterval": 1}}
    docs = render(cluster, "llm2llm", release_ns, values)
    for ns, sections in (role_overrides or {}).items():
        reduced = render(cluster, "llm2llm", release_ns, {**values, "watchNamespaces": [ns]},
                         chart_with_rules(tmp, sections))
        roles = {d["metadata"]["name"]: d for d in reduced if d["kind"] == "Role"}
        docs = [roles.get(d["metadata"]["name"], d) if d["kind"] == "Role" and d["metadata"]["namespace"] == ns
                else d for d in docs]
    kubectl_apply(cluster, docs)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = sa_kubeconfig(cluster, release_ns, sa, tmp / f"sa-{release_ns}.kubeconfig")
    # Prove the credential is the ServiceAccount and nothing more (RBAC caches catch up within ~1 s).
    sa_api = k8s_config.new_client_from_config(str(kubeconfig))
    try:
        review = client.AuthenticationV1Api(sa_api).create_self_subject_review({})
        assert review.status.user_info.username == f"system:serviceaccount:{release_ns}:{sa}"
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(sa_api).list_namespaced_pod(release_ns)
        assert denied.value.status == 403
    finally:
        sa_api.close()
    return dep, kubeconfig


# --- the flow --------------------------------------------------------------------------------------

TEMPLATE = {
    "rayVersion": "2.60.0",
    "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
        {"name": "ray-head", "image": "registry.example/llm2llm-job:0.1.0"}]}}},
    "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2,
                          "rayStartParams": {}, "template": {"spec": {"containers": [
                              {"name": "ray-worker", "image": "registry.example/llm2llm-job:0.1.0"}]}}}],
}


@dataclass
class Flow:
    """One AugmentationRun taken through every path that needs a permission; the test plays KubeRay and
    the iteration job. `step` names the step in progress, so a failure says where the flow broke."""

    cluster: Cluster
    ns: str
    out: Path
    timeout: float = 60.0
    name: str = "flow"
    step: str = "setup"
    done: list[str] = field(default_factory=list)
    health: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.cluster.api)
        self.core = client.CoreV1Api(self.cluster.api)

    # API helpers (admin: the test's own view)
    def run(self) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def status(self) -> dict[str, Any]:
        return (self.run() or {}).get("status") or {}

    def rayjob(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(*RAY[:2], self.ns, RAY[2], name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def rayjobs(self, uid: str) -> list[str]:
        items = self.custom.list_namespaced_custom_object(*RAY[:2], self.ns, RAY[2],
                                                          label_selector=f"llm2llm.io/run-uid={uid}")["items"]
        return sorted(i["metadata"]["name"] for i in items)

    def kuberay(self, name: str, **status: Any) -> None:
        self.custom.patch_namespaced_custom_object_status(*RAY[:2], self.ns, RAY[2], name, {"status": status})

    def reasons(self) -> list[str]:
        evs = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={self.name}").items
        return [e.reason for e in evs]

    def wait(self, fn: Callable[[], Any], step: str) -> Any:
        self.step = step
        got = wait_for(fn, f"{self.ns}: {step}", self.timeout)
        self.done.append(step)
        return got

    def commit(self, index: int, job: str) -> None:
        RunStorage(str(self.out), self.name).write_iteration(IterationStatus(
            index=index, seed_accuracy=0.5 + index / 10, test_accuracy=0.4 + index / 10, failures=2, kept=3,
            generated=4, job=job))

    def observe_health(self, label: str) -> None:
        self.health[label] = argo_health(self.run())[0]

    # the flow
    def setup(self) -> None:
        self.core.create_namespaced_secret(self.ns, {"metadata": {
            "name": "teacher-key", "labels": {"llm2llm.io/teacher-key": "true"},
            "annotations": {"llm2llm.io/allowed-endpoints": "https://llm.example/v1"}},
            "stringData": {"token": "sk-test-not-a-secret"}})
        self.core.create_namespaced_config_map(self.ns, {"metadata": {"name": "ray-template"},
                                                         "data": {"rayClusterSpec": yaml.safe_dump(TEMPLATE)}})

    def __call__(self) -> None:
        self.setup()
        self.step = "create the run"
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "AugmentationRun", "metadata": {"name": self.name},
            "spec": {
                "task": {"kind": "gsm8k"}, "data": {"seed": "/data/seed.jsonl"}, "output": str(self.out),
                "loop": {"maxIterations": 2}, "retry": {"maxAttempts": 3, "backoffSeconds": 1},
                "teacher": {"kind": "openai", "endpoint": "https://llm.example/v1", "model": "gpt-4o-mini",
                            "apiKeySecretRef": {"name": "teacher-key", "key": "token"}},
                "ray": {"launcher": "rayjob", "clusterTemplate": "ray-template"},
            }})
        uid = self.run()["metadata"]["uid"]
        a1, a2, b1 = (job_name(self.name, uid, i, a) for i, a in ((0, 1), (0, 2), (1, 1)))

        self.wait(lambda: "llm2llm.io/finalizer" in (self.run()["metadata"].get("finalizers") or []),
                  "Kopf adds its finalizer")
        job = self.wait(lambda: self.rayjob(a1), "the first RayJob (Secret and template checked)")
        assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] == [
            {"name": "LLM2LLM_TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "teacher-key", "key": "token"}}},
            {"name": "LLM2LLM_TEACHER_API_KEY_ENDPOINTS", "value": "https://llm.example/v1"}]
        self.wait(lambda: self.status().get("phase") == "Running" and self.status().get("activeJob"),
                  "status Running")
        self.observe_health("running")

        self.kuberay(a1, jobDeploymentStatus="Running", jobStatus="RUNNING")
        self.wait(lambda: any(j["name"] == a1 and j["state"] == "Running" for j in self.status().get("jobs", [])),
                  "the RayJob observed Running")
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name, {"spec": {"suspend": True}})
        self.wait(lambda: self.rayjob(a1) is None, "suspend deletes the running RayJob")
        self.wait(lambda: self.status().get("phase") == "Suspended", "status Suspended")
        self.observe_health("suspended")
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name, {"spec": {"suspend": False}})
        self.wait(lambda: self.rayjob(a2), "resume launches attempt 2")

        self.commit(0, a2)
        self.kuberay(a2, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
        self.wait(lambda: self.rayjob(b1), "iteration 1's RayJob after iteration 0 succeeded")
        self.commit(1, b1)
        self.kuberay(b1, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
        self.wait(lambda: self.status().get("phase") == "Succeeded", "status Succeeded")
        self.observe_health("succeeded")
        self.wait(lambda: {"IterationStarted", "JobStopped", "IterationSucceeded", "RunSucceeded"} <= set(self.reasons()),
                  "the run's Events")

        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.name)
        self.wait(lambda: self.rayjobs(uid) == [], "deleting the run deletes its RayJobs")
        self.wait(lambda: self.run() is None, "the finalizer is removed and the run is gone")
        self.step = "complete"


def run_flows(flows: dict[str, Flow]) -> dict[str, BaseException | None]:
    """Runs flows concurrently (one thread each); returns each one's error, None when it completed."""
    errors: dict[str, BaseException | None] = {}

    def go(key: str, flow: Flow) -> None:
        try:
            flow()
            errors[key] = None
        except BaseException as err:  # noqa: BLE001 - reported below
            errors[key] = err

    threads = [threading.Thread(target=go, args=(k, f), daemon=True) for k, f in flows.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_operator_completes_a_run_under_the_chart_service_account(control_plane, augrun_crd, namespace, tmp_path,
                                                                   capsys):
    """Namespaced mode on the shared control plane: a Role in the watched namespace, the operator in another."""
    release_ns = control_plane.new_namespace("llm2llm-system")
    dep, kubeconfig = install_for_operator(control_plane, release_ns, {"watchNamespaces": [namespace]}, tmp_path)
    op = ChartOperator(dep, kubeconfig, tmp_path / "operator.log").start()
    try:
        watching = op.wait_watching(control_plane, namespace)
        flow = Flow(control_plane, namespace, tmp_path / "out")
        started = time.monotonic()
        flow()
        elapsed = time.monotonic() - started
        assert flow.health == {"running": "Progressing", "suspended": "Suspended", "succeeded": "Healthy"}
        text = op.metrics()
        assert 'llm2llm_jobs_submitted_total{launcher="rayjob"} 3.0' in text
        assert unexpected_denials(op.log(100000)) == []
        with capsys.disabled():
            print(f"\nchart SA flow (namespaced): ready -> watching {watching:.1f}s, flow {elapsed:.1f}s, "
                  f"operator RSS {op.rss_mib():.0f} MiB")
    except BaseException:
        print(f"--- operator log:\n{op.log(200)}")
        raise
    finally:
        op.stop()


# --- a private, stricter control plane ----------------------------------------------------------------

class _StrictControlPlane(ControlPlane):
    """The test control plane plus the OwnerReferencesPermissionEnforcement admission plugin."""

    def _spawn(self, name, argv, log):
        if name == "kube-apiserver":
            argv = [*argv, "--enable-admission-plugins=OwnerReferencesPermissionEnforcement"]
        super()._spawn(name, argv, log)


@pytest.fixture(scope="module")
def strict_plane(control_plane, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("strict-controlplane")
    with _StrictControlPlane(workdir) as cp:
        api = k8s_config.new_client_from_config(str(cp.kubeconfig))
        cluster = Cluster(cp, api)
        # Same tools as the shared plane (cached property on another instance).
        cluster.__dict__["tools_bin"] = control_plane.tools_bin
        try:
            names = []
            for path in [*sorted(KUBERAY_CRDS.glob("ray.io_*.yaml")), CRD_FILE]:
                crd = yaml.safe_load(path.read_text())
                cluster.apply(crd)
                names.append(crd["metadata"]["name"])
            for name in names:
                cluster.wait_crd_established(name)
            yield cluster
        finally:
            api.close()
    shutil.rmtree(workdir / "etcd-data", ignore_errors=True)


def test_strict_plane_enforces_owner_references(strict_plane):
    # The plugin is really on: blockOwnerDeletion on an owner the user may not finalize is refused.
    ns = strict_plane.new_namespace("probe")
    core = client.CoreV1Api(strict_plane.api)
    owner = core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    rbac = client.RbacAuthorizationV1Api(strict_plane.api)
    rbac.create_namespaced_role(ns, {"metadata": {"name": "cm"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get"]}]})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "cm"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm"},
        "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": ns}]})
    bot = client.CoreV1Api(strict_plane.impersonating(f"system:serviceaccount:{ns}:bot"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid,
           "blockOwnerDeletion": True}
    wait_for(lambda: bot.read_namespaced_config_map("owner", ns), "RBAC to catch up", 30)
    with pytest.raises(ApiException) as err:
        bot.create_namespaced_config_map(ns, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    assert err.value.status == 403 and "blockOwnerDeletion" in err.value.body


def test_operator_completes_a_run_cluster_wide(strict_plane, tmp_path, capsys):
    """The default install (ClusterRole, --all-namespaces), alone on the private plane."""
    release_ns = strict_plane.new_namespace("llm2llm-system")
    run_ns = strict_plane.new_namespace("research")
    # Secrets are never granted cluster-wide: the admin names the namespace where runs may use one.
    dep, kubeconfig = install_for_operator(strict_plane, release_ns, {"rbac": {"secretNamespaces": [run_ns]}}, tmp_path)
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == ["--all-namespaces"]
    op = ChartOperator(dep, kubeconfig, tmp_path / "operator.log").start()
    try:
        watching = op.wait_watching(strict_plane, run_ns)
        flow = Flow(strict_plane, run_ns, tmp_path / "out")
        started = time.monotonic()
        flow()
        with capsys.disabled():
            print(f"\nchart SA flow (cluster-wide, strict plane): ready -> watching {watching:.1f}s, "
                  f"flow {time.monotonic() - started:.1f}s")
        assert unexpected_denials(op.log(100000)) == []
        assert flow.health == {"running": "Progressing", "suspended": "Suspended", "succeeded": "Healthy"}
    except BaseException:
        print(f"--- operator log:\n{op.log(200)}")
        raise
    finally:
        op.stop()


# Where the flow must break without each verb: proves the verb is used, and for what.
BREAKS_AT = {
    ("llm2llm.io", "augmentationruns", "list"): "Kopf adds its finalizer",
    ("llm2llm.io", "augmentationruns", "watch"): "Kopf adds its finalizer",
    ("llm2llm.io", "augmentationruns", "patch"): "Kopf adds its finalizer",
    ("llm2llm.io", "augmentationruns/status", "patch"): "status Running",
    ("llm2llm.io", "augmentationruns/finalizers", "update"): "the first RayJob (Secret and template checked)",
    ("ray.io", "rayjobs", "get"): "the RayJob observed Running",
    ("ray.io", "rayjobs", "list"): "deleting the run deletes its RayJobs",
    ("ray.io", "rayjobs", "create"): "the first RayJob (Secret and template checked)",
    ("ray.io", "rayjobs", "delete"): "suspend deletes the running RayJob",
    ("", "secrets", "list"): "the first RayJob (Secret and template checked)",
    ("", "configmaps", "get"): "the first RayJob (Secret and template checked)",
    ("", "events", "create"): "the run's Events",
}


def test_every_rbac_verb_is_needed(strict_plane, tmp_path, capsys):
    perms = all_perms()
    assert sorted(BREAKS_AT) == sorted(perms), "a rule was added or removed: say where the flow breaks without it"
    full = strict_plane.new_namespace("full")
    reduced = {perm: strict_plane.new_namespace(f"no-{perm[1].replace('/', '-')}-{perm[2]}") for perm in perms}
    release_ns = strict_plane.new_namespace("llm2llm-system")
    dep, kubeconfig = install_for_operator(
        strict_plane, release_ns, {"watchNamespaces": [full, *reduced.values()]}, tmp_path,
        role_overrides={ns: rules_without(perm) for perm, ns in reduced.items()})
    op = ChartOperator(dep, kubeconfig, tmp_path / "operator.log").start()
    try:
        op.wait_watching(strict_plane, full)
        flows = {"full": Flow(strict_plane, full, tmp_path / "full", timeout=90.0)}
        # Without a verb, the flow stalls; 30 s is several reconciles (interval 1 s, retries after 5 s).
        flows.update({f"{g}/{r}:{v}": Flow(strict_plane, ns, tmp_path / ns, timeout=30.0)
                      for (g, r, v), ns in reduced.items()})
        started = time.monotonic()
        errors = run_flows(flows)
        elapsed = time.monotonic() - started
        assert errors["full"] is None, f"the full Role did not complete: {errors['full']!r}"
        report = []
        for (g, r, v), ns in reduced.items():
            key, flow = f"{g}/{r}:{v}", flows[f"{g}/{r}:{v}"]
            report.append(f"  without {key:40s} breaks at: {flow.step}")
            assert isinstance(errors[key], StepTimeout), f"without {key} the flow {errors[key] or 'completed'}"
            assert flow.step == BREAKS_AT[(g, r, v)], (key, flow.step, flow.done)
        assert unexpected_denials(op.log(100000)), "no denial in the operator's log"
        with capsys.disabled():
            print(f"\nRBAC necessity, {len(reduced)} verbs, one operator, {elapsed:.1f}s:\n" + "\n".join(report))
    except BaseException:
        print(f"--- operator log:\n{op.log(300)}")
        raise
    finally:
        op.stop()


# --- GitOps example -----------------------------------------------------------------------------------

def test_gitops_runs_kustomize_and_apply(control_plane, augrun_crd, namespace, kubectl):
    """examples/gitops/runs builds with kustomize, and the API server (schema + CEL rules) accepts it."""
    out = kubectl("kustomize", str(REPO / "examples" / "gitops" / "runs")).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["kind"] for d in docs} >= {"AugmentationRun", "ConfigMap"}
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    dry = kubectl_apply(control_plane, docs, "--dry-run=server")
    assert dry.count("serverside-applied (server dry run)") == len(docs), dry
    runs = [d for d in docs if d["kind"] == "AugmentationRun"]
    templates = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for run in runs:
        ref = run["spec"].get("ray", {}).get("clusterTemplate")
        assert ref is None or ref in templates, ref
