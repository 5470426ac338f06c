"""What an iteration job is (entrypoint, environment) and the Ray Jobs API launcher.

The local runner and the operator's jobs-api launcher both submit through ``JobsApiLauncher``; the
operator's RayJob launcher builds the same entrypoint into a manifest.
"""

from __future__ import annotations

import base64
import json
import logging
import shlex
from typing import Any

from .planner import JobObservation
from .spec import AugmentationRunSpec, spec_to_wire

log = logging.getLogger(__name__)

# The job reads the teacher's API key from this variable; it is filled from a Secret (operator) or
# inherited from the user's shell (local runner), never passed as a job argument or runtime_env value.
API_KEY_ENV = "LLM2LLM_TEACHER_API_KEY"

_CPU_ENV = {
    "DS_ACCELERATOR": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
}
_ALWAYS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def encode_run(name: str, uid: str, spec: AugmentationRunSpec) -> str:
    """The job's --run argument: compact and shell-safe; the job needs nothing else."""
    doc = {"name": name, "uid": uid, "spec": spec_to_wire(spec)}
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode_run(arg: str) -> tuple[str, str, AugmentationRunSpec]:
    doc = json.loads(base64.urlsafe_b64decode(arg.encode()))
    return doc["name"], doc["uid"], AugmentationRunSpec.model_validate(doc["spec"])


def entrypoint(name: str, uid: str, spec: AugmentationRunSpec, iteration: int, attempt: int, python: str = "python") -> str:
    args = [python, "-m", "llm2llm_jobs.iteration", "--run", encode_run(name, uid, spec),
            "--iteration", str(iteration), "--attempt", str(attempt)]
    return shlex.join(args)


def job_env(spec: AugmentationRunSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the job's processes (no secrets)."""
    env = dict(_ALWAYS_ENV)
    if spec.student.gpus_per_worker == 0:
        env.update(_CPU_ENV)
    env.update(extra or {})
    return env


_RAY_STATES = {
    "PENDING": "Pending",
    "RUNNING": "Running",
    "SUCCEEDED": "Succeeded",
    "FAILED": "Failed",
    "STOPPED": "Failed",
}


class JobsApiLauncher:
    """Submits iteration jobs to a Ray cluster's Jobs API with the planner's deterministic names as
    submission ids: submitting a name that exists is a no-op, so a retried submit cannot make a second job."""

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.client = JobSubmissionClient(address)

    def submit(self, name: str, entrypoint: str, env: dict[str, str], metadata: dict[str, str]) -> bool:
        """Returns False when a job with this name already existed."""
        if self._info(name) is not None:
            return False
        try:
            self.client.submit_job(entrypoint=entrypoint, submission_id=name, runtime_env={"env_vars": env},
                                   metadata=metadata)
        except RuntimeError as err:
            # Lost a race with another submitter of the same name: that job is ours.
            if self._info(name) is not None:
                return False
            raise err
        return True

    def _info(self, name: str) -> Any | None:
        try:
            return self.client.get_job_info(name)
        except RuntimeError as err:
            if "does not exist" in str(err) or "404" in str(err):
                return None
            raise

    def observe(self, name: str, iteration: int, attempt: int) -> JobObservation | None:
        info = self._info(name)
        if info is None:
            return None
        phase = _RAY_STATES.get(str(info.status).split(".")[-1], "Running")
        message = info.message or ""
        if phase == "Failed" and info.error_type:
            message = f"{info.error_type}: {message}"
        return JobObservation(iteration=iteration, attempt=attempt, phase=phase, message=message[-500:])  # type: ignore[arg-type]

    def stop(self, name: str) -> None:
        if self._info(name) is not None:
            self.client.stop_job(name)

    def logs(self, name: str) -> str:
        return self.client.get_job_logs(name)
