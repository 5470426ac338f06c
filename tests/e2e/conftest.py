"""Fixtures for end-to-end tests against real Kubernetes.

`control_plane`: kube-apiserver + etcd only (fast, no kubelet), with KubeRay's real CRDs installed. There
are no controllers: pods never run, nothing is garbage collected, and deleted namespaces stay Terminating
forever, so every test works in its own fresh namespace (fixture `namespace`).

`node`: the real single-node cluster of tests/cluster/node.py (kubelet, containerd, kube-proxy, CoreDNS,
the KubeRay operator) with the locally built images imported: pods really run. One per session; a node
that is already up (`make cluster`) is used as it is and left up.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import yaml
from kubernetes import client, dynamic
from kubernetes import config as k8s_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY_CRDS = REPO.parent / "shared" / "kuberay"  # data shared between projects; read in place
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from controlplane import ControlPlane  # noqa: E402
import node as node_mod  # noqa: E402

# What `make images` builds (scripts/build-images.sh); the node imports them from dockerd.
NODE_IMAGES = ("llm2llm/operator:dev", "llm2llm/job-cpu:dev", "llm2llm/mlflow:dev")  # make images


def pytest_collection_modifyitems(items):
    # Everything under tests/e2e needs the control plane: mark it `e2e` (declared in pytest.ini).
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Cluster:
    cp: ControlPlane
    api: client.ApiClient  # admin (system:masters)

    @property
    def kubeconfig(self) -> Path:
        return self.cp.kubeconfig

    @cached_property
    def dyn(self) -> dynamic.DynamicClient:
        """Dict-in, dict-out client, handy for CRDs, custom resources and server-side apply."""
        return dynamic.DynamicClient(self.api)

    @cached_property
    def tools_bin(self) -> Path:
        """Bin dir holding helm and kubectl (installed once per machine, on first use)."""
        out = subprocess.run([str(REPO / "scripts" / "install-kubetools.sh")], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        return Path(out.strip().splitlines()[-1])

    def impersonating(self, user: str) -> client.ApiClient:
        """An ApiClient acting as `user` (e.g. system:serviceaccount:NS:NAME) via impersonation."""
        api = k8s_config.new_client_from_config(str(self.kubeconfig))
        api.set_default_header("Impersonate-User", user)
        return api

    def new_namespace(self, prefix: str = "t") -> str:
        """Creates a uniquely named namespace and returns its name."""
        prefix = "".join(c if c.isalnum() else "-" for c in prefix.lower()).strip("-")[:40]
        name = f"{prefix or 't'}-{secrets.token_hex(3)}"
        client.CoreV1Api(self.api).create_namespace({"metadata": {"name": name}})
        return name

    def apply(self, manifest: dict) -> dict:
        """Server-side apply of one manifest (no 256 KiB last-applied annotation, unlike kubectl
        client-side apply, which KubeRay's CRDs exceed)."""
        res = self.dyn.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        return self.dyn.server_side_apply(
            res, body=manifest, namespace=manifest["metadata"].get("namespace"),
            field_manager="llm2llm-tests", force_conflicts=True).to_dict()

    def wait_crd_established(self, name: str, timeout: float = 60.0) -> None:
        crds = self.dyn.resources.get(api_version="apiextensions.k8s.io/v1",
                                      kind="CustomResourceDefinition")
        deadline = time.monotonic() + timeout
        while True:
            conds = crds.get(name=name).to_dict().get("status", {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conds):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {timeout}s: {conds}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> Cluster:
    workdir = tmp_path_factory.mktemp("controlplane")
    # `with` stops etcd and the apiserver however the session ends (start() cleans up itself).
    with ControlPlane(workdir) as cp:
        api = k8s_config.new_client_from_config(str(cp.kubeconfig))
        cluster = Cluster(cp, api)
        try:
            names = []
            for path in sorted(KUBERAY_CRDS.glob("ray.io_*.yaml")):
                crd = yaml.safe_load(path.read_text())
                cluster.apply(crd)
                names.append(crd["metadata"]["name"])
            for name in names:
                cluster.wait_crd_established(name)
            yield cluster
        finally:
            api.close()
    # Keep the logs for debugging but not the etcd data (the WAL alone preallocates 64 MiB).
    shutil.rmtree(workdir / "etcd-data", ignore_errors=True)


@pytest.fixture
def namespace(control_plane, request) -> str:
    """A fresh namespace for this test. Not deleted: without controllers it would only sit in
    Terminating, and every test gets a new one anyway."""
    return control_plane.new_namespace(request.node.name)


@pytest.fixture
def kubectl(control_plane):
    """kubectl(*args, input=None, check=True) -> CompletedProcess with text stdout/stderr."""
    exe = control_plane.tools_bin / "kubectl"
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}

    def run(*args: str, input: str | None = None, check: bool = True):
        return subprocess.run([str(exe), *args], input=input, check=check, env=env, text=True,
                              capture_output=True, timeout=120)

    return run


@dataclass
class NodeCluster:
    """The real node: a kubeconfig, kubectl and helm bound to it."""
    kubeconfig: Path
    tools_bin: Path
    owned: node_mod.Node | None  # None when the node was up before the session (left running)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300):
        return subprocess.run([str(self.tools_bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, check=check, text=True, capture_output=True, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300):
        return subprocess.run([str(self.tools_bin / "helm"), f"--kubeconfig={self.kubeconfig}", *args],
                              check=check, text=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def node(tmp_path_factory) -> NodeCluster:
    tools = node_mod.kubetools_bin()
    state = node_mod._live_state()
    if state is not None:
        # The pause image too: a node under disk pressure may have had it reclaimed (it cannot be pulled here).
        node_mod.Node(state["dir"]).load_images((node_mod.PAUSE_IMAGE, *NODE_IMAGES))
        yield NodeCluster(Path(state["kubeconfig"]), tools, None)
        return
    n = node_mod.Node(tmp_path_factory.mktemp("node")).start(images=NODE_IMAGES)
    try:
        yield NodeCluster(n.kubeconfig, tools, n)
    finally:
        n.stop()
