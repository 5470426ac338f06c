"""End to end on a cluster: `kubectl apply -f examples/demo/run.yaml` -> the operator runs every
iteration as a real Ray job (Jobs API launcher) with real training on a local Ray head -> Succeeded.

The control plane has no kubelet, so Ray runs beside it on this machine, as a head started with
`ray start --head --block` (its processes share its fate: killing it stops them all).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.test_operator_harness import REPO, Api, augrun_crd, operator, wait_for  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from controlplane import _die_with_parent, free_ports, tail  # noqa: E402


@pytest.fixture
def ray_head(tmp_path):
    """A local Ray head; yields its dashboard address. RAY_AUTH_MODE=disabled on both sides (conftest)."""
    # Every port explicit: the dashboard agent's default (52365) clashes with any other Ray on the machine,
    # and then the Jobs API answers "No available agent to submit job" forever.
    gcs, dashboard, agent = free_ports(3)
    temp = tempfile.mkdtemp(prefix="rayop-")  # short: Ray's socket paths must fit in 107 bytes
    log = tmp_path / "ray-head.log"
    ray = Path(sys.executable).with_name("ray")
    argv = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=4",
            f"--temp-dir={temp}", "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"}, preexec_fn=_die_with_parent)
    address = f"http://127.0.0.1:{dashboard}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ray head exited {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(up, "the Ray dashboard", timeout=180, every=0.5)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def base_dir(tmp_path) -> Path:
    """The operator's --base-dir: relative paths in run.yaml (examples/demo/..., output `runs`) resolve
    here, so the run reads the repo's demo data and writes into the test's tmp."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "examples").symlink_to(REPO / "examples")
    return base


def test_demo_run_yaml_on_the_operator(control_plane, operator, namespace, kubectl, ray_head, base_dir):
    operator(namespace, "--default-launcher", "jobs-api", "--ray-address", ray_head,
             "--job-python", sys.executable, "--base-dir", str(base_dir))
    started = time.monotonic()
    kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "demo" / "run.yaml"))
    api = Api(control_plane, namespace)

    def finished():
        st = api.status("demo")
        return st.get("phase") in ("Succeeded", "Failed") and st

    st = wait_for(finished, "the demo run to finish", timeout=2100, every=5)
    elapsed = time.monotonic() - started
    logs = _job_logs(ray_head, [j["name"] for j in st.get("jobs", [])])
    assert st["phase"] == "Succeeded", f"{st}\n{logs}"
    print(f"\ndemo on the operator: {len(st['iterations'])} iteration(s) in {elapsed:.0f}s")

    its = st["iterations"]
    assert its and all(it["job"] for it in its)
    assert len({it["job"] for it in its}) == len(its)  # one Ray job per iteration
    assert (base_dir / "runs" / "demo" / "iter-0" / "_ITERATION.json").exists()
    header, row = [re.split(r"\s{2,}", line.strip()) for line in
                   kubectl("get", "augruns", "-n", namespace).stdout.strip().splitlines()][:2]
    assert header[:6] == ["NAME", "PHASE", "ITERATION", "SEED-ACC", "TEST-ACC", "AUGMENTED"]
    assert row[0] == "demo" and row[1] == "Succeeded" and len(row) >= 7, row  # every column filled
    reasons = api.event_reasons("demo")
    assert "IterationSucceeded" in reasons and "RunSucceeded" in reasons, reasons


def _job_logs(address: str, names: list[str]) -> str:
    """The tail of each job's driver log, for the failure message."""
    try:
        from ray.job_submission import JobSubmissionClient

        c = JobSubmissionClient(address)
        return "\n".join(f"--- {n}:\n{c.get_job_logs(n)[-4000:]}" for n in names)
    except Exception as err:  # noqa: BLE001 - diagnostics only
        return f"(no job logs: {err})"
