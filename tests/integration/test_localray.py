"""The private Ray head `llm2llm run` starts: two at once on one machine both work (Ray's default ports
would clash), and each leaves no process behind."""

from __future__ import annotations

import time

import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from llm2llm.localray import LocalRayHead

pytestmark = pytest.mark.integration


def _run(address: str) -> str:
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint="python -c 'print(6 * 7)'")
    deadline = time.monotonic() + 300
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "job never finished"
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)
    return client.get_job_logs(job)


def _processes_of(temp_dir: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]


def test_two_local_heads_side_by_side_and_nothing_left_behind():
    first, second = LocalRayHead(2), LocalRayHead(2)
    try:
        a, b = first.start(), second.start()
        assert a != b
        temps = [first._temp, second._temp]
        assert all(_processes_of(t) for t in temps)
        assert "42" in _run(a) and "42" in _run(b)
    finally:
        first.stop()
        second.stop()
    deadline = time.monotonic() + 30
    while any(_processes_of(t) for t in temps) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_processes_of(t) for t in temps)
