"""Run storage on a real S3-compatible server (versitygw, tests/s3server.py), reached as jobs reach it: s3fs
with the standard AWS_* variables.

- RunStorage round-trips: JSON, Parquet, markers, iterations(), list, delete_all; a marker another process
  writes is seen even after this process listed the folder (s3fs's listing cache).
- Atomic writes: a large file goes up as a multipart upload and a writer killed in the middle leaves no
  object; readers of a file being overwritten see the old or the new bytes, never a mix.
- The train stage's model upload: an attempt torn after some files, retried while one of its late PUTs still
  lands, commits exactly one copy of each file (no nested folder, nothing of the torn attempt), and the
  committed model loads with transformers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

import llm2llm_jobs.iteration as iteration_mod
import llm2llm_jobs.train as train_mod
from llm2llm.schemas import DATASET, row_id, table
from llm2llm.spec import parse_spec
from llm2llm.status import IterationStatus
from llm2llm.storage import MARKER, RunStorage, StorageError
from llm2llm_jobs import fanout, models
from tests.conftest import REPO
from tests.integration.tiny import tiny_spec

pytestmark = pytest.mark.integration


def _output(s3) -> str:
    return f"s3://{s3.bucket}/t-{uuid.uuid4().hex[:8]}"


def _keys(store: RunStorage, rel: str = "") -> list[str]:
    """Every object under the run (or one of its folders), relative to it, straight from the server."""
    root = store.path(rel) if rel else store.root
    store.fs.invalidate_cache()
    return sorted(p[len(root) + 1:] for p in store.fs.find(root))


def _rows(n: int) -> pa.Table:
    rows = [{"id": row_id(f"q{i}", f"a{i}"), "parent_id": None, "iteration": 0, "source": "seed",
             "teacher_model": None, "prompt_hash": None, "input": f"q{i}", "output": f"a{i}"} for i in range(n)]
    return table(rows, DATASET)


# --- RunStorage round-trips ----------------------------------------------------------------------------

def test_run_storage_round_trips(s3):
    store = RunStorage(_output(s3), "rt")
    assert store.iterations() == {} and store.stage_done(0, "train") is None and store.list(store.path("iter-0")) == []
    store.write_json(store.path("run.json"), {"name": "rt", "spec": {"a": [1, 2]}})
    assert store.read_json(store.path("run.json")) == {"name": "rt", "spec": {"a": [1, 2]}}
    assert store.read_json(store.path("missing.json")) is None

    t = _rows(1000)
    store.write_table(store.path("data", "seed.parquet"), t)
    assert store.read_table(store.path("data", "seed.parquet"), DATASET).equals(t)
    with pytest.raises(FileNotFoundError):
        store.read_table(store.path("data", "test.parquet"))

    store.mark_done(0, "prepare", {"seed_rows": 1000})
    assert store.stage_done(0, "prepare") == {"seed_rows": 1000}
    store.write_iteration(IterationStatus(index=0, failures=3))
    store.write_iteration(IterationStatus(index=2, failures=1))  # a gap: iteration 2 is not trusted
    assert list(store.iterations()) == [0] and store.iterations()[0].failures == 3
    assert store.uri("iter-0") == f"{store.output}/rt/iter-0"
    assert store.list(store.path("iter-0")) == ["_ITERATION.json", "prepare"]
    assert _keys(store) == ["data/seed.parquet", "iter-0/_ITERATION.json", f"iter-0/prepare/{MARKER}",
                            "iter-2/_ITERATION.json", "run.json"]

    store.write_bytes(store.path("iter-0", "x.json"), b"{not json")
    with pytest.raises(StorageError, match="corrupt JSON in .*iter-0/x.json"):
        store.read_json(store.path("iter-0", "x.json"))

    store.delete_all()
    assert _keys(store) == [] and not store.exists(store.root) and store.iterations() == {}


def test_a_marker_written_by_another_process_is_seen_after_a_listing(s3):
    """The runner lists and polls while jobs (other processes) write markers: no listing cached in this process may
    hide them."""
    store = RunStorage(_output(s3), "seen")
    store.mark_done(0, "prepare", {"seed_rows": 1})
    assert store.list(store.path("iter-0")) == ["prepare"]  # this process now has iter-0's listing cached
    code = ("import sys; from llm2llm.storage import RunStorage; from llm2llm.status import IterationStatus; "
            "s = RunStorage(sys.argv[1], 'seen'); s.mark_done(0, 'train', {'steps': 2}); "
            "s.write_iteration(IterationStatus(index=0))")
    subprocess.run([sys.executable, "-c", code, store.output], check=True, timeout=120, cwd=REPO)
    assert store.stage_done(0, "train") == {"steps": 2}
    assert list(store.iterations()) == [0]
    assert store.exists(store.path("iter-0", "_ITERATION.json"))


# --- atomic writes ---------------------------------------------------------------------------------------

_WRITER = """
import os, sys
from llm2llm.storage import RunStorage
s = RunStorage(sys.argv[1], "mpu")
data = os.urandom(int(sys.argv[2]))
print("writing", flush=True)
s.write_bytes(s.path("big.bin"), data)
print("written", flush=True)
"""


def test_a_large_write_is_multipart_and_a_killed_writer_leaves_no_object(s3, tmp_path):
    store = RunStorage(_output(s3), "mpu")
    bucket, prefix = s3.bucket, store.path("big.bin").split("/", 1)[1]
    size = 120 << 20  # s3fs sends one PUT below 100 MiB (2 x its 50 MiB part size), a multipart upload above

    def uploads() -> list[dict]:
        out = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        return out.get("Uploads", [])

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, store.output, str(size)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not uploads():  # the upload has started: parts are being sent
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no multipart upload seen"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    # Nothing to read: the object appears only when its upload completes.
    assert not store.exists(store.path("big.bin"))
    with pytest.raises(FileNotFoundError):
        store.read_table(store.path("big.bin"))
    assert _keys(store) == []
    # What a killed writer leaves is an unfinished upload (invisible to readers; docs/install.md says to let a
    # bucket lifecycle rule abort them). Abort it here, then a whole write reads back complete.
    for u in uploads():
        store.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    data = os.urandom(size)
    store.write_bytes(store.path("big.bin"), data)
    with store.fs.open(store.path("big.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    store.delete_all()


_OVERWRITER = """
import sys
from llm2llm.storage import RunStorage
s = RunStorage(sys.argv[1], "ow")
for k in range(int(sys.argv[2])):
    s.write_bytes(s.path("f.bin"), bytes([k % 256]) * (8 << 20))
