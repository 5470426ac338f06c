"""Storage faults in the iteration job: output storage that turns unwritable in the middle of a stage.

The job is the real ``llm2llm_jobs.iteration.Iteration`` (stage runner, markers, prepare, score, filter, merge,
storage) with its three model-bound calls faked (training, the inference shards, the teacher shards), so a
whole iteration takes a second on CPU. Root ignores chmod, so a fault is "a file where a directory must go"
(or a directory where a file must go), planted mid-stage by the faked call.

Asserted: the job fails with a StorageError that names the file it could not write; every earlier
iteration's file is byte-for-byte intact (sha256 before/after); the failed iteration is not committed and
keeps the markers of the stages it finished; once the fault is gone, a retried attempt resumes at the failed
stage and commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

import llm2llm_jobs.iteration as iteration_mod
import llm2llm_jobs.models as models_mod
import llm2llm_jobs.train as train_mod
from llm2llm.spec import parse_spec
from llm2llm.storage import StorageError
from llm2llm.status import STAGES

RUN = "faulty"


class Fakes:
    """The model-bound calls, counted; `fault[stage]` runs inside that stage's fake, mid-stage."""

    def __init__(self):
        self.calls = {"train": 0, "infer": 0, "teach": 0}
        self.fault: dict[str, Callable[[], None]] = {}

    def _maybe_fault(self, stage: str) -> None:
        self.calls[stage] += 1
        if stage in self.fault:
            self.fault.pop(stage)()

    def run_train(self, cfg, rows, warm_run=None):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter.bin").write_bytes(os.urandom(256))
        self._maybe_fault("train")
        return {"steps": 2, "tokens": 40, "loss": 1.25}

    def run_tasks(self, path, calls, on_result=None, **_):
        if path.endswith(":infer_shard"):
            self._maybe_fault("infer")
            out = [(["#### 0"] * len(c["prompts"]), "fake", {}) for c in calls]
        else:
            self._maybe_fault("teach")
            out = [{"rows": [], "prompt_tokens": 7, "completion_tokens": 3, "stopped": None} for _ in calls]
        for i, res in enumerate(out):  # as the real one does: the caller commits each result as it comes
            if on_result is not None:
                on_result(i, res)
        return out


def _driver_must_not_resolve(name: str) -> str:
    raise AssertionError(f"the driver resolved {name!r}: models are resolved where they are used (other nodes)")


@pytest.fixture
def fakes(monkeypatch) -> Fakes:
    f = Fakes()
    monkeypatch.setattr(train_mod, "run_train", f.run_train)
    monkeypatch.setattr(models_mod, "resolve_model", _driver_must_not_resolve)
    monkeypatch.setattr(iteration_mod.fanout, "run_tasks", f.run_tasks)
    return f


@pytest.fixture
def spec(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(4)))
    return parse_spec({"data": {"seed": str(seed)}, "output": str(tmp_path / "out"), "loop": {"maxIterations": 3},
                       "filters": {"decontaminate": False}})


def _job(spec, index: int, attempt: int, tmp_path: Path) -> iteration_mod.Iteration:
    return iteration_mod.Iteration(RUN, "uid-1", spec, index, attempt, tmp_path / f"scratch-{index}-{attempt}")


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _block(path: Path) -> Callable[[], None]:
    """A regular file where a directory must go (replacing the directory if it is there)."""
    def fault() -> None:
        if path.is_dir():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not a directory\n")
    return fault


def _occupy(path: Path) -> Callable[[], None]:
    """A directory where a file must go."""
    return lambda: path.mkdir(parents=True, exist_ok=True)


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# (fault id, stage whose fake plants it, path relative to iter-1, kind, the file the error must name, stages
# that must have committed before the failure)
FAULTS = [
    ("infer-folder-is-a-file", "infer", "infer", _block, "infer/predictions.parquet", ("prepare", "train")),
    ("iteration-folder-is-a-file", "infer", ".", _block, "infer/predictions.parquet", ("prepare", "train")),
    ("teach-folder-is-a-file", "teach", "teach", _block, "teach/shard-0.parquet",
     ("prepare", "train", "infer", "score")),
    ("infer-marker-is-a-folder", "infer", "infer/_DONE.json", _occupy, "infer/_DONE.json", ("prepare", "train")),
    ("merge-output-is-a-folder", "teach", "merge/train.parquet", _occupy, "merge/train.parquet",
     ("prepare", "train", "infer", "score", "teach", "filter")),
]


