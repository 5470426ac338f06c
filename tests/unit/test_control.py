"""One suite, two callers: `llm2llm run` (LocalRunner.tick, status.json) and the operator (reconcile(), the
resource's status) must decide the same on the same inputs, since both are the control core
(llm2llm.control.step) with a different status store. Each scenario runs against both; the launcher is the
same fake Ray Jobs API (a job table), so only the two callers differ.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm2llm.control import LABEL_ATTEMPT, LABEL_ITERATION, LABEL_RUN, LABEL_RUN_UID
from llm2llm.launch import decode_run
from llm2llm.planner import Backoff, Idle, Launch, Stop, Wait, job_name
from llm2llm.runner import LocalRunner
from llm2llm.spec import parse_run
from llm2llm.status import IterationStatus
from llm2llm.status import RunStatus
from llm2llm.storage import RunStorage, StorageError
from llm2llm_operator.reconcile import Context, reconcile
from llm2llm_operator.settings import Settings
from tests.unit.test_operator_reconcile import FakeCore, FakeCustom

ADDRESS = "http://head.test:8265"


class FakeRay:
    """A Ray cluster's job table. ``stop`` marks a job stopping; it ends only when the test says so."""

    kind = "jobs-api"

    def __init__(self, address: str = ADDRESS):
        self.address = address
        self.jobs: dict[str, dict[str, Any]] = {}
        self.stops: list[str] = []

    def submit(self, job) -> bool:
        if job.name in self.jobs:
            return False
        self.jobs[job.name] = {"phase": "Pending", "job": job}
        return True

    def observe(self, name, iteration, attempt):
        from llm2llm.planner import JobObservation

        rec = self.jobs.get(name)
        return None if rec is None else JobObservation(iteration, attempt, rec["phase"], rec.get("message", ""))

    def stop(self, name):
        self.stops.append(name)
        if name in self.jobs and self.jobs[name]["phase"] in ("Pending", "Running"):
            self.jobs[name]["stopping"] = True


def _doc(out, **spec) -> dict[str, Any]:
    base = {"task": {"kind": "gsm8k"}, "data": {"seed": "/jobs-only/seed.jsonl"}, "output": str(out),
            "loop": {"maxIterations": 2}, "retry": {"maxAttempts": 3, "backoffSeconds": 0},
            "ray": {"launcher": "jobs-api", "address": ADDRESS}}
    base.update(spec)
    return {"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun", "metadata": {"name": "same"}, "spec": base}


class Local:
    """``llm2llm run``: the runner's own tick, its status in status.json."""

    name = "local"

    def __init__(self, out, ray: FakeRay, **spec):
        self.ray = ray
        self.runner = LocalRunner(parse_run(_doc(out, **spec)), echo=lambda line: None)
        self.store = self.runner.store

    @property
    def uid(self) -> str:
        return self.runner._uid()

    def status_doc(self) -> dict | None:
        return self.store.read_json(self.store.path("status.json"))

    def step(self):
        from llm2llm.control import read_status

        try:
            status = read_status(self.store)
        except StorageError:
            status = RunStatus()
        r = self.runner.tick(self.ray, status)
        return r.action, r.events, r.status.wire()

    def spec(self, **changes):
        run = parse_run(_doc(self.store.output, **changes))
        self.runner.spec = self.runner.run.spec = run.spec

    def corrupt_status(self):
        self.store.fs.pipe_file(self.store.path("status.json"), b'{"phase": "Runn')


class Operator:
    """The operator: reconcile() on the resource, its status written back as the handler does."""

    name = "operator"

    def __init__(self, out, ray: FakeRay, **spec):
        self.ray = ray
        self.body = _doc(out, **spec)
        self.body["metadata"].update(namespace="ns", uid="7d1c2c9e-0000-4000-8000-000000000001", generation=1)
        self.ctx = Context(Settings(allowed_ray_addresses=(ADDRESS,)), FakeCore(), FakeCustom(), jobs_api=lambda a: ray)
        self.store = RunStorage(str(out), "same")

    @property
    def uid(self) -> str:
        return self.body["metadata"]["uid"]

    def status_doc(self) -> dict | None:
        return self.body.get("status")

    def step(self):
        out = reconcile(self.body, self.ctx)
        if out.status is not None:
            self.body["status"] = out.status
        return out.action, out.events, self.body.get("status")

    def spec(self, **changes):
        self.body["spec"].update(changes)
        self.body["metadata"]["generation"] += 1

    def corrupt_status(self):
        self.body["status"] = {"phase": 42, "jobs": "not a list"}


