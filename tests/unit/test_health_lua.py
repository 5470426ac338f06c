"""The Argo CD health check (charts/llm2llm-operator/health.lua), run the way Argo CD runs it: gopher-lua
with Argo CD's libraries and object conversion, through tests/argocd (healthcheck, built once per machine),
all cases in one process. The statuses are made by the real models: RunStatus.wire() as produced by the
pure planner (llm2llm.planner.advance, which the operator calls on every reconcile), plus the Ready=False
conditions the operator sets when it refuses a run.

To check a status captured from a real run, add it to CAPTURED below as (id, expected health, object).
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timedelta, timezone
from typing import Any, get_args

import pytest
import yaml

from llm2llm.planner import JobObservation, Observed, advance, job_name
from llm2llm.spec import parse_spec
from llm2llm.status import IterationStatus, Phase, RunStatus
from tests.argocd.health import HEALTH_LUA, RunHealthLog, Verdict, binary, verdicts
from tests.conftest import REPO

ARGOCD_CM = REPO / "examples" / "gitops" / "argocd" / "argocd-cm-health.yaml"
ARGO_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
UID = "0b6c1d8e-5f44-4d7e-9a57-3f0c2a1e9b10"


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


def _phase_obj(phase: str) -> dict[str, Any]:
    return _obj({"phase": phase, "observedGeneration": 1})


@pytest.fixture(scope="session")
def health() -> dict[str, Verdict]:
    """Argo CD's verdict on every object of this module, keyed by id: one healthcheck process."""
    objects = {i: o for i, o, _, _ in CASES}
    objects.update({f"phase-{p}": _phase_obj(p) for p in get_args(Phase)})
    objects.update({f"captured-{i}": o for i, _, o in CAPTURED})
    return dict(zip(objects, verdicts(objects.values())))


@pytest.mark.parametrize("name,expected,words", [pytest.param(i, e, w, id=i) for i, _, e, w in CASES])
def test_health(health, name, expected, words):
    status, message, error = health[name]
    assert error is None, error
    assert status == expected, (status, message)
    assert status in ARGO_HEALTH
    for word in words:
        assert word in message, message


def test_health_of_captured_statuses(health):
    for name, expected, _obj_ in CAPTURED:
        assert health[f"captured-{name}"].status == expected, name


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


def test_every_phase_has_a_health(health):
    for phase in get_args(Phase):
        status, message, error = health[f"phase-{phase}"]
        assert error is None and status in ARGO_HEALTH - {"Missing", "Unknown"}, (phase, status, error)
        assert message


def test_argocd_configmap_carries_the_same_script():
    cm = yaml.safe_load(ARGOCD_CM.read_text())
    key = "resource.customizations.health.llm2llm.io_AugmentationRun"
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][key] == HEALTH_LUA.read_text(), \
        f"{ARGOCD_CM.relative_to(REPO)} is stale: copy charts/llm2llm-operator/health.lua into {key}"
    # healthcheck evaluates as Argo CD does without useOpenLibs; the install must not turn them on.
    assert not any(k.startswith("resource.customizations.useOpenLibs") for k in cm["data"])


def test_script_is_lua51():
    # Argo CD's gopher-lua is Lua 5.1: no goto, no integer division, no bitwise operators. And Argo CD opens
    # only the base, package and table libraries (os with time and date) for an argocd-cm script: a branch
    # the cases miss must not reach string, math, io or a string method either.
    text = HEALTH_LUA.read_text()
    code = "\n".join(line.split("--")[0] for line in text.splitlines())
    for token in ("goto ", "//", "<<", ">>"):
        assert token not in code, token
    assert not re.findall(r"\b(?:string|math|io|coroutine|debug)\.", code)
    assert not re.findall(r"[\w)\]]:[A-Za-z_]\w*\s*[(\"'{]", code)  # s:upper() needs the string library


# --- the runtime itself: what Argo CD does that a Lua of one's own would not ----------------------

PROBE = """
local p = obj.probe
if p == "libraries" then
  local os2 = require("os")
  return {status = "Healthy", message = table.concat({type(string), type(math), type(io), type(coroutine),
    type(os.exit), type(os.getenv), type(os.time), type(os2.date), type(tostring)}, " ")}
elseif p == "values" then
  local n = 0
  for _ in pairs(obj.map) do n = n + 1 end
  return {status = "Healthy", message = table.concat({tostring(obj.int), tostring(obj.float), tostring(obj.null),
    tostring(#obj.items), tostring(obj.items[2]), type(obj.empty), tostring(#obj.empty), tostring(n),
    tostring(obj.sum + 0.2)}, " ")}
elseif p == "invalid" then
  return {status = "Fine", message = "not one of Argo CD's"}
elseif p == "number-message" then
  return {status = "Healthy", message = 5}
elseif p == "empty" then
  return {}
elseif p == "string" then
  return "Healthy"
elseif p == "error" then
  return {status = obj.spec.nothing.here}
elseif p == "loop" then
  while true do end
end
return {status = "Healthy", message = "script ran"}
"""


