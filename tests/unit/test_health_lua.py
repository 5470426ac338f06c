"""The Argo CD health check (charts/llm2llm-operator/health.lua), run for real in Lua 5.1 (Argo CD's
gopher-lua dialect) through lupa, on statuses made by the real models: RunStatus.wire() as produced by the
pure planner (llm2llm.planner.advance, which the operator calls on every reconcile), plus the Ready=False
conditions the operator sets when it refuses a run.

To check a status captured from a real run, add it to CAPTURED below as (expected health, object).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from llm2llm.planner import JobObservation, Observed, advance, job_name
from llm2llm.spec import parse_spec
from llm2llm.status import IterationStatus, RunStatus
from tests.conftest import REPO

HEALTH_LUA = REPO / "charts" / "llm2llm-operator" / "health.lua"
ARGOCD_CM = REPO / "examples" / "gitops" / "argocd" / "argocd-cm-health.yaml"
ARGO_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
UID = "0b6c1d8e-5f44-4d7e-9a57-3f0c2a1e9b10"


def argo_health(obj: dict[str, Any], script: str | None = None) -> tuple[str, str]:
    """Runs the health script as Argo CD does: the resource as the global `obj`; returns (status, message)."""
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    # JSON round trip: only what the API server would hand Argo CD (no Python-only types).
    lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
    hs = lua.execute(script if script is not None else HEALTH_LUA.read_text())
    return hs["status"], hs["message"]


# --- statuses from the planner -------------------------------------------------------------------

SPEC = {
    "task": {"kind": "gsm8k"},
    "data": {"seed": "/data/seed.jsonl"},
    "output": "/data/out",
    "loop": {"maxIterations": 2},
    "retry": {"maxAttempts": 2, "backoffSeconds": 60},
    "ray": {"launcher": "rayjob", "clusterSelector": {"ray.io/cluster": "shared"}},
}


def _obj(status: RunStatus | dict | None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun",
        "metadata": {"name": "run", "namespace": "ml", "uid": UID, "generation": generation},
        "spec": {**SPEC, **spec},
    }
    if status is not None:
        obj["status"] = status.wire() if isinstance(status, RunStatus) else status
    return obj


def _iteration(index: int, failures: int = 3) -> IterationStatus:
    return IterationStatus(index=index, seed_accuracy=0.5 + index / 10, test_accuracy=0.4 + index / 10,
                           failures=failures, kept=2, job=job_name("run", UID, index, 1))


def _step(status: RunStatus, iterations: dict[int, IterationStatus] | None = None,
          jobs: dict[str, JobObservation] | None = None, stages: tuple[str, ...] = (),
          now: datetime | None = None, **spec: Any) -> RunStatus:
    parsed = parse_spec({**SPEC, **spec}, "ml/run")
    observed = Observed(iterations=iterations or {}, jobs=jobs or {}, stages_done=stages,
                        now=now or datetime.now(timezone.utc))
    new, _action, _events = advance(parsed, status, observed, run_name="run", run_uid=UID, generation=1)
    new.output = "/data/out/run"  # as the operator sets it
    return new


def _launched() -> RunStatus:
    return _step(RunStatus())


def _running() -> RunStatus:
    a1 = job_name("run", UID, 0, 1)
    return _step(_launched(), jobs={a1: JobObservation(0, 1, "Running")}, stages=("prepare",))


def _backing_off() -> RunStatus:
    a1 = job_name("run", UID, 0, 1)
    return _step(_running(), jobs={a1: JobObservation(0, 1, "Failed", "AppFailed; boom")})


def _second_iteration() -> RunStatus:
    a1 = job_name("run", UID, 0, 1)
    return _step(_running(), iterations={0: _iteration(0)}, jobs={a1: JobObservation(0, 1, "Succeeded")})


def _succeeded() -> RunStatus:
    b1 = job_name("run", UID, 1, 1)
    st = _second_iteration()
    return _step(st, iterations={0: _iteration(0), 1: _iteration(1)}, jobs={b1: JobObservation(1, 1, "Succeeded")})


def _failed() -> RunStatus:
    a1, a2 = job_name("run", UID, 0, 1), job_name("run", UID, 0, 2)
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    st = _step(_backing_off(), now=later)  # backoff over: attempt 2 launched
    assert st.active_job is not None and st.active_job.name == a2
    return _step(st, jobs={a1: JobObservation(0, 1, "Failed"), a2: JobObservation(0, 2, "Failed", "OOM")}, now=later)


def _suspended() -> RunStatus:
    a1 = job_name("run", UID, 0, 1)
    return _step(_running(), jobs={a1: JobObservation(0, 1, "Running")}, suspend=True)


def _refused(status: RunStatus, reason: str, message: str, phase: str | None) -> RunStatus:
    """What the operator writes when it refuses a run (Ready=False; a run with jobs keeps its phase)."""
    st = status.model_copy(deep=True)
    st.observed_generation = 1
    st.set_condition("Ready", False, reason, message, 1)
    if phase is not None:
        st.phase = phase  # type: ignore[assignment]
    return st


def _ready(st: RunStatus) -> RunStatus:
    st = st.model_copy(deep=True)
    st.set_condition("Ready", True, "SpecValid", "spec and its references are valid", 1)
    return st


# (id, object, expected health, words the message must contain)
CASES = [
    ("no-status-yet", _obj(None), "Progressing", ["Waiting for the operator"]),
    ("empty-status", _obj({}), "Progressing", ["Waiting for the operator"]),
    ("launched", _obj(_ready(_launched())), "Progressing", ["Running", "submitted", "iteration 1/2"]),
    ("running", _obj(_ready(_running())), "Progressing", ["iteration 1/2", "stage train"]),
    ("backing-off", _obj(_ready(_backing_off())), "Progressing", ["retrying"]),
    ("second-iteration", _obj(_ready(_second_iteration())), "Progressing", ["iteration 2/2", "test accuracy 0.4"]),
    ("succeeded", _obj(_ready(_succeeded())), "Healthy", ["MaxIterations", "iteration 2/2"]),
    ("failed", _obj(_ready(_failed())), "Degraded", ["IterationFailed", "OOM"]),
    ("suspended", _obj(_ready(_suspended()), suspend=True), "Suspended", ["spec.suspend"]),
    ("invalid-spec", _obj(_refused(RunStatus(), "InvalidSpec", "spec.loop: bad", "Failed")),
     "Degraded", ["InvalidSpec", "spec.loop: bad"]),
    # A spec edit that the Python rules refuse while the run has jobs: the phase stays Running.
    ("invalid-spec-mid-run", _obj(_refused(_running(), "InvalidSpec", "spec.x: bad", None)),
     "Degraded", ["InvalidSpec"]),
    ("relative-path", _obj(_refused(RunStatus(), "RelativePath", "spec.output 'runs' is relative", "Failed")),
     "Degraded", ["RelativePath", "relative"]),
    ("secret-missing", _obj(_refused(RunStatus(), "SecretNotFound", "Secret ml/openai not found", "Pending")),
     "Progressing", ["Pending", "SecretNotFound"]),
    ("template-missing-mid-run", _obj(_refused(_running(), "ClusterTemplateNotFound", "ConfigMap gone", None)),
     "Progressing", ["ClusterTemplateNotFound"]),
    # The spec changed after the run finished; until the operator looks again, the old verdict is stale.
    ("succeeded-new-generation", _obj(_ready(_succeeded()), generation=2), "Progressing", ["generation 2"]),
]

# Statuses captured from real operator runs: (id, expected health, object). See the module docstring.
CAPTURED: list[tuple[str, str, dict[str, Any]]] = []


@pytest.mark.parametrize("obj,expected,words", [pytest.param(o, e, w, id=i) for i, o, e, w in CASES])
def test_health(obj, expected, words):
    status, message = argo_health(obj)
    assert status == expected, (status, message)
    assert status in ARGO_HEALTH
    for word in words:
        assert word in message, message


def test_health_of_captured_statuses():
    for name, expected, obj in CAPTURED:
        assert argo_health(obj)[0] == expected, name


def test_planner_statuses_are_what_the_cases_claim():
    # Guards the fixtures themselves: each case is in the phase its name says.
    assert _launched().phase == "Running" and _launched().active_job is not None
    assert _backing_off().retry_after is not None
    assert _succeeded().phase == "Succeeded" and _succeeded().stop_reason == "MaxIterations"
    assert _failed().phase == "Failed" and _failed().condition("Failed").status == "True"
    assert _suspended().phase == "Suspended"
    # The wire format is camelCase with conditions as a list: what the script indexes.
    wire = _ready(_running()).wire()
    assert {"phase", "conditions", "iterationLabel", "observedGeneration", "stage"} <= set(wire)


def test_every_phase_has_a_health():
    from typing import get_args

    from llm2llm.status import Phase

    for phase in get_args(Phase):
        status, message = argo_health(_obj({"phase": phase, "observedGeneration": 1}))
        assert status in ARGO_HEALTH - {"Missing", "Unknown"}, phase
        assert message


def test_argocd_configmap_carries_the_same_script():
    cm = yaml.safe_load(ARGOCD_CM.read_text())
    key = "resource.customizations.health.llm2llm.io_AugmentationRun"
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][key] == HEALTH_LUA.read_text(), \
        f"{ARGOCD_CM.relative_to(REPO)} is stale: copy charts/llm2llm-operator/health.lua into {key}"


def test_script_is_lua51():
    # Argo CD's gopher-lua is Lua 5.1: no goto, no integer division, no bitwise operators.
    text = HEALTH_LUA.read_text()
    for token in ("goto ", "//", "<<", ">>"):
        code = "\n".join(line.split("--")[0] for line in text.splitlines())
        assert token not in code, token