@pytest.mark.parametrize("fault_id,stage,where,kind,names,committed", FAULTS, ids=[f[0] for f in FAULTS])
def test_unwritable_output_mid_stage(fakes, spec, tmp_path, fault_id, stage, where, kind, names, committed):
    root = tmp_path / "out" / RUN
    first = _job(spec, 0, 1, tmp_path).run()
    assert first.index == 0 and (root / "iter-0" / "_ITERATION.json").exists()
    before = _checksums(root)
    assert len(before) >= 15  # run.json, data/seed.parquet, every stage's files and markers of iteration 0

    obstacle = (root / "iter-1" / where).resolve()
    fakes.fault[stage] = kind(obstacle)
    job = _job(spec, 1, 1, tmp_path)
    with pytest.raises(StorageError) as info:
        job.run()
    message = str(info.value)
    assert message.startswith("cannot write ") and f"{root}/iter-1/{names}" in message, message
    assert "Errno" in message  # the OS's reason, e.g. [Errno 20] Not a directory

    # Earlier iterations untouched; this one not committed.
    assert {k: v for k, v in _checksums(root).items() if k in before} == before
    assert not (root / "iter-1" / "_ITERATION.json").is_file()
    if where == ".":  # a reader (the operator) now gets a StorageError too: a Transient, retried
        with pytest.raises(StorageError, match="cannot read"):
            job.store.iterations()
    else:
        assert job.store.iterations().keys() == {0}
        for s in STAGES:
            marker = root / "iter-1" / s / "_DONE.json"
            assert marker.is_file() == (s in committed), (s, committed)

    # The storage is repaired; the retried attempt resumes where the failed one stopped.
    _clear(obstacle)
    calls = dict(fakes.calls)
    done = _job(spec, 1, 2, tmp_path).run()
    assert done.index == 1 and done.attempt == 2
    redone = {s for s in ("train", "infer", "teach") if fakes.calls[s] > calls[s]}
    if where != ".":
        assert not redone & set(committed), f"committed stages ran again: {redone & set(committed)}"
    assert {k: v for k, v in _checksums(root).items() if k in before} == before
    assert job.store.iterations().keys() == {0, 1}


def test_train_stage_fault_is_a_storage_error(fakes, spec, tmp_path):
    root = tmp_path / "out" / RUN
    _job(spec, 0, 1, tmp_path).run()
    before = _checksums(root)
    fakes.fault["train"] = _block(root / "iter-1" / "train")
    try:
        with pytest.raises(StorageError, match="iter-1/train"):
            _job(spec, 1, 1, tmp_path).run()
    finally:
        assert {k: v for k, v in _checksums(root).items() if k in before} == before


def test_failed_write_leaves_no_temporary_file(fakes, spec, tmp_path):
    root = tmp_path / "out" / RUN
    _job(spec, 0, 1, tmp_path).run()
    fakes.fault["infer"] = _occupy(root / "iter-1" / "infer" / "predictions.parquet")
    with pytest.raises(StorageError):
        _job(spec, 1, 1, tmp_path).run()
    assert sorted(p.name for p in (root / "iter-1" / "infer").iterdir()) == ["predictions.parquet"]


@pytest.mark.parametrize("content", ['{"index": 0, "attem', '{"index": "zero"}', "\x00\x01garbage"],
                         ids=["torn-json", "wrong-type", "binary"])
def test_corrupt_manifest_is_a_storage_error(fakes, spec, tmp_path, content):
    root = tmp_path / "out" / RUN
    job = _job(spec, 0, 1, tmp_path)
    job.run()
    (root / "iter-0" / "_ITERATION.json").write_text(content)
    with pytest.raises(StorageError, match="iter-0/_ITERATION.json"):
        job.store.iterations()
