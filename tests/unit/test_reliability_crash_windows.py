"""The operator's crash windows, made deterministic: reconcile() with in-memory fakes, where a "crash" is a
reconcile whose outcome is thrown away after it acted (the RayJob created or deleted, the status never written).
The same happens without a crash when the status write fails (handlers._write_status raises Transient after
reconcile() already acted). The e2e test (tests/e2e/test_reliability_crash.py) kills the real process at
observable points; these windows are too narrow to hit there on purpose.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from llm2llm.planner import Launch, Stop, job_name
from llm2llm_operator.reconcile import Context, reconcile
from llm2llm_operator.settings import Settings


class FakeCustom:
    """RayJobs in memory, with the API server's 404/409; counts creates that made a new object."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.created: list[str] = []

    def create_namespaced_custom_object(self, group, version, ns, plural, body, **_):
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.jobs[name] = copy.deepcopy(body)
        self.created.append(name)

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        if name not in self.jobs:
            raise ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.jobs[name])

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, **_):
        if self.jobs.pop(name, None) is None:
            raise ApiException(status=404, reason="NotFound")


class FakeCore:
    def read_namespaced_secret(self, name, ns):
        raise ApiException(status=404, reason="NotFound")

    def read_namespaced_config_map(self, name, ns):
        raise ApiException(status=404, reason="NotFound")


class Run:
    """One AugmentationRun as the API server holds it; `tick()` is one reconcile whose status is written,
    `crash()` one whose status write never happens."""

    def __init__(self, tmp_path, **spec: Any):
        self.ctx = Context(Settings(), FakeCore(), FakeCustom())
        self.body: dict[str, Any] = {
            "metadata": {"name": "win", "namespace": "ns", "uid": "uid-w", "generation": 1},
            "spec": {"data": {"seed": "/data/seed.jsonl"}, "output": str(tmp_path / "out"),
                     "ray": {"launcher": "rayjob", "clusterSelector": {"ray.io/cluster": "shared"}}, **spec},
        }
        self.events: list[str] = []

    def job(self, iteration: int, attempt: int) -> str:
        return job_name("win", "uid-w", iteration, attempt)

    def tick(self):
        out = reconcile(copy.deepcopy(self.body), self.ctx)
        if out.status is not None:
            self.body["status"] = out.status
        self.events += [e.reason for e in out.events]
        return out

    def crash(self):
        return reconcile(copy.deepcopy(self.body), self.ctx)  # acted; the status and events are lost

    def set_spec(self, **spec: Any) -> None:
        self.body["spec"].update(spec)
        self.body["metadata"]["generation"] += 1

    def kuberay(self, name: str, deployment: str, job: str) -> None:
        self.ctx.custom.jobs[name]["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job}

    def jobs(self) -> list[tuple[str, str]]:
        return [(j["name"], j["state"]) for j in self.body.get("status", {}).get("jobs", [])]


def test_crash_after_create_before_status_makes_no_second_rayjob(tmp_path):
    run = Run(tmp_path)
    first = run.crash()
    assert isinstance(first.action, Launch) and first.submitted
    again = run.tick()  # the restarted operator plans the same Launch: 409, adopted
    assert isinstance(again.action, Launch) and not again.submitted
    assert run.ctx.custom.created == [run.job(0, 1)]
    assert run.jobs() == [(run.job(0, 1), "Pending")]


def test_crash_after_deadline_stop_counts_the_attempt_once(tmp_path):
    run = Run(tmp_path, activeDeadlineSeconds=1, retry={"maxAttempts": 2, "backoffSeconds": 0})
    run.tick()
    a1 = run.job(0, 1)
    run.kuberay(a1, "Running", "RUNNING")
    run.tick()
    run.body["status"]["jobs"][0]["submittedAt"] = "2000-01-01T00:00:00Z"  # long past its deadline
    run.body["status"]["activeJob"]["submittedAt"] = "2000-01-01T00:00:00Z"
    stop = run.crash()
    assert isinstance(stop.action, Stop) and a1 not in run.ctx.custom.jobs
    run.tick()  # a1 is now simply gone: Missing, which counts as the failed attempt it was
    assert run.jobs()[0] == (a1, "Missing")
    run.tick()
    assert run.ctx.custom.created == [a1, run.job(0, 2)]
    assert run.body["status"]["phase"] == "Running"


def test_crash_between_suspend_stop_and_status_write(tmp_path):
    run = Run(tmp_path, retry={"maxAttempts": 1, "backoffSeconds": 0})
    run.tick()
    a1 = run.job(0, 1)
    run.kuberay(a1, "Running", "RUNNING")
    run.tick()
    run.set_spec(suspend=True)
    stop = run.crash()
    assert isinstance(stop.action, Stop) and a1 not in run.ctx.custom.jobs
    run.tick()
    assert run.body["status"]["phase"] == "Suspended"
    run.set_spec(suspend=False)
    run.tick()
    outcome = (run.jobs(), run.body["status"]["phase"], run.events)
    assert run.jobs()[0] == (a1, "Suspended"), outcome
    assert "JobFailed" not in run.events, outcome
    assert run.body["status"]["phase"] == "Running" and run.ctx.custom.created == [a1, run.job(0, 2)], outcome


def test_without_the_crash_suspend_does_not_use_up_an_attempt(tmp_path):
    """The control for the xfail above: the same steps, status written every time."""
    run = Run(tmp_path, retry={"maxAttempts": 1, "backoffSeconds": 0})
    run.tick()
    a1 = run.job(0, 1)
    run.kuberay(a1, "Running", "RUNNING")
    run.tick()
    run.set_spec(suspend=True)
    run.tick()
    run.set_spec(suspend=False)
    run.tick()
    assert run.jobs() == [(a1, "Suspended"), (run.job(0, 2), "Pending")]
    assert "JobFailed" not in run.events and run.body["status"]["phase"] == "Running"
