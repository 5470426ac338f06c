"""Bad input a user can hand llm2llm, one case per defect found: each is refused with a message naming the file,
the row and the field (or the spec field), and an exit code, never a traceback.

tests/unit/test_fuzz_inputs.py throws random inputs at the same readers; these are the cases that once crashed.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import fsspec
from fsspec.registry import known_implementations
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llm2llm.cli import main
from llm2llm.data import DataError, load_examples
from llm2llm.spec import SpecError, TaskSpec, load_run, parse_spec
from llm2llm.uris import UnsupportedURI, driver_problem, unsupported_uris
from llm2llm_operator.reconcile import Context, reconcile
from llm2llm_operator.settings import Settings

GSM8K = TaskSpec(kind="gsm8k")
LABELS = TaskSpec(kind="classification", labels=["positive", "negative"])
# A scheme fsspec knows (registered below) whose driver package is not installed: like gs:// without gcsfs,
# but the same on every machine, whatever drivers it has.
NO_DRIVER = "llm2llm-nodriver"


@pytest.fixture(autouse=True)
def _scheme_without_driver():
    fsspec.register_implementation(NO_DRIVER, "llm2llm_missing_driver.FileSystem",
                                   errtxt="Install llm2llm-missing-driver to access it")
    yield
    known_implementations.pop(NO_DRIVER, None)


def _jsonl(path: Path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _run_yaml(tmp_path: Path, **spec) -> str:
    doc = {"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun", "metadata": {"name": "bad"},
           "spec": {"output": str(tmp_path / "runs"), **spec}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# --- data files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,words", [
    ('{"question": "caf\xe9?", "answer": "#### 1"}\n'.encode("latin-1"), ["line 1", "not UTF-8", "0xe9", "column 18"]),
    ('{"question": "x", "answer": "#### 1"}\n'.encode("utf-16"), ["line 1", "UTF-16"]),
    (b'{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": "#### 2"}\n\xff\n', ["line 3", "not UTF-8"]),
    (b"PAR1\x15\x04\x15\xb0\x01", ["line 1", "not UTF-8", "name it .parquet"]),
], ids=["latin-1", "utf-16", "bad-byte-on-line-3", "parquet-named-jsonl"])
def test_a_file_that_is_not_utf8_names_the_line(tmp_path, raw, words):
    path = tmp_path / "seed.jsonl"
    path.write_bytes(raw)
    with pytest.raises(DataError) as err:
        load_examples(str(path), "question", "answer", "seed")
    assert all(w in str(err.value) for w in [str(path), *words]), str(err.value)


def test_a_utf8_byte_order_mark_is_harmless(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "q", "answer": "#### 1"}).encode() + b"\n")
    assert load_examples(str(path), "question", "answer", "seed", task=GSM8K).column("input").to_pylist() == ["q"]


@pytest.mark.parametrize("line,got", [("[1, 2]", "a list"), ('"x"', "a string"), ("3", "a number"), ("null", "null"),
                                      ("true", "a boolean")])
def test_a_line_that_is_not_an_object_is_refused(tmp_path, line, got):
    path = _jsonl(tmp_path / "seed.jsonl", {"question": "q", "answer": "#### 1"}, line)
    with pytest.raises(DataError, match=rf"seed.jsonl: line 2: not a JSON object but {got}"):
        load_examples(path, "question", "answer", "seed")


def test_json_that_python_cannot_hold_is_refused_with_its_line(tmp_path):
    deep = _jsonl(tmp_path / "deep.jsonl", '{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "#### 1"}')
    with pytest.raises(DataError, match="deep.jsonl: line 1: not usable JSON"):
        load_examples(deep, "question", "answer", "seed")
    big = _jsonl(tmp_path / "big.jsonl", '{"question": "q", "answer": ' + "9" * 5000 + "}")
    with pytest.raises(DataError, match="big.jsonl: line 1: not usable JSON"):
        load_examples(big, "question", "answer", "seed")
    torn = _jsonl(tmp_path / "torn.jsonl", '{"question": "q", "answer": "#### 1"}', '{"question": "q2", "ans')
    with pytest.raises(DataError, match="torn.jsonl: line 2: not valid JSON"):
        load_examples(torn, "question", "answer", "seed")


@pytest.mark.parametrize("value,words", [
    (None, "must be a string, got null"),
    ({"a": 1}, "must be a string, got an object"),
    (["x"], "must be a string, got a list"),
    (7, "must be a string, got a number (7)"),
    (True, "must be a string, got a boolean"),
    ("", "is empty"),
    ("  \t", "is only whitespace"),
    ("\ud800", "is not valid Unicode (a lone surrogate"),
])
def test_a_value_that_is_no_text_names_the_row_and_field(tmp_path, value, words):
    path = _jsonl(tmp_path / "seed.jsonl", {"question": "q", "answer": "#### 1"}, {"question": value, "answer": "#### 2"})
    with pytest.raises(DataError) as err:
        load_examples(path, "question", "answer", "seed")
    assert f"seed.jsonl: line 2, field 'question': {words}" in str(err.value)


def test_outputs_must_fit_the_task(tmp_path):
    path = _jsonl(tmp_path / "seed.jsonl", {"q": "a", "a": "#### 3"}, {"q": "b", "a": "3 apples"}, {"q": "c", "a": "#### x"})
    with pytest.raises(DataError) as err:
        load_examples(path, "q", "a", "seed", task=GSM8K)
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [
        "line 2, field 'a': '3 apples' has no final answer '#### <number>' (task.kind gsm8k)",
        "line 3, field 'a': '#### x' has no final answer '#### <number>' (task.kind gsm8k)"]
    labels = _jsonl(tmp_path / "labels.jsonl", {"t": "good", "l": " positive "}, {"t": "meh", "l": "neutral"})
    with pytest.raises(DataError, match=r"line 2, field 'l': 'neutral' is not one of task.labels \(positive, negative\)"):
        load_examples(labels, "t", "l", "seed", task=LABELS)
    # Without a task (or for exact), any non-empty text is an output.
    assert load_examples(path, "q", "a", "seed").num_rows == 3
    assert load_examples(path, "q", "a", "seed", task=TaskSpec(kind="exact")).num_rows == 3


def test_many_bad_rows_are_listed_up_to_a_bound(tmp_path):
    path = _jsonl(tmp_path / "seed.jsonl", *({"q": f"{i}", "a": None} for i in range(25)))
    with pytest.raises(DataError) as err:
        load_examples(path, "q", "a", "seed")
    assert len(err.value.problems) == 11 and err.value.problems[-1].endswith("... and 15 more problems")
    assert "line 10, field 'a'" in err.value.problems[9]


def test_rows_past_the_limit_are_not_read(tmp_path):
    path = _jsonl(tmp_path / "seed.jsonl", {"q": "a", "a": "#### 1"}, "{not json", {"q": None})
    assert load_examples(path, "q", "a", "seed", limit=1, task=GSM8K).num_rows == 1
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_examples(path, "q", "a", "seed", limit=2)


def test_a_json_string_may_hold_line_separators(tmp_path):
    # U+2028, U+0085, \x1c are line breaks to str.splitlines, but plain characters inside a JSON string.
    rows = [{"q": f"one{sep}two", "a": "#### 1"} for sep in ("\u2028", "\u0085", "\x1c", "\r")]
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    t = load_examples(str(path), "q", "a", "seed", task=GSM8K)
    assert t.column("input").to_pylist() == [r["q"] for r in rows]


def test_parquet_problems_name_the_file_column_and_row(tmp_path):
    good = pa.table({"q": ["a", "b"], "a": ["#### 1", "#### 2"]})
    pq.write_table(good, tmp_path / "good.parquet")
    raw = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "torn.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="torn.parquet: not a readable Parquet file"):
        load_examples(str(tmp_path / "torn.parquet"), "q", "a", "seed")
    pq.write_table(pa.table({"q": ["a"], "a": [3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="ints.parquet: column 'a' has type int64; it must hold strings"):
        load_examples(str(tmp_path / "ints.parquet"), "q", "a", "seed")
    pq.write_table(pa.table({"q": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol.parquet: no column 'a' \(the file has 'q'\)"):
        load_examples(str(tmp_path / "nocol.parquet"), "q", "a", "seed")
    pq.write_table(pa.table({"q": ["a", None], "a": ["#### 1", "#### 2"]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match="null.parquet: row 2, field 'q': must be a string, got null"):
        load_examples(str(tmp_path / "null.parquet"), "q", "a", "seed")
    not_utf8 = pa.array([b"fine", b"caf\xe9"], type=pa.binary()).view(pa.string())  # a writer that did not check
    pq.write_table(pa.table({"q": not_utf8, "a": ["#### 1", "#### 2"]}), tmp_path / "latin.parquet")
    with pytest.raises(DataError, match="latin.parquet: row 2, field 'q': not UTF-8 text"):
        load_examples(str(tmp_path / "latin.parquet"), "q", "a", "seed")
    labels = pa.table({"q": pa.array(["a"]), "a": pa.array(["positive"]).dictionary_encode()})
    pq.write_table(labels, tmp_path / "dict.parquet")
    assert load_examples(str(tmp_path / "dict.parquet"), "q", "a", "seed", task=LABELS).num_rows == 1


def test_validate_reads_every_row_the_run_uses(tmp_path, capsys):
    seed = _jsonl(tmp_path / "seed.jsonl", {"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": 2})
    assert main(["validate", _run_yaml(tmp_path, data={"seed": seed})]) == 2
    assert "spec.data.seed: " + seed + ": line 2, field 'answer': must be a string, got a number (2)" \
        in capsys.readouterr().err
    assert main(["validate", _run_yaml(tmp_path, data={"seed": seed, "seedLimit": 1})]) == 0
    latin = tmp_path / "test.jsonl"
    latin.write_bytes('{"question": "\xe9", "answer": "#### 1"}\n'.encode("latin-1"))
    assert main(["validate", _run_yaml(tmp_path, data={"seed": seed, "seedLimit": 1, "test": str(latin)})]) == 2
    assert "spec.data.test: " in capsys.readouterr().err


# --- the spec --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ("[" * 5000 + "]" * 5000, "not usable YAML"),
    ("apiVersion: llm2llm.io/v1alpha1\nkind: AugmentationRun\nmetadata: {name: x}\n"
     "spec: {data: {seed: s, seedLimit: 1" + "0" * 5000 + "}, output: o}\n", "not usable YAML"),
])
def test_yaml_python_cannot_hold_is_a_spec_error(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=words):
        load_run(path)


# --- URIs without a driver -------------------------------------------------------------------------------

def test_uris_without_a_driver_name_the_field_and_the_package():
    spec = parse_spec({"data": {"seed": f"{NO_DRIVER}://b/seed.jsonl", "test": "foo://b/test.jsonl"},
                       "output": "S3://b/runs"})
    assert [(u.field, u.why) for u in unsupported_uris(spec)] == [
        ("data.seed", f"no driver for {NO_DRIVER}:// is installed here: Install llm2llm-missing-driver to access it"),
        ("data.test", "unknown URI scheme 'foo': no fsspec driver serves foo://"),
        ("output", "unknown URI scheme 'S3': no fsspec driver serves S3:// (schemes are lowercase: s3://)"),
    ]
    assert driver_problem(f"simplecache::{NO_DRIVER}://b/x") is not None  # every link of a chain needs its driver
    assert driver_problem("://b/x").startswith("'://' is not a URI scheme")
    for fine in ("/data/seed.jsonl", "seed.jsonl", "file:///data/seed.jsonl", "memory://x", "https://h/x.jsonl"):
        assert driver_problem(fine) is None, fine


def test_validate_and_run_refuse_them_before_anything_starts(tmp_path, capsys):
    path = _run_yaml(tmp_path, data={"seed": f"{NO_DRIVER}://bucket/seed.jsonl"}, output="foo://bucket/runs")
    for argv in (["validate", path], ["validate", "--no-check-data", path], ["run", path]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"spec.data.seed: '{NO_DRIVER}://bucket/seed.jsonl': no driver" in err and "llm2llm-missing-driver" in err
        assert "spec.output: 'foo://bucket/runs': unknown URI scheme 'foo'" in err


def _operator(tmp_path, **spec):
    body = {"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {"data": {"seed": "/data/seed.jsonl"}, "output": str(tmp_path / "runs"),
                     "ray": {"launcher": "rayjob", "clusterSelector": {"c": "1"}}, **spec}}

    def no_launcher(*_):
        raise AssertionError("nothing may be launched for an invalid run")

    # No Kubernetes client: the URI check comes before anything the operator asks the API server.
    return reconcile(body, Context(Settings(), core=None, custom=None, jobs_api=no_launcher))


@pytest.mark.parametrize("field,data", [
    ("data.seed", {"seed": f"{NO_DRIVER}://bucket/seed.jsonl"}),
    ("data.test", {"seed": "/data/seed.jsonl", "test": "foo://bucket/test.jsonl"}),
])
def test_the_operator_refuses_data_it_has_no_driver_for(tmp_path, field, data):
    out = _operator(tmp_path, data=data)
    assert out.invalid is not None and out.invalid.reason == "DataUnsupported"
    assert out.invalid.message.startswith(f"spec.{field}: ")
    ready = next(c for c in out.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "DataUnsupported" and out.status["phase"] == "Failed"
    assert not (tmp_path / "runs").exists()


def test_unsupported_uri_is_a_value_error_naming_the_field():
    err = UnsupportedURI("data.seed", "gs://b/x", "no driver")
    assert isinstance(err, ValueError) and str(err) == "spec.data.seed: 'gs://b/x': no driver"


# --- llm2llm run: the Ray address ------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_run(tmp_path: Path, **spec) -> str:
    seed = _jsonl(tmp_path / "seed.jsonl", {"question": "q", "answer": "#### 1"})
    return _run_yaml(tmp_path, data={"seed": seed}, **spec)


@pytest.mark.parametrize("address", [f"http://127.0.0.1:{_closed_port()}", "not an address"])
def test_run_against_an_unreachable_ray_says_so(tmp_path, capsys, address):
    assert main(["run", _demo_run(tmp_path), "--address", address]) == 1
    err = capsys.readouterr().err
    assert f"the Ray cluster at {address!r} cannot be reached" in err and "(--address)" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_run_names_spec_ray_address_when_it_comes_from_there(tmp_path, capsys):
    address = f"http://127.0.0.1:{_closed_port()}"
    assert main(["run", _demo_run(tmp_path, ray={"launcher": "jobs-api", "address": address})]) == 1
    assert "(spec.ray.address)" in capsys.readouterr().err


@pytest.mark.parametrize("content,words", [
    (b"[1, 2]", "is not a run record"),
    (b'{"name": "bad", "uid": 5}', "is not a run record"),
    (b'{"name": "bad", "uid": "u-1", "spec": "x"}', "is not a run record"),
    (b'{"name": "bad", "ui', "corrupt JSON in"),
], ids=["list", "uid-number", "spec-string", "torn"])
def test_run_refuses_a_run_json_that_is_no_record_before_starting_ray(tmp_path, capsys, content, words):
    (tmp_path / "runs" / "bad").mkdir(parents=True)
    (tmp_path / "runs" / "bad" / "run.json").write_bytes(content)
    # No --address: an accepted run.json would start an embedded Ray head, which this test must never get to.
    assert main(["run", _demo_run(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llm2llm: cannot run 'bad': " in err and "run.json" in err and words in err and "Traceback" not in err
    assert (tmp_path / "runs" / "bad" / "run.json").read_bytes() == content  # left as it was


# --- llm2llm status --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,words", [
    (b'{"phase": "Running", "iterations": [{"ind', "corrupt JSON in"),
    (b"[1, 2]", "not a run status: the document: Input should be a valid dictionary"),
    (b'{"phase": "Bogus"}', "not a run status: phase: Input should be"),
    (b'{"iterations": [{"index": "zero"}]}', "not a run status: iterations.0.index"),
    (b"[" * 100_000 + b"]" * 100_000, "corrupt JSON in"),
    (b"\xff\xfe{}", "corrupt JSON in"),
], ids=["torn", "list", "bad-phase", "bad-iteration", "deep", "not-utf8"])
def test_status_of_a_corrupt_status_json_says_what_is_wrong(tmp_path, capsys, content, words):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "status.json").write_bytes(content)
    assert main(["status", str(tmp_path / "runs" / "demo")]) == 2
    err = capsys.readouterr().err
    assert words in err and "status.json" in err and "Traceback" not in err


def test_status_of_an_unsupported_uri_or_no_folder(tmp_path, capsys):
    assert main(["status", "foo://bucket/runs/demo"]) == 2
    assert "unsupported output URI" in capsys.readouterr().err
    assert main(["status", "/"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nothing")]) == 1
    assert "no status.json" in capsys.readouterr().err
