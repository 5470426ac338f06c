"""The Jobs API launcher end to end: `kubectl apply` of a run -> the operator submits every iteration as a
real Ray job to an existing Ray cluster's dashboard -> real (tiny) training and inference -> Succeeded.

The control plane has no kubelet, so Ray runs beside it on this machine: the private head `llm2llm run`
starts (`llm2llm.localray`, `ray start --head --block` on free ports). The full demo through the chart,
KubeRay and Ray pods is tests/e2e/test_node.py; this one keeps the other launcher honest, on the smallest
real run (tests/integration/tiny.py) so it costs a minute or two, not the demo's several.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from llm2llm.localray import LocalRayHead
from tests.e2e.test_operator_harness import REPO, Api, augrun_crd, operator, wait_for  # noqa: F401
from tests.integration.tiny import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


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


def test_a_run_on_the_jobs_api_launcher(control_plane, operator, namespace, kubectl, ray_head, base_dir):
    operator(namespace, "--default-launcher", "jobs-api", "--ray-address", ray_head,
             "--job-python", sys.executable, "--base-dir", str(base_dir))
    started = time.monotonic()
    # Relative paths, as a user writes them: they resolve against the operator's --base-dir.
    spec = tiny_spec("runs", ray={"launcher": "local"})
    spec["data"].update(seed="examples/demo/seed.jsonl", test="examples/demo/test.jsonl")
    doc = {"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun", "metadata": {"name": "demo"},
           "spec": spec}
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    api = Api(control_plane, namespace)

    def finished():
        st = api.status("demo")
        return st.get("phase") in ("Succeeded", "Failed") and st

    st = wait_for(finished, "the run to finish", timeout=1200, every=3)
    elapsed = time.monotonic() - started
    logs = _job_logs(ray_head, [j["name"] for j in st.get("jobs", [])])
    assert st["phase"] == "Succeeded", f"{st}\n{logs}"
    print(f"\njobs-api run on the operator: {len(st['iterations'])} iteration(s) in {elapsed:.0f}s")

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