@pytest.fixture(params=[Local, Operator], ids=["local", "operator"])
def caller(request, tmp_path):
    def make(**spec):
        return request.param(tmp_path / request.param.name, FakeRay(), **spec)
    return make


def _comparable(status: dict) -> dict:
    """The status without what differs by nature: times, generations, the run's uid in job names."""
    drop = {"submittedAt", "finishedAt", "startedAt", "lastTransitionTime", "observedGeneration", "output", "name", "job"}

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in drop}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return clean(status)


def _commit(c, index: int, attempt: int = 1, failures: int = 2):
    c.store.write_iteration(IterationStatus(index=index, attempt=attempt, seed_accuracy=0.5, failures=failures,
                                            kept=3, train_rows=10))


# --- the scenarios ---------------------------------------------------------------------------------------

def test_first_step_launches_one_job_with_the_same_name_labels_and_run(caller):
    c = caller()
    action, events, status = c.step()
    name = job_name("same", c.uid, 0, 1)
    assert isinstance(action, Launch) and action.name == name and list(c.ray.jobs) == [name]
    job = c.ray.jobs[name]["job"]
    assert {k: job.labels[k] for k in (LABEL_RUN, LABEL_RUN_UID, LABEL_ITERATION, LABEL_ATTEMPT)} == {
        LABEL_RUN: "same", LABEL_RUN_UID: c.uid, LABEL_ITERATION: "0", LABEL_ATTEMPT: "1"}
    run_name, uid, spec = decode_run(job.entrypoint.split("--run ")[1].split()[0])
    assert (run_name, uid, spec.output) == ("same", c.uid, str(c.store.output))
    assert [e.reason for e in events] == ["IterationStarted"]
    assert status["phase"] == "Running" and status["activeJob"]["name"] == name
    ready = next(x for x in status["conditions"] if x["type"] == "Ready")
    assert ready["status"] == "True"
    # A second step while the job is pending: wait, no second job.
    action, _, _ = c.step()
    assert isinstance(action, Wait) and len(c.ray.jobs) == 1


def test_failure_backs_off_then_retries_from_the_next_attempt(caller):
    c = caller(retry={"maxAttempts": 2, "backoffSeconds": 0})
    c.step()
    a1 = job_name("same", c.uid, 0, 1)
    c.ray.jobs[a1].update(phase="Failed", message="OOM")
    action, events, status = c.step()
    assert "JobFailed" in [e.reason for e in events]
    a2 = job_name("same", c.uid, 0, 2)
    if isinstance(action, Backoff):  # backoff 0: the retry may come on this step or the next
        action, _, status = c.step()
    assert isinstance(action, Launch) and action.name == a2 and sorted(c.ray.jobs) == sorted([a1, a2])
    c.ray.jobs[a2].update(phase="Failed", message="OOM again")
    _, events, status = c.step()
    assert status["phase"] == "Failed" and status["stopReason"] == "IterationFailed" and "OOM again" in str(status)


def test_committed_iterations_are_recorded_and_the_next_one_launched(caller):
    c = caller()
    c.step()
    _commit(c, 0)
    c.ray.jobs[job_name("same", c.uid, 0, 1)]["phase"] = "Succeeded"
    action, events, status = c.step()
    assert isinstance(action, Launch) and action.iteration == 1
    assert status["iterations"][0]["kept"] == 3 and status["augmentedRows"] == 3
    assert "IterationSucceeded" in [e.reason for e in events]
    _commit(c, 1)
    c.ray.jobs[job_name("same", c.uid, 1, 1)]["phase"] = "Succeeded"
    action, events, status = c.step()
    assert status["phase"] == "Succeeded" and status["stopReason"] == "MaxIterations"
    assert "RunSucceeded" in [e.reason for e in events]
    action, events, _ = c.step()
    assert isinstance(action, Idle) and events == []


