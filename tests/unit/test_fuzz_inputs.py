"""Property-based fuzzing of everything a user hands llm2llm: run.yaml, the data files, a run's status files.

The property, for every input: the outcome is success, or one of our own errors (SpecError, DataError,
StorageError, a pydantic ValidationError from a model's own validation), or a CLI exit code 2 (1 for a folder
with no status.json) with a message on stderr; never another exception, never a traceback, never a hang.
What is accepted is checked too: an accepted data row fits the task, an accepted spec re-reads from its wire form.

Deterministic and bounded for CI: ``derandomize=True`` (the examples are a function of the test's source), no
example database, a fixed ``max_examples`` per test (``BUDGET``, listed in docs/reliability.md), and a per-test
timeout against hangs. The CLI runs in-process (``llm2llm.cli.main``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm2llm.cli import main
from llm2llm.data import MAX_PROBLEMS, DataError, load_examples
from llm2llm.spec import AugmentationRun, SpecError, TaskSpec, load_run, parse_run, spec_to_wire
from llm2llm.status import IterationStatus, RunStatus
from llm2llm.storage import RunStorage, StorageError
from llm2llm.tasks import gsm8k_extract
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)

# Examples per test; the whole module runs in 12-30 s on 2 shared cores. LLM2LLM_FUZZ_SCALE=N runs N times as
# many (a longer hunt by hand; CI leaves it unset).
_SCALE = int(os.environ.get("LLM2LLM_FUZZ_SCALE", "1"))
BUDGET = {
    "yaml_documents": 150, "yaml_text": 150, "spec_mutations": 300, "validate_cli": 120,
    "jsonl": 300, "parquet": 300, "status_cli": 200, "status_mutations": 150, "run_files": 150,
}
_BASE = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(name: str) -> settings:
    return settings(_BASE, max_examples=BUDGET[name] * _SCALE)


_TMP = Path(tempfile.mkdtemp(prefix="llm2llm-fuzz-"))  # one folder, files overwritten per example


@pytest.fixture(scope="module", autouse=True)
def _remove_scratch():
    yield
    shutil.rmtree(_TMP, ignore_errors=True)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _clean_refusal(rc: int, err: str, *words: str) -> None:
    event(f"exit {rc}")
    assert rc == 2, (rc, err)
    assert err.strip() and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# --- values ----------------------------------------------------------------------------------------------

# Strings that mean something to llm2llm: answers of each task, labels, URIs, template slots, separators.
SPECIAL = st.sampled_from([
    "", " ", "\t\n", "#### 5", "#### -1,000.5", "3 apples\n#### 3", "#### x", "positive", " negative ", "neutral",
    "{input}", "{output}", "s3://b/x.jsonl", "gs://b/x.jsonl", "foo://x", "://x", "S3://b", "memory://fuzz/x",
    "file:///nonexistent", "simplecache::gs://b/x", "\u2028", "\x1c", "\x00", "\ud800", "NaN", "1e999", "yes", "~",
])
TEXT = st.one_of(SPECIAL, st.text(max_size=40))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.just(2**64), st.floats(), TEXT)
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(TEXT, kids, max_size=4)), max_leaves=12)


# --- the spec --------------------------------------------------------------------------------------------

DEMO = yaml.safe_load((REPO / "examples" / "demo" / "run.yaml").read_text())
DEMO["spec"]["data"].update(seed=str(REPO / "examples/demo/seed.jsonl"), test=str(REPO / "examples/demo/test.jsonl"))
DEMO["spec"]["output"] = str(_TMP / "runs")


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc: Any, path: tuple, action: str, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "replace":
        parent[key] = value
    elif action == "unknown-key" and isinstance(parent[key], dict):
        parent[key]["fuzzField"] = value
    elif action == "wrap":
        parent[key] = [parent[key]]
    elif action == "stringify":
        parent[key] = json.dumps(parent[key])
    elif action == "null":
        parent[key] = None
    return doc


MUTATIONS = st.lists(st.tuples(st.sampled_from(_paths(DEMO)),
                               st.sampled_from(["delete", "replace", "unknown-key", "wrap", "stringify", "null"]),
                               VALUES), min_size=1, max_size=3)


def _apply(doc: dict, mutations: list) -> dict:
    for path, action, value in mutations:
        try:
            doc = _mutate(doc, path, action, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced the path
    return doc


def _check_run(run: AugmentationRun) -> None:
    """An accepted run is what the job is given: its wire form must read back to the same spec."""
    again = parse_run({"apiVersion": run.api_version, "kind": run.kind, "metadata": {"name": run.metadata.name},
                       "spec": spec_to_wire(run.spec)})
    assert again.spec == run.spec


@fuzz("yaml_documents")
@given(doc=st.one_of(VALUES, st.fixed_dictionaries({"apiVersion": TEXT, "kind": TEXT, "metadata": VALUES,
                                                     "spec": VALUES})))
def test_random_documents_are_a_run_or_a_spec_error(doc):
    path = _TMP / "doc.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    except yaml.YAMLError:
        return  # not representable as YAML
    _check_loaded_run(path)


def _check_loaded_run(path: Path) -> None:
    try:
        _check_run(load_run(path))
    except SpecError as err:
        event("SpecError")
        assert str(err).startswith(f"{path}: invalid AugmentationRun:\n  - ")
    else:
        event("a run")


_YAML_TOKENS = ["a", "spec", "data", ":", ": ", "- ", "\n", "\n  ", "  ", "{", "}", "[", "]", ",", "&x ", "*x", "!!str ",
                "!!python/object:os.system ", "<<: ", "? ", "'", '"', "#", "---\n", "...\n", "|\n", ">\n", "%YAML 1.1\n",
                "1", "1e5", "0x1F", ".inf", "~", "\t", "\x00", "\ufeff", "\\", "9" * 5000, "[" * 3000]


@fuzz("yaml_text")
@given(text=st.one_of(st.lists(st.sampled_from(_YAML_TOKENS), max_size=40).map("".join), st.text(max_size=200)),
       raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_random_yaml_text_is_a_run_or_a_spec_error(text, raw):
    path = _TMP / "text.yaml"
    if raw is None:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(raw)
    _check_loaded_run(path)


@fuzz("spec_mutations")
@given(mutations=MUTATIONS)
def test_mutated_specs_are_a_run_or_name_the_field(mutations):
    doc = _apply(DEMO, mutations)
    try:
        run = parse_run(doc, "fuzz.yaml")
    except SpecError as err:
        event("SpecError")
        assert err.problems and all(p.strip() for p in err.problems)
        return
    event("a run")
    _check_run(run)


@fuzz("validate_cli")
@given(mutations=MUTATIONS, check_data=st.booleans())
def test_validate_cli_exits_0_or_2_with_a_message(mutations, check_data):
    path = _TMP / "validate.yaml"
    doc = _apply(DEMO, mutations)
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    except yaml.YAMLError:
        return
    rc, out, err = _cli("validate", str(path), *([] if check_data else ["--no-check-data"]))
    if rc == 0:
        event("exit 0")
        assert "valid AugmentationRun" in out and not err
    else:
        _clean_refusal(rc, err, str(path))


# --- data files ------------------------------------------------------------------------------------------

# Rows that fit some task, so that accepted files are common enough to check what is accepted.
GOOD_QUESTION = st.text(min_size=1, max_size=30).filter(str.strip)
GOOD_ANSWER = st.sampled_from(["#### 5", "3 + 4 = 7\n#### 7", "#### -1,000.5", "positive", " negative ", "negative"])
TASKS = st.sampled_from([TaskSpec(kind="gsm8k"), TaskSpec(kind="exact"),
                         TaskSpec(kind="classification", labels=["positive", "negative"])])
FIELD = st.one_of(SPECIAL, TEXT, VALUES)
ROW = st.one_of(
    st.fixed_dictionaries({"question": GOOD_QUESTION, "answer": GOOD_ANSWER}),
    st.fixed_dictionaries({"question": GOOD_QUESTION, "answer": GOOD_ANSWER}),
    st.fixed_dictionaries({"question": FIELD, "answer": FIELD}, optional={"extra": VALUES}),
    st.dictionaries(st.sampled_from(["question", "answer", "q", "label"]), FIELD, max_size=3),
    VALUES,  # lines that are no object at all
)


@st.composite
def jsonl_files(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=500))
    lines = []
    for row in draw(st.lists(ROW, max_size=8)):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.text(max_size=30)))  # not JSON
        else:
            try:
                lines.append(json.dumps(row, ensure_ascii=kind < 5))
            except ValueError:  # NaN in strict mode and the like
                lines.append(str(row))
        extra = draw(st.integers(0, 39))
        if extra == 0:
            lines.append(json.dumps({"question": "x" * 300_000, "answer": "#### 1"}))  # a huge line, within reason
        elif extra == 1:
            lines.append('{"question": "q", "answer": ' + "9" * 5000 + "}")  # more digits than Python converts
        elif extra == 2:
            lines.append('{"question": ' + "[" * 50_000 + "]" * 50_000 + "}")  # nested deeper than Python recurses
    sep = draw(st.sampled_from(["\n", "\r\n", "\n\n", "\r"]))
    text = sep.join(lines) + draw(st.sampled_from(["", sep]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252"]))
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")


def _check_loaded(uri: str, task: TaskSpec, limit: int | None) -> None:
    try:
        t = load_examples(uri, "question", "answer", "seed", limit, task=task)
    except DataError as err:
        event("DataError")
        assert err.problems and len(err.problems) <= MAX_PROBLEMS + 1
        assert all(p.startswith(f"{uri}: ") for p in err.problems), err.problems
        return
    event("rows")
    rows = t.to_pylist()
    assert rows and len({r["id"] for r in rows}) == len(rows)
    assert limit is None or len(rows) <= limit
    labels = {" ".join(label.split()) for label in task.labels or []}
    for r in rows:  # what a run trains on: non-empty text with the task's answer format
        assert isinstance(r["input"], str) and r["input"].strip() and r["output"].strip()
        if task.kind == "gsm8k":
            assert gsm8k_extract(r["output"]) is not None
        if task.kind == "classification":
            assert " ".join(r["output"].split()) in labels


@fuzz("jsonl")
@given(raw=jsonl_files(), task=TASKS, limit=st.one_of(st.none(), st.integers(1, 5)))
def test_jsonl_is_rows_that_fit_or_a_data_error(raw, task, limit):
    path = _TMP / "seed.jsonl"
    path.write_bytes(raw)
    _check_loaded(str(path), task, limit)


_COLUMN_TYPES = ["string", "large_string", "dictionary", "not-utf8", "int64", "float64", "bool", "binary", "list",
                 "struct", "null"]


def _encodable(values: list) -> list:
    # Arrow strings are UTF-8: a lone surrogate cannot be one (the "not-utf8" column makes invalid bytes instead).
    return [v if v is None else v.encode("utf-8", "replace").decode("utf-8") for v in values]


@st.composite
def parquet_columns(draw, n: int, name: str) -> pa.Array:
    kind = draw(st.sampled_from(["string"] * len(_COLUMN_TYPES) + _COLUMN_TYPES))
    if draw(st.booleans()):  # values that fit: the column of a usable file
        strings = st.lists(GOOD_ANSWER if name == "answer" else GOOD_QUESTION, min_size=n, max_size=n)
    else:
        strings = st.lists(st.one_of(st.none(), SPECIAL, st.text(max_size=20)), min_size=n, max_size=n)
    strings = strings.map(_encodable)
    if kind == "not-utf8":  # a string column whose bytes are not UTF-8 (written by a tool that did not check)
        return pa.array(draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n)), type=pa.binary()).view(pa.string())
    if kind in ("string", "large_string", "dictionary"):
        arr = pa.array(draw(strings), type=pa.large_string() if kind == "large_string" else pa.string())
        return arr.dictionary_encode() if kind == "dictionary" else arr
    if kind == "int64":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), min_size=n, max_size=n)))
    if kind == "float64":
        return pa.array(draw(st.lists(st.floats(), min_size=n, max_size=n)), type=pa.float64())
    if kind == "bool":
        return pa.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if kind == "binary":
        return pa.array(draw(st.lists(st.binary(max_size=10), min_size=n, max_size=n)), type=pa.binary())
    if kind == "list":
        return pa.array(draw(st.lists(st.lists(st.text(max_size=5), max_size=3), min_size=n, max_size=n)))
    if kind == "struct":
        return pa.array([{"a": x} for x in draw(strings)], type=pa.struct([("a", pa.string())]))
    return pa.nulls(n)


@st.composite
def parquet_files(draw) -> bytes:
    n = draw(st.integers(0, 6))
    names = draw(st.one_of(st.just(["question", "answer"]), st.just(["answer", "label", "question"]),
                           st.lists(st.sampled_from(["question", "answer", "q", "label"]), min_size=1, max_size=4)))
    columns = [draw(parquet_columns(n, name)) for name in names]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(columns, names=names), buf)
    raw = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "tail"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    elif damage == "tail":
        raw = raw[:-8] + draw(st.binary(min_size=8, max_size=8))
    return raw


@fuzz("parquet")
@given(raw=parquet_files(), task=TASKS, limit=st.one_of(st.none(), st.integers(1, 5)))
def test_parquet_is_rows_that_fit_or_a_data_error(raw, task, limit):
    path = _TMP / "seed.parquet"
    path.write_bytes(raw)
    _check_loaded(str(path), task, limit)


# --- status files ----------------------------------------------------------------------------------------

def _valid_status() -> dict:
    st_ = RunStatus(phase="Running", max_iterations=3, iteration_label="1/3", stage="train", output="/o/r")
    st_.set_condition("Ready", True, "SpecValid", "ok", 1)
    st_.record_iteration(IterationStatus(index=0, train_rows=8, seed_accuracy=0.5, rejected={"duplicate": 2},
                                         seconds={"train": 3.0}))
    return st_.wire()


STATUS = _valid_status()
STATUS_MUTATIONS = st.lists(st.tuples(st.sampled_from(_paths(STATUS)),
                                      st.sampled_from(["delete", "replace", "unknown-key", "wrap", "stringify", "null"]),
                                      VALUES), min_size=1, max_size=3)


def _status_file(content: bytes) -> str:
    run = _TMP / "runs" / "r"
    run.mkdir(parents=True, exist_ok=True)
    (run / "status.json").write_bytes(content)
    return str(run)


def _dump(doc: Any) -> bytes:
    try:
        return json.dumps(doc).encode("utf-8", errors="surrogatepass")
    except ValueError:
        return str(doc).encode("utf-8", errors="surrogatepass")


def _check_status_cli(run_dir: str, as_json: bool) -> None:
    rc, out, err = _cli("status", run_dir, *(["--json"] if as_json else []))
    if rc == 0:
        event("exit 0")
        assert out.strip() and not err
    else:
        _clean_refusal(rc, err, "status.json")


@fuzz("status_cli")
@given(content=st.one_of(st.binary(max_size=300), VALUES.map(_dump),
                         st.just(b"[" * 100_000 + b"]" * 100_000), st.just(b"null")),
       as_json=st.booleans())
def test_status_cli_on_any_status_json(content, as_json):
    _check_status_cli(_status_file(content), as_json)


@fuzz("status_mutations")
@given(mutations=STATUS_MUTATIONS, as_json=st.booleans())
def test_status_cli_on_mutated_statuses(mutations, as_json):
    doc = _apply(STATUS, mutations)
    try:
        RunStatus.model_validate(doc)
    except ValueError:
        pass  # the model's own ValidationError: what the CLI reports
    _check_status_cli(_status_file(_dump(doc)), as_json)


@fuzz("run_files")
@given(content=st.one_of(st.binary(max_size=300), VALUES.map(_dump),
                         st.lists(st.tuples(st.sampled_from(_paths(IterationStatus(index=0).model_dump(by_alias=True))),
                                            st.sampled_from(["delete", "replace", "wrap", "null"]), VALUES), max_size=3)
                         .map(lambda m: _dump(_apply(IterationStatus(index=0).model_dump(by_alias=True), m)))),
       name=st.sampled_from(["_ITERATION.json", "train/_DONE.json", "status.json", "run.json"]))
def test_run_files_read_as_values_or_storage_errors(content, name):
    store = RunStorage(str(_TMP / "runs"), "files")
    folder = _TMP / "runs" / "files" / ("" if name in ("status.json", "run.json") else "iter-0")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    with contextlib.suppress(StorageError):
        store.read_json(str(folder / name))
    with contextlib.suppress(StorageError):
        it = store.iteration(0)
        assert it is None or isinstance(it, IterationStatus)
    with contextlib.suppress(StorageError):
        assert set(store.iterations()) <= {0}
    with contextlib.suppress(StorageError):
        store.stage_done(0, "train")
    with contextlib.suppress(StorageError):
        record = store.run_record()
        assert record is None or isinstance(record, dict) and isinstance(record.get("uid", ""), str)
    (folder / name).unlink()
