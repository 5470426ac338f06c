"""The MLflow tracker against a real ``mlflow server`` (SQLite backend, proxied local artifact store).

The tracker follows a realistic run: the statuses the runner writes while 3 iterations commit, then a
"restart" (a new tracker, as after a crash of the runner or the operator) that records the same
iterations again. MLflow must end up with exactly one parent run, one nested run per iteration, the
status' figures as metrics, the artefacts, and no credentials anywhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from llm2llm.spec import MlflowSpec, parse_spec
from llm2llm.status import RunStatus
from llm2llm.tracking import TAG_ITERATION, TAG_KIND, TAG_LOGGED, TAG_UID, MlflowTracker, flatten_params, iteration_metrics
from tests.conftest import REPO
from tests.unit.test_lineage import make_run

pytestmark = pytest.mark.integration
mlflow = pytest.importorskip("mlflow", reason="the MLflow client is not installed (llm2llm[tracking])")

# The server is a program of its own, in its own venv (scripts/setup.sh; requirements/mlflow-server.in).
SERVER = Path(os.environ.get("LLM2LLM_MLFLOW_SERVER") or REPO / ".cache" / "mlflow-server" / "bin" / "mlflow")

SECRET = "tok-Sup3rSecretValue"
STARTUP_SECONDS = 180  # about 20 s on a busy 2-core machine: imports and the SQLite migrations


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    exe = SERVER
    if not exe.is_file():
        pytest.fail(f"{exe} is missing: scripts/setup.sh installs the MLflow server")
    # No job executor: it would start a runner and seven Huey consumers this test has no use for.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after {STARTUP_SECONDS}s:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, tmp
    finally:
        # The server forks workers: stop the whole session we started it in.
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()


def _statuses(final: RunStatus) -> list[RunStatus]:
    """What the runner writes on the way to ``final``: start, then one status per committed iteration."""
    out = [RunStatus(phase="Running", started_at=final.started_at, output=final.output, max_iterations=3)]
    for it in final.iterations:
        st = out[-1].model_copy(deep=True)
        st.record_iteration(it)
        out.append(st)
    out.append(final)
    return out


def _spec(tmp: Path, url: str):
    return parse_spec({
        "data": {"seed": str(tmp / "seed.jsonl")}, "output": str(tmp / "runs"),
        "teacher": {"kind": "openai", "endpoint": "https://user:pw@teacher.example/v1",
                    "apiKeySecretRef": {"name": "teacher", "key": "api-key"}},
        "task": {"teacherTemplate": "Make more like {input}. " + "x" * 2000},
        "tracking": {"mlflow": {"trackingUri": url, "experiment": "llm2llm-it",
                                "credentialsSecretRef": {"name": "mlflow", "key": "token"}}},
    })


def test_tracker_is_idempotent_across_a_restart(server, tmp_path, caplog):
    url, server_tmp = server
    store = make_run(tmp_path, name="tracked")
    final = RunStatus.model_validate(store.read_json(store.path("status.json")))
    uid = store.read_json(store.path("run.json"))["uid"]
    spec = _spec(tmp_path, url)
    cfg = spec.tracking.mlflow
    assert os.environ.get("MLFLOW_TRACKING_TOKEN") is None

    def tracker() -> MlflowTracker:
        return MlflowTracker(cfg, run_name="tracked", run_uid=uid, spec=spec, namespace="team-a", credentials=SECRET)

    t0 = time.monotonic()
    first = tracker()
    statuses = _statuses(final)
    urls = [first.update(st, store) for st in statuses[:3]]  # start, iterations 0 and 1: the "crash" comes here
    assert urls[0] and urls[0].startswith(f"{url}/#/experiments/") and len(set(urls)) == 1
    assert first.update(statuses[2], store) == urls[0]  # unchanged status: no MLflow traffic at all
    assert os.environ.get("MLFLOW_TRACKING_TOKEN") is None  # credentials only while talking to MLflow

    # Crash between logging iteration 1's metrics and marking it logged: the restart logs it again, and
    # the store must still hold every (metric, step) once.
    client = mlflow.MlflowClient(tracking_uri=url)
    client.delete_tag(first._children[1], TAG_LOGGED)

    again = tracker()  # the restarted runner: records every iteration again, then the end
    for st in statuses:
        assert again.update(st, store) == urls[0]
    elapsed = time.monotonic() - t0

    exp = client.get_experiment_by_name("llm2llm-it")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_UID}` = '{uid}'")
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "run"]
    children = [r for r in runs if r.data.tags.get(TAG_KIND) == "iteration"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    parent = parents[0]
    assert urls[0].endswith(f"/runs/{parent.info.run_id}")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tracked"
    assert parent.data.tags["llm2llm.io/run"] == "tracked" and parent.data.tags["llm2llm.io/namespace"] == "team-a"
    assert parent.data.tags["llm2llm.io/phase"] == "Succeeded"
    assert sorted(int(r.data.tags[TAG_ITERATION]) for r in children) == [0, 1, 2]  # one each, no duplicates
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.data.tags[TAG_LOGGED] == "true" and r.info.status == "FINISHED" for r in children)

    # Params: the flattened spec, with no secret reference, no tracking block, no credentials in URLs.
    params = parent.data.params
    assert params == flatten_params(spec)
    assert params["student.training.lr"] == "2e-05" and params["loop.maxIterations"] == "3"
    assert params["teacher.endpoint"] == "https://teacher.example/v1"
    assert not any("secret" in k.lower() or k.startswith("tracking") for k in params)
    assert len(params["task.teacherTemplate"]) <= 500

    # Metrics: equal to the status, on each iteration's run and as the parent's history (step = index).
    by_index = {int(r.data.tags[TAG_ITERATION]): r for r in children}
    for it in final.iterations:
        want = iteration_metrics(it)
        assert by_index[it.index].data.metrics == pytest.approx(want), it.index
        for key in ("seed_accuracy", "test_accuracy", "kept", "train_rows", "teacher_tokens", "seconds/train"):
            hist = [m for m in client.get_metric_history(parent.info.run_id, key) if m.step == it.index]
            assert len(hist) == 1, (key, it.index, hist)  # logged twice (restart), stored once
            assert hist[0].value == pytest.approx(want[key])
    assert final.iterations[0].seed_accuracy == pytest.approx(1 / 3)
    assert by_index[0].data.metrics["rejected/duplicate"] == 4 and by_index[0].data.metrics["seconds/teach"] == 18.0
    assert "test_accuracy" in by_index[2].data.metrics and "rejected/duplicate" not in by_index[2].data.metrics

    # Artefacts: status.json and the report on the parent, the manifest on each iteration.
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"status.json", "report.html"} <= names
    local = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "dl")))
    status_doc = json.loads((local / "status.json").read_text())
    assert status_doc["phase"] == "Succeeded" and status_doc["mlflowRunUrl"] == urls[0]
    assert [i["seedAccuracy"] for i in status_doc["iterations"]] == [i.seed_accuracy for i in final.iterations]
    report = (local / "report.html").read_text()
    assert 'id="plot-accuracy"' in report and "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    for r in children:
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["iteration.json"]

    # The credentials went nowhere: not in MLflow's database or artefacts, not in the log.
    assert os.environ.get("MLFLOW_TRACKING_TOKEN") is None
    for path in server_tmp.rglob("*"):
        if path.is_file() and path.suffix != ".log":
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text
    assert elapsed < 90, f"tracking took {elapsed:.0f}s"


def test_unreachable_mlflow_is_a_warning_not_a_failure(tmp_path, caplog):
    store = make_run(tmp_path, name="offline", iterations=1)
    status = RunStatus.model_validate(store.read_json(store.path("status.json")))
    cfg = MlflowSpec(tracking_uri=f"http://user:{SECRET}@127.0.0.1:{_free_port()}", experiment="x")
    t = MlflowTracker(cfg, run_name="offline", run_uid="u-1", credentials=SECRET)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="llm2llm.tracking"):
        assert t.update(status, store) is None
        assert t.update(status, store) is None  # backing off: no second attempt right away
    assert time.monotonic() - t0 < 30
    warnings = [r.getMessage() for r in caplog.records if r.name == "llm2llm.tracking"]
    assert len(warnings) == 1 and "MLflow tracking at http://127.0.0.1:" in warnings[0]
    assert SECRET not in caplog.text


class _NoRay:
    """A launcher with no jobs: the run folder already holds every iteration, so the runner only finishes."""

    def observe(self, name, iteration, attempt):
        return None

    def submit(self, *args, **kwargs):
        raise AssertionError("nothing should be launched")

    def stop(self, name):
        raise AssertionError("nothing should be stopped")


def test_local_runner_records_the_run_url_in_status(server, tmp_path, monkeypatch):
    from llm2llm.runner import LocalRunner
    from llm2llm.spec import parse_run

    url, _ = server
    store = make_run(tmp_path, name="runner-tracked")
    store.fs.rm(store.path("status.json"))  # as if the runner had crashed before its first status write
    spec = _spec(tmp_path, url)
    run = parse_run({"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun",
                     "metadata": {"name": "runner-tracked"}, "spec": spec.model_dump(mode="json", by_alias=True)})
    monkeypatch.setattr(LocalRunner, "_ray", lambda self: _NoRay())
    lines: list[str] = []
    for _ in range(2):  # the second execute is a restart of a finished run: nothing new in MLflow
        status = LocalRunner(run, poll_seconds=0.01, echo=lines.append).execute()
        assert status.phase == "Succeeded" and status.mlflow_run_url and status.mlflow_run_url.startswith(url)
        on_disk = store.read_json(store.path("status.json"))
        assert on_disk["mlflowRunUrl"] == status.mlflow_run_url

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("llm2llm-it")
    uid = store.read_json(store.path("run.json"))["uid"]
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_UID}` = '{uid}'")
    kinds = sorted(r.data.tags[TAG_KIND] for r in runs)
    assert kinds == ["iteration", "iteration", "iteration", "run"]
    parent = next(r for r in runs if r.data.tags[TAG_KIND] == "run")
    assert status.mlflow_run_url.endswith(parent.info.run_id) and parent.info.status == "FINISHED"
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_local_runner_goes_on_when_mlflow_is_down(tmp_path, monkeypatch, caplog):
    from llm2llm.runner import LocalRunner
    from llm2llm.spec import parse_run

    store = make_run(tmp_path, name="runner-offline")
    spec = _spec(tmp_path, f"http://127.0.0.1:{_free_port()}")
    run = parse_run({"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun",
                     "metadata": {"name": "runner-offline"}, "spec": spec.model_dump(mode="json", by_alias=True)})
    monkeypatch.setattr(LocalRunner, "_ray", lambda self: _NoRay())
    with caplog.at_level("WARNING", logger="llm2llm.tracking"):
        status = LocalRunner(run, poll_seconds=0.01, echo=lambda line: None).execute()
    assert status.phase == "Succeeded" and status.mlflow_run_url is None
    assert "MLflow tracking at" in caplog.text
    assert store.read_json(store.path("status.json"))["phase"] == "Succeeded"
