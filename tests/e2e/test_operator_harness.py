"""Shared helpers for the operator's e2e tests (no tests here): the AugmentationRun CRD, the operator
as a subprocess, and polling waits. No KubeRay controller runs against the test control plane, so the
tests play KubeRay's part themselves by writing RayJob status."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llm2llm.crd import crd_yaml
from llm2llm.spec import GROUP, PLURAL, VERSION

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "llm2llm.io_augmentationruns.yaml"
RAY = ("ray.io", "v1", "rayjobs")
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from controlplane import _die_with_parent, free_ports, tail  # noqa: E402


def wait_for(fn: Callable[[], Any], what: str, timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll fn until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except ApiException as err:  # e.g. not created yet
            last = err
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"[:3000])


@pytest.fixture(scope="session")
def augrun_crd(control_plane) -> str:
    """Our CRD, installed by server-side apply exactly as committed, and Established."""
    text = CRD_FILE.read_text()
    assert text == crd_yaml(), "crds/ is stale: run `make crds`"
    manifest = yaml.safe_load(text)
    control_plane.apply(manifest)
    control_plane.wait_crd_established(manifest["metadata"]["name"])
    return manifest["metadata"]["name"]


# The cluster templates the tests' operators allow (their admin's list, operator.allowedClusterTemplates): every
# template name the tests use, and nothing else (tests/e2e/bad_specs.py has a run naming one outside it).
TEST_TEMPLATES = "pool,a100-pool,ray-template,t,p,empty,nameless,nohead,notyaml,absent,missing"


class Operator:
    """`python -m llm2llm_operator` as a subprocess against the test control plane."""

    def __init__(self, kubeconfig: Path, log: Path, args: list[str]):
        self.kubeconfig, self.log_path, self.args = kubeconfig, log, args
        self.health_port, self.metrics_port = free_ports(2)
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 90.0) -> "Operator":
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        env.setdefault("LLM2LLM_ALLOWED_CLUSTER_TEMPLATES", TEST_TEMPLATES)
        argv = [sys.executable, "-m", "llm2llm_operator", *self.args, "--metrics-port", str(self.metrics_port),
                "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"]
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== start: {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        wait_for(self._healthy, f"operator liveness (log: {self.log_path})", ready_timeout, every=0.2)
        return self

    def _healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc and self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as a node failure or OOM kill would do."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)


@pytest.fixture
def operator(control_plane, augrun_crd, tmp_path):
    """operator(namespace, *args) starts one, stopped at teardown; its log is printed on failure."""
    started: list[Operator] = []

    def start(namespace: str, *args: str) -> Operator:
        op = Operator(control_plane.kubeconfig, tmp_path / "operator.log",
                      ["--namespace", namespace, "--interval", "1", *args])
        started.append(op)
        return op.start()

    yield start
    for op in started:
        op.stop()
    # Captured output: pytest shows it only when the test fails.
    print(f"--- operator log ({tmp_path / 'operator.log'}):\n{started[0].log(120) if started else ''}")


class Api:
    """Dict-in, dict-out access to AugmentationRuns, RayJobs and Events of one namespace."""

    def __init__(self, cluster, namespace: str):
        self.ns = namespace
        self.custom = client.CustomObjectsApi(cluster.api)
        self.core = client.CoreV1Api(cluster.api)

    # AugmentationRuns
    def create_run(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, doc,
                                                           field_validation="Strict")

    def run(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return (self.run(name) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def delete_run(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), None)

    # RayJobs
    def rayjob(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(*RAY[:2], self.ns, RAY[2], name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def rayjobs(self, run_uid: str | None = None) -> list[str]:
        selector = f"llm2llm.io/run-uid={run_uid}" if run_uid else None
        items = self.custom.list_namespaced_custom_object(*RAY[:2], self.ns, RAY[2], label_selector=selector)
        return sorted(i["metadata"]["name"] for i in items["items"])

    def set_rayjob_status(self, name: str, **status: Any) -> None:
        """Write a RayJob's status as KubeRay's controller would (none runs here)."""
        self.custom.patch_namespaced_custom_object_status(*RAY[:2], self.ns, RAY[2], name, {"status": status})

    # Events
    def event_reasons(self, name: str) -> list[str]:
        evs = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [e.reason for e in sorted(evs, key=lambda e: e.metadata.creation_timestamp)]


def run_doc(name: str, output: str | Path, **spec: Any) -> dict[str, Any]:
    """A small AugmentationRun on the rayjob launcher with a shared cluster; keyword args override spec keys."""
    base: dict[str, Any] = {
        "task": {"kind": "gsm8k"},
        "data": {"seed": "/data/seed.jsonl"},
        "output": str(output),
        "loop": {"maxIterations": 2},
        "retry": {"maxAttempts": 3, "backoffSeconds": 1},
        "ray": {"launcher": "rayjob", "clusterSelector": {"ray.io/cluster": "shared"}},
    }
    base.update(copy.deepcopy(spec))
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AugmentationRun", "metadata": {"name": name}, "spec": base}