def test_runtime_is_argocds(tmp_path):
    script = tmp_path / "probe.lua"
    script.write_text(PROBE)
    probes = ["libraries", "values", "invalid", "number-message", "empty", "string", "error", "loop"]
    objects = [{"probe": p, "metadata": {"name": p}} for p in probes]
    objects[1].update({"int": 3, "float": 0.5, "null": None, "items": [1, None, 2], "empty": [], "map": {},
                       "sum": 0.1})
    objects.append({"probe": "deleting", "metadata": {"name": "d", "deletionTimestamp": "2026-01-01T00:00:00Z",
                                                      "finalizers": ["llm2llm.io/finalizer"]}})
    got = dict(zip(probes + ["deleting"], verdicts(objects, script)))

    # Only base, package, table and a cut-down os: a script using string.format works in lupa or a
    # stock Lua and is Unknown in Argo CD.
    assert got["libraries"] == ("Healthy", "nil nil nil nil nil nil function function function", None)
    # JSON as Argo CD converts it: a null is absent, a null array item is dropped, integers print bare,
    # and numbers print as Go does (0.1 + 0.2 shows 0.30000000000000004; Lua 5.1's %.14g shows 0.3).
    assert got["values"].message == "3 0.5 nil 2 2 table 0 0 0.30000000000000004"
    assert got["invalid"] == ("Unknown", "Lua returned an invalid health status", None)
    # The result goes through JSON into Argo CD's struct: a wrong type or an empty table is no health.
    assert got["number-message"] == ("", "", None) and got["empty"] == ("", "", None)
    assert got["string"].status == "Unknown" and "expect table output" in got["string"].error
    assert got["error"].status == "Unknown" and "attempt to index" in got["error"].error
    assert "stack traceback" not in got["error"].error  # Argo CD strips it
    # Argo CD gives a script 1 s.
    assert got["loop"].status == "Unknown" and "context deadline exceeded" in got["loop"].error
    # A run being deleted (Kopf's finalizer holds it) is Progressing without the script.
    assert got["deleting"] == ("Progressing", "Pending deletion", None)


def test_cli_reads_kubectl_output_and_names_bad_input():
    def cli(doc: Any) -> subprocess.CompletedProcess:
        return subprocess.run([str(binary()), str(HEALTH_LUA)], input=json.dumps(doc), capture_output=True,
                              text=True, timeout=30)

    # `kubectl get augruns -o json` prints a List, `kubectl get augrun NAME -o json` one object.
    listed = cli({"kind": "AugmentationRunList", "items": [_obj(None), _obj(_ready(_succeeded()))]})
    assert [v["status"] for v in json.loads(listed.stdout)] == ["Progressing", "Healthy"], listed.stderr
    one = cli(_obj(_ready(_failed())))
    assert [v["status"] for v in json.loads(one.stdout)] == ["Degraded"], one.stderr
    bad = cli([{"kind": "AugmentationRun"}, 7])
    assert bad.returncode == 2 and bad.stderr.strip() == "healthcheck: stdin: item 1 is not a JSON object"


# --- the e2e helper, on the statuses the planner makes for a run that succeeds --------------------

def _poll(*statuses: RunStatus | dict[str, Any] | None) -> RunHealthLog:
    log = RunHealthLog()
    for st in statuses:
        log.see(_obj(_ready(st)) if isinstance(st, RunStatus) else st or _obj(None))
    return log


def test_run_health_log_passes_a_run_that_succeeds():
    launched = _obj(_ready(_launched()))
    log = _poll(None, launched, launched, _running(), _backing_off(), _second_iteration(), _succeeded())
    assert log.phases() == [None, "Running", "Running", "Running", "Running", "Succeeded"]  # the repeat dropped
    got = log.check_succeeded_run()
    assert [v.status for v in got] == ["Progressing"] * 5 + ["Healthy"]


@pytest.mark.parametrize("statuses,words", [
    pytest.param((_launched(), _running(), _failed()), ["phase Failed: Degraded", "IterationFailed"], id="failed"),
    pytest.param((_launched(), _suspended()), ["phase Suspended: Suspended"], id="suspended"),
    pytest.param((_launched(), _running()), ["never seen ['Succeeded']"], id="never-succeeded"),
])
def test_run_health_log_fails_a_run_that_does_not(statuses, words):
    with pytest.raises(AssertionError) as err:
        _poll(*statuses).check_succeeded_run()
    for word in words:
        assert word in str(err.value), str(err.value)
