"""reconcile() with in-memory fakes of the Kubernetes API and the Ray Jobs API, plus the settings."""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
from kubernetes.client.exceptions import ApiException

from llm2llm.planner import Launch, Stop, job_name
from llm2llm.status import IterationStatus
from llm2llm.storage import RunStorage
from llm2llm_operator.reconcile import Context, Transient, cleanup, reconcile
from llm2llm_operator.settings import Settings, parse_args
from tests.conftest import REPO


class FakeCustom:
    """RayJobs in memory, with the API server's 404/409 answers."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}

    def create_namespaced_custom_object(self, group, version, ns, plural, body, **_):
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.jobs[name] = copy.deepcopy(body)

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        if name not in self.jobs:
            raise ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.jobs[name])

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, **_):
        if self.jobs.pop(name, None) is None:
            raise ApiException(status=404, reason="NotFound")

    def list_namespaced_custom_object(self, group, version, ns, plural, label_selector=None):
        key, _, value = (label_selector or "=").partition("=")
        return {"items": [j for j in self.jobs.values() if not key or j["metadata"]["labels"].get(key) == value]}


OPTED_IN = {"llm2llm.io/teacher-key": "true"}
PINNED = {"llm2llm.io/allowed-endpoints": "https://x"}


class FakeCore:
    def __init__(self, secrets=None, config_maps=None, secret_meta=None):
        self.secrets, self.config_maps = secrets or {}, config_maps or {}
        self.listed: list[tuple] = []
        # name -> (labels, annotations); opted in unless said otherwise
        self.secret_meta = secret_meta or {}

    def list_namespaced_secret(self, ns, label_selector=None, field_selector=None):
        """As the API server does: only the Secrets matching both selectors come back."""
        key, _, value = (label_selector or "=").partition("=")
        name = (field_selector or "").removeprefix("metadata.name=")
        items = []
        for sname, data in self.secrets.items():
            labels, annotations = self.secret_meta.get(sname, (OPTED_IN, PINNED))
            if (name and sname != name) or (key and (labels or {}).get(key) != value):
                continue
            items.append(SimpleNamespace(data=data, string_data=None,
                                         metadata=SimpleNamespace(labels=labels, annotations=annotations)))
        self.listed.append((ns, label_selector, field_selector))
        return SimpleNamespace(items=items)

    def read_namespaced_config_map(self, name, ns):
        if name not in self.config_maps:
            raise ApiException(status=404, reason="NotFound")
        return SimpleNamespace(data=self.config_maps[name])


class FakeJobsApi:
    def __init__(self, address):
        self.address, self.submitted, self.stopped = address, [], []

    kind = "jobs-api"

    def submit(self, job):
        self.submitted.append((job.name, job.entrypoint, job.env, job.labels))
        return True

    def observe(self, name, iteration, attempt):
        return None

    def stop(self, name):
        self.stopped.append(name)


def _ctx(core=None, **settings) -> Context:
    jobs: dict[str, FakeJobsApi] = {}
    ctx = Context(Settings(**settings), core or FakeCore(), FakeCustom(),
                  jobs_api=lambda a: jobs.setdefault(a, FakeJobsApi(a)))
    ctx.fake_jobs = jobs  # type: ignore[attr-defined]
    return ctx


def _body(tmp_path, status=None, **spec):
    # (the seed's folder does not exist here: a volume only the jobs mount, so the operator does not judge it)
    base = {"data": {"seed": "/mnt-jobs-only/s.jsonl"}, "output": str(tmp_path), "loop": {"maxIterations": 2},
            "ray": {"launcher": "rayjob", "clusterSelector": {"c": "1"}}}
    base.update(spec)
    return {"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": base, **({"status": status} if status else {})}


def _step(body, ctx):
    """One reconcile, with its status written back as the handler would."""
    out = reconcile(body, ctx)
    if out.status is not None:
        body["status"] = out.status
    return out


def test_first_reconcile_launches_one_rayjob_and_is_idempotent(tmp_path):
    ctx, body = _ctx(), _body(tmp_path)
    out = _step(body, ctx)
    name = job_name("r", "u", 0, 1)
    assert isinstance(out.action, Launch) and out.submitted and list(ctx.custom.jobs) == [name]
    assert out.status["phase"] == "Running" and out.status["jobs"][0]["name"] == name
    assert [e.reason for e in out.events] == ["IterationStarted"]
    ready = next(c for c in out.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    # Status lost (a crash before the write): the same Launch finds the existing job.
    out = reconcile(_body(tmp_path), ctx)
    assert isinstance(out.action, Launch) and not out.submitted and len(ctx.custom.jobs) == 1
    # Launched -> waiting (the stage shows), and then nothing changes: nothing to write.
    assert _step(body, ctx).status["stage"] == "prepare"
    assert _step(body, ctx).status is None


def test_iteration_succeeds_then_next_launch(tmp_path):
    ctx, body = _ctx(), _body(tmp_path)
    _step(body, ctx)
    a1 = job_name("r", "u", 0, 1)
    RunStorage(str(tmp_path), "r").write_iteration(IterationStatus(index=0, failures=2, seed_accuracy=0.5, kept=3, job=a1))
    ctx.custom.jobs[a1]["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    out = _step(body, ctx)
    assert isinstance(out.action, Launch) and out.action.iteration == 1
    assert body["status"]["iterations"][0]["kept"] == 3 and body["status"]["jobs"][0]["state"] == "Succeeded"
    assert "IterationSucceeded" in [e.reason for e in out.events]


def test_suspend_deletes_the_job_and_records_it_stopped(tmp_path):
    ctx, body = _ctx(), _body(tmp_path)
    _step(body, ctx)
    body["spec"]["suspend"] = True
    out = _step(body, ctx)
    assert isinstance(out.action, Stop) and ctx.custom.jobs == {}
    assert body["status"]["phase"] == "Suspended" and "activeJob" not in body["status"]
    rec = body["status"]["jobs"][0]
    assert rec["state"] == "Suspended" and "suspended" in rec["message"]
    assert "JobStopped" in [e.reason for e in out.events] and rec["releasing"] is True
    # Next tick: the RayJob is gone, so the record is released; then nothing runs, nothing changes.
    assert "releasing" not in _step(body, ctx).status["jobs"][0]
    assert _step(body, ctx).status is None


def test_invalid_spec_launches_nothing_and_reports_once(tmp_path):
    ctx, body = _ctx(), _body(tmp_path, output="s3x://nope")
    out = _step(body, ctx)
    assert out.invalid.reason == "OutputUnsupported" and ctx.custom.jobs == {}
    assert body["status"]["phase"] == "Failed"
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "OutputUnsupported" and "spec.output" in ready["message"]
    assert [e.reason for e in out.events] == ["OutputUnsupported"]
    again = _step(body, ctx)
    assert again.status is None and again.events == []


@pytest.mark.parametrize("spec,core,settings,reason", [
    ({"loop": {"maxIterations": 0}}, None, {}, "InvalidSpec"),
    ({"teacher": {"kind": "openai", "endpoint": "https://x", "apiKeySecretRef": {"name": "s", "key": "k"}}},
     None, {}, "SecretNotFound"),
    ({"teacher": {"kind": "openai", "endpoint": "https://x", "apiKeySecretRef": {"name": "s", "key": "k"}}},
     FakeCore(secrets={"s": {"other": "eA=="}}), {}, "SecretKeyNotFound"),
    # Not labelled by its owner: the operator never even receives it.
    ({"teacher": {"kind": "openai", "endpoint": "https://x", "apiKeySecretRef": {"name": "s", "key": "k"}}},
     FakeCore(secrets={"s": {"k": "eA=="}}, secret_meta={"s": (None, PINNED)}), {}, "SecretNotFound"),
    # Labelled, but not pinned to any endpoint: the key may go nowhere.
    ({"teacher": {"kind": "openai", "endpoint": "https://x", "apiKeySecretRef": {"name": "s", "key": "k"}}},
     FakeCore(secrets={"s": {"k": "eA=="}}, secret_meta={"s": (OPTED_IN, None)}), {}, "EndpointNotAllowed"),
    ({"teacher": {"kind": "openai", "endpoint": "https://evil.example/v1",
                  "apiKeySecretRef": {"name": "s", "key": "k"}}},
     FakeCore(secrets={"s": {"k": "eA=="}},
              secret_meta={"s": (OPTED_IN, {"llm2llm.io/allowed-endpoints": "https://api.openai.com/, https://x"})}),
     {}, "EndpointNotAllowed"),
    ({"ray": {"launcher": "rayjob", "clusterTemplate": "t"}}, None, {"allowed_cluster_templates": ("t",)},
     "ClusterTemplateNotFound"),
    ({"ray": {"launcher": "rayjob", "clusterTemplate": "t"}}, FakeCore(config_maps={"t": {}}),
     {"allowed_cluster_templates": ("ns/t",)}, "ClusterTemplateInvalid"),
    # A template the admin did not allow is refused before it is even read.
    ({"ray": {"launcher": "rayjob", "clusterTemplate": "t"}}, FakeCore(config_maps={"t": {}}),
     {"allowed_cluster_templates": ("other/t", "u*")}, "ClusterTemplateNotAllowed"),
    ({"ray": {"launcher": "jobs-api", "address": "http://evil.internal:8265"}}, None,
     {"allowed_ray_addresses": ("http://ray-head.ray:8265",)}, "RayAddressNotAllowed"),
    ({"ray": {"launcher": "jobs-api", "address": "http://ray-head.ray:8265@evil.internal:8265"}}, None,
     {"allowed_ray_addresses": ("http://ray-head.ray:8265",)}, "RayAddressNotAllowed"),
    ({"ray": {"launcher": "rayjob"}}, None, {}, "NoRayCluster"),
    ({"ray": {"launcher": "local"}}, None, {"default_launcher": "jobs-api"}, "NoRayAddress"),
    ({"output": "relative/runs"}, None, {}, "RelativePath"),
])
def test_invalid_cases(tmp_path, spec, core, settings, reason):
    ctx = _ctx(core, **settings)
    out = reconcile(_body(tmp_path, **spec), ctx)
    assert out.invalid is not None and out.invalid.reason == reason and out.action is None
    assert ctx.custom.jobs == {} and not ctx.fake_jobs


def test_missing_data_file_is_refused_before_any_job(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "seed.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    ctx = _ctx()
    out = _step(_body(tmp_path, output=str(tmp_path / "runs"), data={"seed": str(tmp_path / "data" / "seed.jsonl"),
                                                                     "test": str(tmp_path / "data" / "tset.jsonl")}), ctx)
    assert out.invalid.reason == "DataNotFound" and "spec.data.test" in out.invalid.message
    assert "tset.jsonl" in out.invalid.message and ctx.custom.jobs == {}
    assert not (tmp_path / "runs").exists()


def test_unreadable_output_is_reported_in_status_and_recovers(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    ctx, body = _ctx(), _body(tmp_path, output=str(blocker / "runs"))
    out = _step(body, ctx)
    assert out.invalid.reason == "StorageUnavailable" and ctx.custom.jobs == {}
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and str(blocker) in ready["message"] and body["status"]["phase"] == "Pending"
    assert [e.reason for e in out.events] == ["StorageUnavailable"]
    # Storage comes back: the next tick launches the first job, with no one touching the resource.
    blocker.unlink()
    blocker.mkdir()
    out = _step(body, ctx)
    assert isinstance(out.action, Launch) and out.submitted and len(ctx.custom.jobs) == 1
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_jobs_api_launcher_and_base_dir(tmp_path):
    ctx = _ctx(default_launcher="jobs-api", ray_address="http://head:8265", base_dir=str(tmp_path),
               job_python="/venv/bin/python")
    body = _body(tmp_path, output="runs", data={"seed": "data/seed.jsonl"}, ray={"launcher": "local"})
    out = _step(body, ctx)
    assert isinstance(out.action, Launch) and out.launcher == "jobs-api"
    (name, cmd, env, meta), = ctx.fake_jobs["http://head:8265"].submitted
    assert name == job_name("r", "u", 0, 1) and cmd.startswith("/venv/bin/python -m llm2llm_jobs.iteration")
    assert env["LLM2LLM_BASE_DIR"] == str(tmp_path) and meta["llm2llm.io/run-uid"] == "u"
    # Relative paths reach the job resolved, and the operator reads the same folder.
    from llm2llm.launch import decode_run
    _, _, spec = decode_run(cmd.split("--run ")[1].split()[0])
    assert spec.data.seed == str(tmp_path / "data/seed.jsonl") and spec.output == str(tmp_path / "runs")
    assert body["status"]["output"] == str(tmp_path / "runs" / "r")


def test_unreachable_ray_is_transient(tmp_path):
    def down(address):
        raise ConnectionError("refused")
    ctx = Context(Settings(default_launcher="jobs-api", ray_address="http://x:1"), FakeCore(), FakeCustom(), down)
    with pytest.raises(Transient, match="unreachable"):
        reconcile(_body(tmp_path, ray={"launcher": "local"}), ctx)


def test_finished_run_is_left_alone(tmp_path):
    ctx, body = _ctx(), _body(tmp_path, loop={"maxIterations": 1})
    _step(body, ctx)
    a1 = job_name("r", "u", 0, 1)
    RunStorage(str(tmp_path), "r").write_iteration(IterationStatus(index=0, failures=1, seed_accuracy=0.5))
    ctx.custom.jobs[a1]["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    _step(body, ctx)
    assert body["status"]["phase"] == "Succeeded"
    ctx.custom.jobs.clear()  # KubeRay may delete finished jobs: the result is already in status
    out = _step(body, ctx)
    assert out.status is None and body["status"]["phase"] == "Succeeded"


def test_cleanup_deletes_jobs_and_data_only_when_asked(tmp_path):
    ctx, body = _ctx(), _body(tmp_path, deleteData=True)
    _step(body, ctx)
    RunStorage(str(tmp_path), "r").mark_done(0, "prepare", {})
    assert cleanup(body, ctx) == ([job_name("r", "u", 0, 1)], True)
    assert ctx.custom.jobs == {} and not (tmp_path / "r").exists()
    keep = _body(tmp_path)
    _step(keep, ctx)
    RunStorage(str(tmp_path), "r").mark_done(0, "prepare", {})
    assert cleanup(keep, ctx)[1] is False and (tmp_path / "r").exists()


def test_settings_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("LLM2LLM_NAMESPACES", "a, b")
    monkeypatch.setenv("LLM2LLM_RECONCILE_INTERVAL", "5")
    s = parse_args([])
    assert s.namespaces == ("a", "b") and s.interval == 5 and not s.clusterwide and s.default_launcher == "rayjob"
    assert s.workers == 16
    monkeypatch.setenv("LLM2LLM_WORKERS", "4")
    assert parse_args([]).workers == 4 and parse_args(["--workers", "64"]).workers == 64
    with pytest.raises(SystemExit):
        parse_args(["--workers", "0"])
    s = parse_args(["-A", "--default-launcher", "jobs-api", "--ray-address", "http://h:8265", "--base-dir", "rel"])
    assert s.clusterwide and s.ray_address == "http://h:8265" and s.base_dir.endswith("/rel")
    with pytest.raises(SystemExit):
        parse_args(["--interval", "0"])


def test_operator_imports_no_ml_stack():
    code = ("import sys, llm2llm_operator.__main__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'llm2llm_jobs', 'deepspeed', "
            "'transformers') or m.startswith('ray.train')]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_opted_in_secret_with_allowed_endpoint_launches(tmp_path):
    core = FakeCore(secrets={"s": {"k": "eA=="}},
                    secret_meta={"s": (OPTED_IN, {"llm2llm.io/allowed-endpoints": "https://api.example/v1"})})
    ctx = _ctx(core)
    out = _step(_body(tmp_path, teacher={"kind": "openai", "endpoint": "https://api.example/v1",
                                         "apiKeySecretRef": {"name": "s", "key": "k"}}), ctx)
    assert out.invalid is None and out.submitted and len(ctx.custom.jobs) == 1
