"""The Ray Jobs API launcher: iteration jobs as Ray job submissions, used by ``llm2llm run`` (against its
private head) and by the operator's jobs-api launcher (against a cluster's dashboard).

The planner's deterministic job names are the submission ids: submitting a name that exists is a no-op, so a
retried submit cannot make a second job.
"""

from __future__ import annotations

import logging
from typing import Any

from .control import JobRequest, Transient
from .planner import JobObservation

log = logging.getLogger(__name__)

_RAY_STATES = {
    "PENDING": "Pending",
    "RUNNING": "Running",
    "SUCCEEDED": "Succeeded",
    "FAILED": "Failed",
    "STOPPED": "Failed",
}
# What JobSubmissionClient raises when the dashboard is down or answers an error.
_RAY_ERRORS = (OSError, RuntimeError)


class JobsApiLauncher:
    kind = "jobs-api"

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        try:
            self.client = JobSubmissionClient(address)
        except _RAY_ERRORS as err:
            raise Transient(f"Ray dashboard {address} unreachable: {err}") from err

    def submit(self, job: JobRequest) -> bool:
        """Returns False when a job with this name already existed."""
        try:
            if self._info(job.name) is not None:
                return False
            try:
                self.client.submit_job(entrypoint=job.entrypoint, submission_id=job.name,
                                       runtime_env={"env_vars": job.env}, metadata=job.labels)
            except RuntimeError:
                # Lost a race with another submitter of the same name: that job is ours.
                if self._info(job.name) is not None:
                    return False
                raise
        except _RAY_ERRORS as err:
            raise Transient(f"cannot submit job {job.name} to {self.address}: {err}") from err
        return True

    def _info(self, name: str) -> Any | None:
        try:
            return self.client.get_job_info(name)
        except RuntimeError as err:
            if "does not exist" in str(err) or "404" in str(err):
                return None
            raise

    def observe(self, name: str, iteration: int, attempt: int) -> JobObservation | None:
        try:
            info = self._info(name)
        except _RAY_ERRORS as err:
            raise Transient(f"cannot observe job {name} at {self.address}: {err}") from err
        if info is None:
            return None
        phase = _RAY_STATES.get(str(info.status).split(".")[-1], "Running")
        message = info.message or ""
        if phase == "Failed" and info.error_type:
            message = f"{info.error_type}: {message}"
        return JobObservation(iteration=iteration, attempt=attempt, phase=phase, message=message[-500:])  # type: ignore[arg-type]

    def stop(self, name: str) -> None:
        try:
            if self._info(name) is not None:
                self.client.stop_job(name)
        except _RAY_ERRORS as err:
            raise Transient(f"cannot stop job {name} at {self.address}: {err}") from err

    def logs(self, name: str) -> str:
        return self.client.get_job_logs(name)
