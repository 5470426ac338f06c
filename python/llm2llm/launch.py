"""What an iteration job is: its entrypoint (the run, encoded) and its environment.

Every launcher starts the same thing (``control.job_request``): the Ray Jobs API launcher
(``jobsapi.JobsApiLauncher``) submits it, the operator's RayJob launcher writes it into a manifest.
"""

from __future__ import annotations

import base64
import json
import logging
import shlex

from .spec import AugmentationRunSpec, prune_unknown, spec_to_wire

log = logging.getLogger(__name__)

# The job reads the teacher's API key from this variable; it is filled from a Secret (operator) or
# inherited from the user's shell (local runner), never passed as a job argument or runtime_env value.
API_KEY_ENV = "LLM2LLM_TEACHER_API_KEY"
# Where that key may be sent (llm2llm.endpoints), set by the key's owner beside the key: the operator copies the
# Secret's allowed-endpoints annotation, an admin sets it next to an ambient key. A key with no pin is never sent.
API_KEY_ENDPOINTS_ENV = "LLM2LLM_TEACHER_API_KEY_ENDPOINTS"

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
    """The job's side of ``encode_run``. Fields this version does not know (sent by a newer operator) are
    dropped with a warning; fields it knows but was not sent (an older operator) take their defaults."""
    doc = json.loads(base64.urlsafe_b64decode(arg.encode()))
    wire, dropped = prune_unknown(AugmentationRunSpec, doc["spec"])
    if dropped:
        log.warning("the run's spec has fields this job image does not know, ignored (the operator is newer than "
                    "the image; upgrade the image to use them): %s", ", ".join(f"spec.{p}" for p in dropped))
    return doc["name"], doc["uid"], AugmentationRunSpec.model_validate(wire)


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
