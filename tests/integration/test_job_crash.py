"""Job crashes: the real iteration job SIGKILLed inside each stage, then run again as a retried attempt.

One chain of attempts of ``python -m llm2llm_jobs.iteration`` on the built-in ``tiny-llama``, each SIGKILLed
(its whole process group: the local Ray it started, training and inference workers included) at a point
known from observable state, never after a guessed delay:

1. inside prepare: its "started" line is logged, its marker is not written;
2. inside train: a Ray Train worker is training;
3. inside infer: train is committed, infer has started;
4. inside teach: one teacher shard is done, the other's requests are held open by the teacher endpoint;
5. before filter's marker, 6. before merge's marker, 7. before the iteration manifest: the files are complete
   and the job stands still at ``LLM2LLM_PAUSE_BEFORE_MARKER`` (``llm2llm.storage``), because those
   stages take milliseconds;
8. the last attempt commits the iteration.

Before each re-run the test plants torn writes where no marker vouches for them (the first half of a
Parquet file, a leftover ``.tmp-`` file). After each attempt it checks that no process of the job survives,
that every stage committed before was skipped (same marker, "already done, skipping") and the killed stage
redone, that a finished train is never redone, and that no marker exists without its complete files. At the
end the data must hold exactly the expected rows: one candidate per failure, kept + rejected = generated,
merged = seed + kept, all ids unique.

The teacher is a scripted OpenAI-compatible endpoint in this process (stdlib HTTP): one valid, distinct,
deterministic example per request, so rows are kept and their count is known.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm2llm.launch import encode_run
from llm2llm.spec import parse_spec
from llm2llm.storage import ITERATION_MARKER, PAUSE_BEFORE_MARKER_ENV, RunStorage
from llm2llm_jobs import fanout
from tests.conftest import REPO
from tests.integration.tiny import tiny_spec

pytestmark = pytest.mark.integration

RUN = "crash"
STAGES = ("prepare", "train", "infer", "score", "teach", "filter", "merge")
TOKEN_ENV = "LLM2LLM_CRASH_TEST_TOKEN"  # inherited by every process of the job, Ray's included
WAIT_S = 900  # a deadline only for a broken run, never a speed check
VOCAB = ("amber basil cedar dune ember fjord garnet harbor iris juniper kelp lagoon meadow nectar orchid pebble "
         "quartz river saffron tundra umber velvet willow yarrow zephyr").split()


# --- the teacher endpoint ------------------------------------------------------------------------

class ScriptedTeacher:
    """OpenAI-compatible ``POST /v1/chat/completions`` on 127.0.0.1. Every request gets one example built from
    a hash of its last message (so a redone request gets the same answer), and is recorded. A request for
    which ``hold(last_message)`` is true waits, unanswered, until ``hold`` changes and ``update()`` is called."""

    def __init__(self) -> None:
        self.requests: list[str] = []  # last user message of every request, in arrival order
        self.held: list[str] = []  # those that are being held now
        self.hold: Callable[[str], bool] = lambda _: False
        self.cond = threading.Condition()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = body["messages"][-1]["content"]
                with teacher.cond:
                    teacher.requests.append(last)
                    teacher.cond.notify_all()
                    while teacher.hold(last):
                        teacher.held.append(last)
                        teacher.cond.notify_all()
                        teacher.cond.wait(timeout=60)
                        teacher.held.remove(last)
                text = teacher.answer(last)
                out = json.dumps({
                    "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": len(last) // 4, "completion_tokens": len(text) // 4,
                              "total_tokens": len(last) // 4 + len(text) // 4},
                }).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:  # the job was killed while we held its request
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer(last: str) -> str:
        rnd = random.Random(hashlib.sha256(last.encode()).hexdigest())
        question = "The " + " ".join(rnd.sample(VOCAB, 12)) + " were all I noticed."
        return f"1. Question: {question}\nAnswer: {rnd.choice(['positive', 'negative'])}"

    def update(self, hold: Callable[[str], bool]) -> None:
        with self.cond:
            self.hold = hold
            self.cond.notify_all()

    def wait(self, what: str, cond: Callable[[], bool], job: "Job") -> None:
        deadline = time.monotonic() + WAIT_S
        with self.cond:
            while not cond():
                job.assert_running(what)
                assert time.monotonic() < deadline, f"attempt {job.attempt}: no {what} in {WAIT_S}s"
                self.cond.wait(timeout=0.2)

    def close(self) -> None:
        self.update(lambda _: False)
        self.server.shutdown()
        self.server.server_close()


# --- the job -------------------------------------------------------------------------------------

class Job:
    """Attempts of one iteration job, each a real subprocess in its own process group."""

    def __init__(self, root: Path, teacher_url: str):
        self.out, self.logs = root / "out", root / "logs"
        self.logs.mkdir(parents=True)
        # Short: Ray's unix socket paths under it must fit in 107 bytes. Ray and the job's scratch go there.
        self.tmp = Path(tempfile.mkdtemp(prefix="l2lc-", dir="/tmp"))
        self.token = uuid.uuid4().hex
        self.store = RunStorage(str(self.out), RUN)
        self.run_arg = encode_run(RUN, "uid-crash", parse_spec(spec(self.out, teacher_url)))
        self.attempt = 0
        self.proc: subprocess.Popen | None = None
        self.log = self.logs / "none.log"

    def start(self, pause: str | None = None) -> None:
        self.attempt += 1
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", PAUSE_BEFORE_MARKER_ENV)}
        env.update({"RAY_TMPDIR": str(self.tmp), "TMPDIR": str(self.tmp), TOKEN_ENV: self.token})
        if pause:
            env[PAUSE_BEFORE_MARKER_ENV] = pause
        self.log = self.logs / f"attempt-{self.attempt}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llm2llm_jobs.iteration", "--run", self.run_arg, "--iteration", "0",
                 "--attempt", str(self.attempt)],
                env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def assert_running(self, what: str) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"attempt {self.attempt} exited ({self.proc.returncode}) before {what}:\n{self.text()[-4000:]}")

    def wait_for(self, what: str, cond: Callable[[], Any]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not cond():
            self.assert_running(what)
            assert time.monotonic() < deadline, f"attempt {self.attempt}: no {what} in {WAIT_S}s"
            time.sleep(0.05)

    def processes(self) -> list[psutil.Process]:
        """Live processes of this job, found by the token in their environment (not by process group)."""
        found = []
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TOKEN_ENV) == self.token:
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def kill(self, count: bool = False) -> int:
        """SIGKILL the job's process group; every process of the job must be gone. With ``count``, returns
        how many there were (a scan of every process first: only where the stage is long enough for it)."""
        assert self.proc is not None
        n = len(self.processes()) if count else 0
        self.assert_running("the kill")
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 30
        while left := self.processes():
            if time.monotonic() > deadline:
                for p in left:
                    p.kill()
                pytest.fail(f"attempt {self.attempt}: survived the SIGKILL of the job: "
                            f"{[(p.pid, p.name()) for p in left]}")
            time.sleep(0.2)
        return n

    def finish(self) -> None:
        assert self.proc is not None
        rc = self.proc.wait(timeout=WAIT_S)
        assert rc == 0, f"attempt {self.attempt} failed ({rc}):\n{self.text()[-4000:]}"

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.processes():
            p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def spec(out: Path, teacher_url: str) -> dict:
    # Two shards, one request per failure (samplesPerFailure 1, maxRounds 1), one example per answer.
    return tiny_spec(str(out), teacher={"kind": "openai", "endpoint": teacher_url, "model": "scripted", "replicas": 2,
                                        "maxRounds": 1, "maxConcurrency": 2})


@pytest.fixture
def teacher():
    t = ScriptedTeacher()
    yield t
    t.close()


@pytest.fixture
def job(tmp_path: Path, teacher: ScriptedTeacher):
    j = Job(tmp_path, teacher.url)
    yield j
    j.cleanup()


# --- state and checks ----------------------------------------------------------------------------

def markers(store: RunStorage) -> dict[str, dict]:
    """Every commit marker of iteration 0, by stage (and ``iteration`` for the manifest)."""
    out = {s: m for s in STAGES if (m := store.stage_done(0, s)) is not None}
    it = store.read_json(f"{store.iter_dir(0)}/{ITERATION_MARKER}")
    if it is not None:
        out["iteration"] = it
    return out


def file(store: RunStorage, rel: str) -> Path:
    return Path(store.path(rel))


def table(store: RunStorage, rel: str) -> pa.Table:
    return pq.read_table(file(store, rel))  # raises on a torn file


def model_digest(store: RunStorage) -> dict[str, str]:
    model = file(store, "iter-0/train/model")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.iterdir())}


def check_committed(store: RunStorage) -> dict[str, dict]:
    """A marker is never present without its complete files: each committed stage's files read in full
    and agree with the figures in its marker."""
    m = markers(store)
    try:
        _check_files(store, m)
    except (OSError, ValueError, pa.ArrowException) as err:  # missing or torn behind a marker
        pytest.fail(f"a marker without its complete files ({sorted(m)} committed): {type(err).__name__}: {err}")
    return m


def _check_files(store: RunStorage, m: dict[str, dict]) -> None:
    if "prepare" in m:
        assert table(store, "data/seed.parquet").num_rows == m["prepare"]["seed_rows"] == m["prepare"]["train_rows"]
        assert table(store, "data/test.parquet").num_rows == m["prepare"]["test_rows"]
    if "train" in m:
        model = file(store, "iter-0/train/model")
        assert json.loads((model / "config.json").read_text())["model_type"]
        from safetensors import safe_open

        with safe_open(str(model / "model.safetensors"), "np") as f:
            assert len(list(f.keys())) > 0
        assert json.loads((model / "train_result.json").read_text())["steps"] == m["train"]["steps"] == 2
    if "infer" in m:
        assert table(store, "iter-0/infer/predictions.parquet").num_rows == m["infer"]["rows"]
    if "score" in m:
        scored = table(store, "iter-0/score/scored.parquet").to_pylist()
        assert len(scored) == m["infer"]["rows"]
        assert sum(r["split"] == "seed" and not r["correct"] for r in scored) == m["score"]["seed_failures"]
    if "teach" in m:
        t = m["teach"]
        assert table(store, "iter-0/teach/generated.parquet").num_rows == t["candidates"]
        shards = [table(store, f"iter-0/teach/shard-{k}.parquet") for k in range(t["replicas"])]
        assert sum(s.num_rows for s in shards) == t["candidates"]
        for k in range(t["replicas"]):
            assert json.loads(file(store, f"iter-0/teach/shard-{k}.json").read_text())["prompt_tokens"] > 0
    if "filter" in m:
        f = m["filter"]
        assert table(store, "iter-0/filter/kept.parquet").num_rows == f["kept"]
        rejected = table(store, "iter-0/filter/rejected.parquet").num_rows
        assert rejected == sum(f["rejected"].values()) == f["generated"] - f["kept"]
    if "merge" in m:
        assert table(store, "iter-0/merge/train.parquet").num_rows == m["merge"]["rows"]
        assert m["merge"]["added"] == m["filter"]["kept"]
    if "iteration" in m:
        assert store.iteration(0) is not None


def check_attempt(job: Job, before: dict[str, dict], redone: str | None) -> dict[str, dict]:
    """After an attempt: each stage committed before it was skipped, not redone (same marker, same figures
    and timestamps); the stage the previous attempt died in was redone, its leftovers not trusted."""
    text, now = job.text(), check_committed(job.store)
    for stage, marker in before.items():
        assert now.get(stage) == marker, f"attempt {job.attempt} redid {stage}: {marker} -> {now.get(stage)}"
        assert f"iteration 0: {stage} already done, skipping" in text, (job.attempt, stage)
        assert f"iteration 0: {stage} started" not in text, (job.attempt, stage)
    if redone is not None:
        assert f"iteration 0: {redone} started" in text, (job.attempt, redone)
    return now


def plant_torn(path: Path) -> None:
    """A torn write where no marker vouches for it: the first half of a Parquet file under the final name
    (what a non-atomic writer would leave), and the same bytes under a leftover temporary name."""
    if path.exists():
        data = path.read_bytes()
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": [f"torn-{k}" for k in range(64)]}), sink)
        data = sink.getvalue().to_pybytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    Path(f"{path}.tmp-0badc0de").write_bytes(data[: len(data) // 2])
    with pytest.raises((pa.ArrowException, OSError)):
        pq.read_table(path)  # torn indeed: a reader that trusted it would fail or lose rows


def failure_inputs(store: RunStorage) -> list[str]:
    scored = table(store, "iter-0/score/scored.parquet").to_pylist()
    return [r["input"] for r in scored if r["split"] == "seed" and not r["correct"]]


def asked(requests: list[str], inputs: list[str]) -> Counter:
    """How many requests named each input (the teacher prompt quotes the failure's input)."""
    return Counter(x for last in requests for x in inputs if f"Input: {x}\n" in last)


# --- the test ------------------------------------------------------------------------------------

def test_job_killed_in_every_stage_resumes_where_it_died(job: Job, teacher: ScriptedTeacher):
    store = job.store

    # 1. Inside prepare.
    job.start()
    job.wait_for("prepare start", lambda: "iteration 0: prepare started" in job.text())
    job.kill()
    assert check_committed(store) == {}, "killed inside prepare, yet something committed"
    plant_torn(file(store, "data/seed.parquet"))
    plant_torn(file(store, "data/test.parquet"))

    # 2. Inside train, while a Ray Train worker is training.
    before = markers(store)
    job.start()
    job.wait_for("training worker", lambda: re.search(r"RayTrainWorker pid=\d+\).*worker 0/1", job.text()))
    assert job.kill(count=True) > 2, "train runs on Ray: the driver, Ray's own processes and a training worker"
    state = check_attempt(job, before, redone="prepare")
    assert set(state) == {"prepare"}, state

    # 3. Inside infer: train is committed (attempt 3 trained again: attempt 2 never committed it).
    before = markers(store)
    job.start()
    job.wait_for("infer start", lambda: "iteration 0: infer started" in job.text())
    assert job.kill(count=True) > 2, "this attempt started Ray for training: its processes die with the job"
    state = check_attempt(job, before, redone="train")
    assert set(state) == {"prepare", "train"}, state
    trained = model_digest(store)
    plant_torn(file(store, "iter-0/infer/predictions.parquet"))

    # 4. Inside teach: hold every teacher request until score is committed and the shards are known, then
    # let shard 0 through and hold shard 1's requests: the job is killed with shard 1 in flight.
    before = markers(store)
    teacher.update(lambda _: True)
    job.start()
    teacher.wait("teacher request", lambda: bool(teacher.held), job)
    failures = failure_inputs(store)  # the request proves score committed
    assert len(failures) >= 2, "the scripted teacher needs failures in both shards"
    shard0, shard1 = fanout.shards(failures, 2)  # the split the teach stage makes
    teacher.update(lambda last: any(f"Input: {x}\n" in last for x in shard1))
    teacher.wait("held shard-1 request", lambda: any(f"Input: {x}\n" in h for h in teacher.held for x in shard1), job)
    job.kill()
    teacher.update(lambda _: False)
    state = check_attempt(job, before, redone="infer")
    assert set(state) == {"prepare", "train", "infer", "score"}, state
    assert asked(teacher.requests, shard0) == Counter(shard0), "shard 0 asked exactly once per failure"
    committed = [k for k in (0, 1) if file(store, f"iter-0/teach/shard-{k}.json").exists()]
    assert committed == [0], "shard 0 finished before the kill: it stays committed; shard 1 was in flight"
    kept_shards = {k: file(store, f"iter-0/teach/shard-{k}.parquet").read_bytes() for k in committed}
    plant_torn(file(store, "iter-0/teach/generated.parquet"))
    plant_torn(file(store, "iter-0/teach/shard-1.parquet"))

    # 5. Before filter's marker, its files complete.
    before, n_requests = markers(store), len(teacher.requests)
    job.start(pause="filter")
    job.wait_for("pause before filter's marker", lambda: "pausing before the filter marker" in job.text())
    assert store.stage_done(0, "filter") is None
    assert table(store, "iter-0/filter/kept.parquet").num_rows > 0
    job.kill()
    state = check_attempt(job, before, redone="teach")
    assert set(state) == {"prepare", "train", "infer", "score", "teach"}, state
    # The committed teacher shard is not asked again; shard 1's failures are asked exactly once.
    assert asked(teacher.requests[n_requests:], failures) == Counter(shard1)
    assert {k: file(store, f"iter-0/teach/shard-{k}.parquet").read_bytes() for k in committed} == kept_shards
    plant_torn(file(store, "iter-0/filter/kept.parquet"))

    # 6. Before merge's marker.
    before = markers(store)
    job.start(pause="merge")
    job.wait_for("pause before merge's marker", lambda: "pausing before the merge marker" in job.text())
    job.kill()
    state = check_attempt(job, before, redone="filter")
    assert set(state) == set(STAGES) - {"merge"}, state
    plant_torn(file(store, "iter-0/merge/train.parquet"))

    # 7. Before the iteration manifest: every stage committed.
    before = markers(store)
    job.start(pause="iteration")
    job.wait_for("pause before the manifest", lambda: "pausing before the iteration marker" in job.text())
    job.kill()
    state = check_attempt(job, before, redone="merge")
    assert set(state) == set(STAGES), state
    (file(store, f"iter-0/{ITERATION_MARKER}.tmp-0badc0de")).write_text('{"index": 0, "attempt": 7, "fail')

    # 8. The last attempt commits.
    before = markers(store)
    job.start()
    job.finish()
    assert job.processes() == []
    state = check_attempt(job, before, redone=None)
    assert "iteration 0 committed" in job.text()

    # Each stage was done once, by the attempt after the one killed inside it; train never twice.
    assert {s: state[s]["attempt"] for s in STAGES} == {
        "prepare": 2, "train": 3, "infer": 4, "score": 4, "teach": 5, "filter": 6, "merge": 7}
    assert model_digest(store) == trained
    for n in range(4, job.attempt + 1):
        log = (job.logs / f"attempt-{n}.log").read_text(errors="replace")
        assert "iteration 0: train already done, skipping" in log and "RayTrainWorker" not in log, n
    it = store.iteration(0)
    assert it is not None and it.attempt == job.attempt and it.train_steps == 2
    assert it.seconds == {s: state[s]["seconds"] for s in STAGES}

    # No row lost, none twice.
    seed = table(store, "data/seed.parquet").to_pylist()
    gen = table(store, "iter-0/teach/generated.parquet").to_pylist()
    kept = table(store, "iter-0/filter/kept.parquet").to_pylist()
    rejected = table(store, "iter-0/filter/rejected.parquet").to_pylist()
    merged = table(store, "iter-0/merge/train.parquet").to_pylist()
    by_input = {r["input"]: r["id"] for r in seed}
    assert sorted(r["parent_id"] for r in gen) == sorted(by_input[x] for x in failures), "one candidate per failure"
    assert len({r["id"] for r in gen}) == len(gen)
    assert kept, "the scripted teacher's examples pass the filter"
    assert sorted(r["id"] for r in kept + rejected) == sorted(r["id"] for r in gen)
    assert [r["id"] for r in merged] == [r["id"] for r in seed] + [r["id"] for r in kept]
    assert len({r["id"] for r in merged}) == len(merged) == len(seed) + len(kept) == it.train_rows + it.kept
    # Ray Train's folders in the run's storage are gone too: attempt 2's (killed while training) and attempt 3's.
    assert sorted(p.name for p in file(store, "iter-0/train").iterdir()) == ["_DONE.json", "model"]
    # A SIGKILLed attempt cannot remove its scratch folder (a model copy, Ray Train's checkpoint); the next
    # attempt of the iteration removes what earlier ones left, and the last one its own.
    left = [p for p in job.tmp.glob(f"llm2llm-{RUN}-*-i0-*")]
    assert left == [], left
    left_mb = sum(f.stat().st_size for p in left for f in p.rglob("*") if f.is_file()) / 2**20
    print(json.dumps({"attempts": job.attempt, "committed_teach_shards_at_kill": committed, "kept": len(kept),
                      "seconds": it.seconds, "scratch_left_by_killed_attempts": [len(left), round(left_mb, 1)]}))