"""


def test_readers_of_a_file_being_overwritten_see_one_whole_version(s3):
    store = RunStorage(_output(s3), "ow")
    store.write_bytes(store.path("f.bin"), b"\xff" * (8 << 20))
    writes = 30
    proc = subprocess.Popen([sys.executable, "-c", _OVERWRITER, store.output, str(writes)], cwd=REPO)
    seen = set()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            data = store.fs.cat_file(store.path("f.bin"))
            assert len(data) == 8 << 20 and data.count(data[:1]) == len(data), "a read mixed two versions"
            seen.add(data[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert store.fs.cat_file(store.path("f.bin"))[:1] == bytes([(writes - 1) % 256])
    assert len(seen) >= 2, "the reads never overlapped the writes"  # else the test proved nothing
    store.delete_all()


# --- the train stage's model upload --------------------------------------------------------------------

def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_retry_after_a_torn_model_upload_commits_one_clean_copy(s3, tmp_path, monkeypatch):
    """Attempt 1's upload fails after some files (a dropped connection); attempt 2 runs while one more PUT of
    attempt 1 lands (a driver that was not dead yet). The committed model is attempt 2's, each file once."""
    # Training itself is not under test here (test_local_run_on_s3 runs it for real on this server): the model
    # is the real tiny Llama, as training would leave it, plus the result file.
    source = Path(models.resolve_model("tiny-llama"))
    spec = parse_spec(tiny_spec(_output(s3)))
    attempt = {"n": 1}
    late_file = "model.safetensors"

    def run_train(cfg, pairs, **_):
        if attempt["n"] == 2:  # attempt 1's late PUT, after attempt 2 cleared the stage
            store.fs.pipe_file(f"{store.stage_dir(0, 'train')}/model-a1/{late_file}", b"attempt 1's weights")
        shutil.copytree(source, cfg.output_dir)
        Path(cfg.output_dir, train_mod.RESULT_FILE).write_text(json.dumps({"steps": 2}))
        return {"steps": 2}

    monkeypatch.setattr(train_mod, "run_train", run_train)
    files = sorted([*_digests(source), train_mod.RESULT_FILE])
    torn_from = 2  # attempt 1: the first two files (in name order) land, the rest fail
    fs_cls = type(RunStorage(spec.output, "torn").fs)
    put_file = fs_cls._put_file

    async def flaky_put_file(self, lpath, rpath, **kwargs):
        if attempt["n"] == 1 and files.index(os.path.basename(lpath)) >= torn_from:
            await asyncio.sleep(0.5)  # the others finish first
            raise OSError("injected: connection reset by peer")
        return await put_file(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(fs_cls, "_put_file", flaky_put_file)

    job1 = iteration_mod.Iteration("torn", "uid-t", spec, 0, 1, tmp_path / "scratch-1")
    store = job1.store
    store.write_table(store.path("data", "seed.parquet"), _rows(8))
    with pytest.raises(StorageError, match="cannot upload"):
        job1._stage("train", job1.train)
    assert store.stage_done(0, "train") is None  # no marker for the torn attempt
    assert _keys(store, "iter-0/train") == [f"model-a1/{f}" for f in files[:torn_from]]  # what a torn upload leaves

    attempt["n"] = 2
    job2 = iteration_mod.Iteration("torn", "uid-t", spec, 0, 2, tmp_path / "scratch-2")
    job2._stage("train", job2.train)
    done = store.stage_done(0, "train")
    assert done["model_dir"] == "model-a2" and done["attempt"] == 2
    # Exactly the marker and one copy of each file of attempt 2's model: no nested folder, nothing of attempt 1.
    assert _keys(store, "iter-0/train") == [MARKER, *(f"model-a2/{f}" for f in files)]

    # What infer hands its tasks is that folder; fetched as a task fetches it, it is the source byte for byte
    # and loads with transformers.
    assert store.trained_model(0) == store.uri("iter-0", "train", "model-a2")
    with fanout.local_copy(store.trained_model(0)) as local:
        got = _digests(Path(local))
        assert got.pop(train_mod.RESULT_FILE) and got == _digests(source)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(local)
        ids = AutoTokenizer.from_pretrained(local)("Review: fine\nSentiment:", return_tensors="pt").input_ids
        with torch.no_grad():
            assert model(ids).logits.shape[:2] == ids.shape
    store.delete_all()
