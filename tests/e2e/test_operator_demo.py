"""End to end on a cluster: `kubectl apply -f examples/demo/run.yaml` -> the operator runs every
iteration as a real Ray job (Jobs API launcher) with real training on a local Ray head -> Succeeded.

The control plane has no kubelet, so Ray runs beside it on this machine: the private head `llm2llm run`
starts (`llm2llm.localray`, `ray start --head --block` on free ports).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from llm2llm.localray import LocalRayHead
from tests.e2e.test_operator_harness import REPO, Api, augrun_crd, operator, wait_for  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]


@pytest.fixture
def ray_head():
    """A local Ray head on free ports (the one `llm2llm run` starts); yields its dashboard address."""
    with LocalRayHead(4) as address:
        yield address


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
