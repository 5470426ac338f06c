"""Bad specs: every case of tests/e2e/bad_specs.py, applied with `kubectl apply --server-side --validate=strict`
against one operator for the whole module.

A case is refused by the API server (the message names the field; the API answers 400/422; the Python rules
refuse it too), or admitted and then stopped by the operator with Ready=False, a specific reason and one
Warning Event. Either way no RayJob is created for it and no folder appears in its storage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from llm2llm.spec import GROUP, PLURAL, VERSION, SpecError, parse_run
from tests.e2e.bad_specs import CASES, FILE, NAMESPACE_OBJECTS, OUT, Case, manifest
from tests.e2e.test_operator_harness import REPO, Api, Operator, augrun_crd, wait_for  # noqa: F401
from tests.e2e.test_reliability_harness import LABEL_RUN, Kubectl, start_operator

XFAIL_NAMES = {(c.name or c.id.lower()) for c in CASES if c.xfail}


@dataclass
class Env:
    ns: str
    out: Path
    file: Path
    api: Api
    kubectl: Kubectl
    op: Operator


@pytest.fixture(scope="module")
def env(control_plane, augrun_crd, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("bad-specs")
    ns = control_plane.new_namespace("reliability-specs")
    out, file = tmp / "out", tmp / "not-a-directory"
    out.mkdir()
    file.write_text("a regular file where the output folder's parent should be\n")
    for obj in NAMESPACE_OBJECTS:
        control_plane.apply({**obj, "metadata": {**obj["metadata"], "namespace": ns}})
    # jobs-api by default and no --ray-address: `launcher: local` has nowhere to go (NoRayAddress);
    # no --base-dir: relative paths are RelativePath.
    op = start_operator(control_plane, tmp / "operator.log", ns, "--default-launcher", "jobs-api")
    env = Env(ns, out, file, Api(control_plane, ns), Kubectl(control_plane, tmp / "kube-cache"), op)
    yield env
    op.stop()
    print(f"--- operator log ({op.log_path}):\n{op.log(60)}")


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


def _rayjobs_of(env: Env, name: str) -> list[str]:
    # No label selector: a bad name is not a valid label value, and the API server would refuse the query.
    items = env.api.custom.list_namespaced_custom_object("ray.io", "v1", env.ns, "rayjobs")["items"]
    return [i["metadata"]["name"] for i in items if i["metadata"].get("labels", {}).get(LABEL_RUN) == name]


def _folders(env: Env, doc: dict, name: str) -> list[Path]:
    """Where a storage folder for this run would appear if anything wrote one."""
    output = doc["spec"].get("output") or ""
    if "://" in output:
        return []
    base = Path(output) if output.startswith("/") else REPO / output  # relative: the operator's cwd
    return [base / name]


@pytest.mark.parametrize("case", _params())
def test_bad_spec(env: Env, case: Case):
    doc = manifest(case, str(env.out), str(env.file))
    name = doc["metadata"]["name"]
    words = [w.replace(FILE, str(env.file)).replace(OUT, str(env.out)) for w in case.words]
    applied = env.kubectl.apply(env.ns, [doc])

    if case.outcome == "admission":
        assert applied.returncode != 0, f"the API server admitted {case.id}: {applied.stdout}"
        for word in words:
            assert word in applied.stderr, (word, applied.stderr)
        with pytest.raises(ApiException) as info:  # the same through the API: the status code
            env.api.create_run({**doc, "metadata": {**doc["metadata"], "namespace": env.ns}})
        assert info.value.status in (400, 422), info.value
        message = json.loads(info.value.body)["message"]
        for word in words:
            assert word in message, (word, message)
        assert env.api.run(name) is None  # (the Python rules: test_python_rules_refuse_it_too)
    else:
        assert applied.returncode == 0, applied.stderr
        parse_run(doc)  # valid as far as the spec alone goes: only the operator can see the problem
        uid = env.api.run(name)["metadata"]["uid"]
        timeout = 6 if case.xfail else 30

        def settled():
            cond = env.api.condition(name, "Ready")
            if cond and cond["status"] == "False" and (case.reason is None or cond["reason"] == case.reason):
                return cond
            if cond and cond["status"] == "True" or _rayjobs_of(env, name):
                raise AssertionError(f"{case.id} was accepted by the operator: Ready={cond}, "
                                     f"RayJobs={_rayjobs_of(env, name)}")
            return None

        cond = wait_for(settled, f"Ready=False ({case.reason or 'any reason'}) on {name}", timeout, every=0.2)
        for word in words:
            assert word in cond["message"], (word, cond)
        status = env.api.status(name)
        if case.phase:
            assert status["phase"] == case.phase, status
        assert not status.get("jobs") and "activeJob" not in status, status
        reasons = wait_for(lambda: [r for r in env.api.event_reasons(name) if r == cond["reason"]],
                           f"the {cond['reason']} event", 15)
        assert len(reasons) == 1, reasons  # one Warning per transition, not one per reconcile
        assert env.api.rayjobs(uid) == []
    assert _rayjobs_of(env, name) == []
    for folder in _folders(env, doc, name):
        assert not folder.exists(), f"{case.id} created {folder}"


def _admission_params():
    for case in CASES:
        if case.outcome == "admission":
            marks = [pytest.mark.xfail(strict=True, reason=case.python_accepts)] if case.python_accepts else []
            yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", _admission_params())
def test_python_rules_refuse_it_too(case: Case):
    """`llm2llm validate` and the local runner must refuse what the API server refuses: one meaning, two
    places (no cluster needed, but kept next to the table)."""
    with pytest.raises(SpecError):
        parse_run(manifest(case, "/tmp/out", "/tmp/file"))


def test_nothing_was_launched_or_written_for_any_bad_spec(env: Env):
    """After every case has sat through several timer ticks: still no RayJob, no folder (xfail cases aside)."""
    items = env.api.custom.list_namespaced_custom_object("ray.io", "v1", env.ns, "rayjobs")["items"]
    launched = sorted(i["metadata"]["name"] for i in items if i["metadata"]["labels"].get(LABEL_RUN) not in XFAIL_NAMES)
    assert launched == []
    assert sorted(p.name for p in env.out.iterdir()) == []
    runs = env.api.custom.list_namespaced_custom_object(GROUP, VERSION, env.ns, PLURAL)["items"]
    admitted = {r["metadata"]["name"] for r in runs}
    expected = {(c.name or c.id.lower()) for c in CASES if c.outcome == "condition"}
    assert expected <= admitted, expected - admitted
    assert env.op.proc.poll() is None, "the operator died"
    assert len(CASES) >= 30
