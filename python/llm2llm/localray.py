"""A private Ray head for `llm2llm run`: started for the run, on its own free ports, stopped after it.

``ray.init()`` would be simpler, but its dashboard agent always listens on Ray's default port (52365):
a second Ray on the same machine (another run, a notebook) then makes the Jobs API answer "No available
agent to submit job" forever. ``ray start --head`` lets every port be chosen, and ``--block`` ties the
head's processes to one process we can stop.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


class RayStartError(RuntimeError):
    """The local Ray head did not come up."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # all held open until all are picked, so they differ
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalRayHead:
    """``with LocalRayHead(num_cpus) as address:`` a Jobs API address on loopback."""

    def __init__(self, num_cpus: int, *, timeout: float = 180.0):
        self.num_cpus = num_cpus
        self.timeout = timeout
        self.address: str | None = None
        self._proc: subprocess.Popen | None = None
        self._temp: str | None = None
        self._log: Path | None = None

    def start(self) -> str:
        gcs, dashboard, agent, metrics = _free_ports(4)
        # Short: Ray's socket paths must fit in 107 bytes.
        self._temp = tempfile.mkdtemp(prefix="llm2llm-ray-")
        self._log = Path(self._temp) / "head.log"
        ray = Path(sys.executable).with_name("ray")
        argv = [str(ray) if ray.exists() else "ray", "start", "--head", "--block",
                "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                f"--num-cpus={self.num_cpus}", f"--temp-dir={self._temp}", "--disable-usage-stats"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.setdefault("RAY_AUTH_MODE", "disabled")
        with open(self._log, "wb") as out:
            self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        self.address = f"http://127.0.0.1:{dashboard}"
        self.gcs_address = f"127.0.0.1:{gcs}"  # what a driver's ray.init(address=...) takes
        deadline = time.monotonic() + self.timeout
        while not self._up():
            if time.monotonic() > deadline:
                self.stop()
                raise RayStartError(f"the local Ray head did not answer within {self.timeout:.0f}s")
            time.sleep(0.5)
        self._wait_until_it_takes_jobs(deadline)
        log.info("local Ray head at %s (temp dir %s)", self.address, self._temp)
        return self.address

    def _wait_until_it_takes_jobs(self, deadline: float) -> None:
        """The dashboard answers before its job agent has registered; until then a submission fails with
        "No available agent to submit job" (seen for tens of seconds on a loaded machine). Ready means a
        no-op job went through: the head is private, so its record bothers no one."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.address)
        while True:
            try:
                job = client.submit_job(entrypoint="true")
                break
            except (RuntimeError, OSError) as err:  # OSError: requests' ConnectionError while the agent starts
                if self._proc is not None and self._proc.poll() is not None:
                    self._up()  # the head died: raise with its log
                if time.monotonic() > deadline:
                    self.stop()
                    raise RayStartError(f"the local Ray head takes no job after {self.timeout:.0f}s: {err}") from None
                time.sleep(2)
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if time.monotonic() > deadline:
                self.stop()
                raise RayStartError(f"the local Ray head's probe job did not finish within {self.timeout:.0f}s")
            time.sleep(0.5)

    def _up(self) -> bool:
        assert self._proc is not None and self._log is not None
        code = self._proc.poll()
        if code is not None:
            tail = self._log.read_text(errors="replace")[-3000:]
            self.stop()
            raise RayStartError(f"`ray start --head` exited with {code}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGTERM to the blocking `ray start` makes it stop the head's processes; the group kill is
            # the backstop for any that linger.
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