def test_a_corrupt_status_is_rebuilt_and_no_second_job_is_made(caller):
    c = caller()
    c.step()
    _commit(c, 0)
    c.corrupt_status()
    action, _, status = c.step()
    # Storage still has iteration 0 and the launcher still has its job: nothing is lost or doubled.
    assert status["iterations"][0]["index"] == 0
    assert len([j for j in c.ray.jobs if "-i0-" in j]) == 1


def test_unreachable_storage_is_ready_false_and_launches_nothing(caller, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("where the output folder should be")
    c = caller(output=str(blocker / "runs"))
    action, events, status = c.step()
    assert action is None and c.ray.jobs == {}
    ready = next(x for x in status["conditions"] if x["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "StorageUnavailable") and str(blocker) in ready["message"]
    assert [e.reason for e in events] == ["StorageUnavailable"] and status["phase"] == "Pending"


def test_a_stopped_job_is_waited_for_before_the_next_attempt(caller):
    c = caller()
    c.step()
    a1 = job_name("same", c.uid, 0, 1)
    c.ray.jobs[a1]["phase"] = "Running"
    c.step()
    c.spec(suspend=True)
    action, events, status = c.step()
    assert isinstance(action, Stop) and action.name == a1 and status["phase"] == "Suspended"
    assert status["jobs"][0]["state"] == "Suspended" and status["jobs"][0]["releasing"] is True
    # Resumed while the old job is still winding down: ask it to stop again, and launch nothing.
    c.spec(suspend=False)
    for _ in range(3):
        action, events, status = c.step()
        assert isinstance(action, Stop) and not action.announce and action.name == a1
        assert list(c.ray.jobs) == [a1]
        assert next(x for x in status["conditions"] if x["type"] == "Progressing")["reason"] == "WaitingForStop"
    c.ray.jobs[a1]["phase"] = "Failed"  # it ended (ray job stop: STOPPED)
    action, _, status = c.step()
    assert isinstance(action, Launch) and action.attempt == 2 and "releasing" not in status["jobs"][0]


def test_both_callers_write_the_same_status(tmp_path):
    """The same story told to both: every status after every step is the same, modulo times and names."""
    seen = {}
    for cls in (Local, Operator):
        c = cls(tmp_path / cls.name, FakeRay())
        trace = []
        trace.append(c.step()[2])
        c.ray.jobs[job_name("same", c.uid, 0, 1)]["phase"] = "Running"
        c.store.mark_done(0, "prepare", {"seconds": 1})
        trace.append(c.step()[2])
        c.ray.jobs[job_name("same", c.uid, 0, 1)].update(phase="Failed", message="boom")
        trace.append(c.step()[2])
        trace.append(c.step()[2])
        _commit(c, 0, attempt=2)
        c.ray.jobs[job_name("same", c.uid, 0, 2)]["phase"] = "Succeeded"
        trace.append(c.step()[2])
        seen[cls.name] = [_comparable(s) for s in trace]
    for i, (a, b) in enumerate(zip(seen["local"], seen["operator"])):
        assert a == b, f"step {i}: local and operator statuses differ:\n{json.dumps(a, indent=1)}\n{json.dumps(b, indent=1)}"


def test_one_implementation_of_observe_launch_and_status():
    """The bar of the one-core refactor, as a test: neither caller has its own copy of the pieces (launchers
    have observe/submit/stop methods: what they plug in)."""
    import re
    from pathlib import Path

    import llm2llm
    import llm2llm_operator

    own = re.compile(r"^def (observe|_carry_out|_observe|job_labels|resolve_paths|_localize|load_status|_load_status)\(",
                     re.M)
    for pkg in (Path(llm2llm_operator.__file__).parent, Path(llm2llm.__file__).parent):
        for path in pkg.glob("*.py"):
            if path.name in ("control.py", "planner.py", "storage.py"):
                continue
            text = path.read_text()
            assert not own.search(text), f"{path.name} has its own {own.search(text).group(1)}"
            assert "advance(" not in text, f"{path.name} calls the planner itself"
            assert not re.search(r"write_json\([^)]*run\.json", text), f"{path.name} writes run.json itself"
