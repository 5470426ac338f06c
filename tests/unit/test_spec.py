"""The spec: what `llm2llm validate` accepts and refuses, with field-level messages and exit code 2."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from llm2llm.cli import main
from llm2llm.spec import CROSS_FIELD_RULES, SpecError, load_run, parse_run
from tests.conftest import REPO

DEMO = REPO / "examples" / "demo" / "run.yaml"


def demo_doc() -> dict:
    return yaml.safe_load(DEMO.read_text())


def test_demo_is_valid_and_defaults_are_filled():
    run = load_run(DEMO)
    assert run.metadata.name == "demo"
    assert run.spec.loop.max_iterations == 3
    # Defaults the user did not write are filled in from the model.
    assert run.spec.filters.near_threshold == 0.95
    assert run.spec.retry.max_attempts == 3
    # The product's loop unless the user asks for a control: failures, no cap on rows per round.
    assert run.spec.loop.select == "failures" and run.spec.loop.rows_per_round is None


def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return doc


_DELETE = object()

BAD = [
    ("spec.loop.maxIterations", 0, "spec.loop.maxIterations"),
    ("spec.teacher.kind", "gpt", "spec.teacher.kind"),
    ("spec.data.seed", _DELETE, "spec.data.seed"),
    ("spec.student.training.lr", -1e-5, "spec.student.training.lr"),
    ("spec.student.trainng", {}, "spec.student.trainng"),
    ("spec.teacher.kind", "openai", "teacher.endpoint is required"),
    ("spec.ray.launcher", "jobs-api", "ray.address is required"),
    ("spec.task.labels", ["only-one"], "task.labels needs at least 2"),
    ("spec.student.training.microBatchSize", 64, "microBatchSize must not exceed"),
    ("spec.task.studentTemplate", "no slot here", "{input} slot"),
    ("metadata.name", "Not_A_Name", "metadata.name"),
    ("spec.student.deepspeed.zeroStage", 4, "spec.student.deepspeed.zeroStage"),
    ("spec.output", "", "spec.output"),
    # No coercion: the API server refuses these, so must `llm2llm validate`.
    ("spec.suspend", "yes", "spec.suspend"),
    ("spec.loop.maxIterations", "3", "spec.loop.maxIterations"),
    ("spec.student.training.lr", "2e-5", "spec.student.training.lr"),
    ("spec.loop.select", "hardest", "spec.loop.select"),
    ("spec.loop.select", "random", "loop.rowsPerRound is required when loop.select is random"),
    ("spec.loop.rowsPerRound", [3, -1], "spec.loop.rowsPerRound.1"),
    ("spec.loop.rowsPerRound", [], "spec.loop.rowsPerRound"),
    # A hub id would be refused by the job on every attempt (nothing is downloaded): refused here instead.
    ("spec.student.model", "HuggingFaceTB/SmolLM2-135M-Instruct", "student.model must be a built-in model"),
    ("spec.teacher.model", "Qwen/Qwen2.5-1.5B-Instruct", "teacher.model must be a built-in model"),
]


@pytest.mark.parametrize("path,value,expect", BAD, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD])
def test_bad_specs_name_the_field(path, value, expect):
    with pytest.raises(SpecError) as err:
        parse_run(_set(demo_doc(), path, value))
    assert expect in str(err.value)


def test_every_cross_field_rule_can_fail():
    # Each rule's Python check must reject something, or it is dead weight in the CRD too.
    cases = {r.message: False for r in CROSS_FIELD_RULES}
    for _, _, expect in BAD:
        for msg in cases:
            if expect in msg:
                cases[msg] = True
    cases["ray.clusterSelector and ray.clusterTemplate are mutually exclusive"] = "clusterSelector" in str(
        pytest.raises(SpecError, parse_run, _set(_set(demo_doc(), "spec.ray.clusterSelector", {"a": "b"}),
                                                 "spec.ray.clusterTemplate", "t")).value)
    cases["loop.stopWhen.plateau.iterations must be smaller than loop.maxIterations"] = "plateau" in str(
        pytest.raises(SpecError, parse_run, _set(demo_doc(), "spec.loop.stopWhen.plateau", {"iterations": 5})).value)
    cases["task.teacherTemplate must contain the {input} slot"] = "teacherTemplate" in str(
        pytest.raises(SpecError, parse_run, _set(demo_doc(), "spec.task.teacherTemplate", "x")).value)
    assert all(cases.values()), [m for m, ok in cases.items() if not ok]


def test_models_are_builtin_names_or_folders():
    for model in ("smollm2-135m", "/shared/models/x", "./models/x", "../x", "~/models/x"):
        parse_run(_set(demo_doc(), "spec.student.model", model))
    # An OpenAI-compatible teacher's model is the endpoint's own name.
    parse_run(_set(demo_doc(), "spec.teacher", {"kind": "openai", "endpoint": "https://x/v1", "model": "gpt-4o-mini"}))
    with pytest.raises(SpecError, match="teacher.model"):
        parse_run(_set(demo_doc(), "spec.teacher", {"kind": "vllm", "model": "gpt-4o-mini"}))


def test_yaml_numbers_read_as_kubectl_reads_them(tmp_path):
    # YAML 1.1 (PyYAML) reads `2e-5` as a string; kubectl sends a number. Strict validation must take it.
    text = DEMO.read_text().replace("spec:\n", "spec:\n  activeDeadlineSeconds: 3600\n", 1)
    doc = yaml.safe_load(text)
    doc["spec"].setdefault("student", {}).setdefault("training", {})["lr"] = "@LR@"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc).replace("'@LR@'", "2e-5"))
    run = load_run(path)
    assert run.spec.student.training.lr == 2e-5
    assert run.spec.active_deadline_seconds == 3600


def test_validate_cli_exit_codes(tmp_path, capsys):
    assert main(["validate", str(DEMO)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(demo_doc(), "spec.loop.maxIterations", 0)))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec.loop.maxIterations" in err and "greater than or equal to 1" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read file" in capsys.readouterr().err
    unreadable = tmp_path / "binary.yaml"
    unreadable.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["validate", str(unreadable)]) == 2
    missing_seed = tmp_path / "noseed.yaml"
    missing_seed.write_text(yaml.safe_dump(_set(demo_doc(), "spec.data.seed", str(tmp_path / "nope.jsonl"))))
    assert main(["validate", str(missing_seed)]) == 2
    assert "spec.data.seed" in capsys.readouterr().err


def test_validate_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "llm2llm.cli", "validate", str(DEMO)], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
