"""Storage: atomic files, commit markers, contiguous iterations, lineage-carrying datasets."""

from __future__ import annotations

import os

import pytest

from llm2llm.data import DataError, load_examples
from llm2llm.schemas import DATASET
from llm2llm.status import IterationStatus
from llm2llm.storage import RunStorage, StorageError
from tests.conftest import GSM8K, REPO


def test_layout_markers_and_contiguous_iterations(tmp_path):
    s = RunStorage(str(tmp_path), "run-a")
    assert s.stage_done(0, "train") is None
    s.mark_done(0, "train", {"steps": 3})
    assert s.stage_done(0, "train") == {"steps": 3}
    assert (tmp_path / "run-a" / "iter-0" / "train" / "_DONE.json").exists()
    s.write_iteration(IterationStatus(index=0, failures=2))
    s.write_iteration(IterationStatus(index=2, failures=1))  # a gap: iteration 2 is not trusted
    assert list(s.iterations()) == [0]
    # No temporary files are left behind by atomic writes.
    leftovers = [p for p in (tmp_path / "run-a").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_a_torn_write_never_replaces_a_good_file(tmp_path, monkeypatch):
    s = RunStorage(str(tmp_path), "r")
    path = s.path("f.json")
    s.write_json(path, {"v": 1})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match="No space left"):
        s.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert s.read_json(path) == {"v": 1}


def test_unwritable_output_is_a_clear_error(tmp_path):
    # A file where the run folder should be: unwritable even for root (CI runs as root).
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    s = RunStorage(str(blocker), "r")
    with pytest.raises(StorageError, match="cannot write"):
        s.write_json(s.path("x.json"), {})


def test_load_examples_gsm8k_jsonl_and_parquet(tmp_path):
    t = load_examples(str(GSM8K / "test.jsonl"), "question", "answer", "test")
    assert t.schema.equals(DATASET) and t.num_rows == 1319
    assert len(set(t.column("id").to_pylist())) == t.num_rows
    import pyarrow.parquet as pq

    pq.write_table(t.select(["input", "output"]).rename_columns(["q", "a"]), tmp_path / "x.parquet")
    p = load_examples(str(tmp_path / "x.parquet"), "q", "a", "seed", limit=10)
    assert p.num_rows == 10 and p.column("id").to_pylist() == t.column("id").to_pylist()[:10]
    with pytest.raises(DataError, match="lacks 'question'"):
        load_examples(str(REPO / "examples" / "demo" / "seed.jsonl"), "question", "answer", "seed")
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"), "q", "a", "seed")
