"""Sharded stages on a real local Ray (2 CPUs): infer and teach with replicas: 2; a teach replica SIGKILLed
while its teacher request is in flight (once: Ray retries it; every time: the stage fails, and the retried job
redoes only that shard); and the teacher token budget.

The teacher is the local OpenAI-compatible server (``openai_server.py``, real HTTP, tiny-llama behind it),
which can hold chosen requests open: that is how a test knows both replicas are working at once, and
kills one at a known point instead of after a guessed delay. The train stage runs once (``prefix``);
every scenario resumes a copy of that run at the teach stage, as a retried job would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import psutil
import pyarrow.compute as pc
import pytest
import ray

from llm2llm.planner import stop_reason
from llm2llm.spec import AugmentationRunSpec, parse_spec
from llm2llm.status import IterationStatus
from llm2llm.storage import RunStorage
from llm2llm_jobs import fanout
from llm2llm_jobs.iteration import Iteration
from llm2llm_jobs.models import resolve_model
from llm2llm_jobs.teach import PROBE_MESSAGE
from tests.integration.tiny import tiny_spec
from tests.integration.openai_server import fastapi_server

pytestmark = pytest.mark.integration

RUN = "shards"
KEY = "EMPTY"  # what the client sends without a key: the Ray workers need no key in their environment
WAIT_S = 240  # generous: a deadline only for a broken run, never a speed check


def make_spec(out: Path, endpoint: str, teacher: dict | None = None, **top: Any) -> AugmentationRunSpec:
    return parse_spec(tiny_spec(
        str(out),
        # batchSize 1: the same computation per prompt however the rows are sharded.
        infer={"backend": "hf", "maxTokens": 3, "batchSize": 1, "replicas": 2},
        # maxConcurrency 1: more than one request in flight at the server means more than one replica.
        teacher={"kind": "openai", "endpoint": endpoint, "model": "teacher", "maxTokens": 16, "maxRounds": 1,
                 "replicas": 2, "maxConcurrency": 1, **(teacher or {})},
        **top,
    ))


# --- the teacher server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_url(tmp_path_factory: pytest.TempPathFactory):
    with fastapi_server(resolve_model("tiny-llama"), KEY, tmp_path_factory.mktemp("teacher") / "server.log") as url:
        yield url


def server(url: str, path: str, body: dict | None = None) -> dict:
    """GET /stats, or POST ``body`` to an /admin path."""
    data = json.dumps(body or {}).encode() if path.startswith("/admin") else None
    req = urllib.request.Request(url.removesuffix("/v1") + path, data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def asked(url: str, failures: list[dict]) -> dict[str, int]:
    """How many chat requests the server got for each failure (its input is in the request's last message).
    The reply-format probe each shard sends first is about no failure."""
    prompts = [p for p in server(url, "/stats")["prompts"] if p != PROBE_MESSAGE]
    for p in prompts:
        assert sum(f["input"] in p for f in failures) == 1, f"a request for no single failure: {p[:200]!r}"
    return {f["id"]: sum(f["input"] in p for p in prompts) for f in failures}


def teacher_clients(url: str) -> list[psutil.Process]:
    """This session's Ray workers running a task (titled ray::_call) with a connection open to the teacher."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] == ["ray::_call"] and any(
                    c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                    for c in p.net_connections("tcp")):
                found.append(p)
        except psutil.Error:  # exited meanwhile
            pass
    return found


# --- the run -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prefix(ray_local, teacher_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare, train, infer (2 replicas) and score, committed once; scenarios copy it."""
    out = tmp_path_factory.mktemp("prefix")
    it = Iteration(RUN, "uid-s", make_spec(out, teacher_url), 0, 1, out / "scratch")
    for stage in ("prepare", "train", "infer", "score"):
        it._stage(stage, getattr(it, stage))
    return out


def resume_copy(prefix: Path, out: Path) -> RunStorage:
    """A copy of the run as a retried job finds it: stages up to score committed, teach not started."""
    shutil.copytree(prefix / RUN, out / RUN, ignore=shutil.ignore_patterns("run.json"))
    return RunStorage(str(out), RUN)


def failures_of(store: RunStorage) -> list[dict]:
    scored = store.read_table(f"{store.stage_dir(0, 'score')}/scored.parquet")
    rows = scored.filter(pc.and_(pc.equal(scored["split"], "seed"), pc.invert(scored["correct"]))).to_pylist()
    assert len(rows) >= 2, "fewer than 2 failures: nothing to shard"  # the random tiny student gets most wrong
    return rows


class Job(threading.Thread):
    """Iteration 0, resumed, in a thread, so the test can act on the server and the workers meanwhile."""

    def __init__(self, spec: AugmentationRunSpec, scratch: Path):
        super().__init__(daemon=True)
        self.spec, self.scratch = spec, scratch
        self.status: IterationStatus | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.status = Iteration(RUN, "uid-s", self.spec, 0, 1, self.scratch).run()
        except BaseException as err:  # handed to the test
            self.error = err

    def result(self) -> IterationStatus:
        self.join(WAIT_S)
        assert not self.is_alive(), "the iteration did not finish"
        if self.error is not None:
            raise self.error
        assert self.status is not None
        return self.status


def wait_for(cond: Callable[[], Any], what: str, job: Job) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (value := cond()):
        assert job.is_alive(), f"the iteration ended before {what}: {job.error!r}"
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.1)
    return value


def rows(store: RunStorage, stage: str, name: str) -> list[dict]:
    return store.read_table(f"{store.stage_dir(0, stage)}/{name}").to_pylist()


def unique_in_order(values: list) -> list:
    return list(dict.fromkeys(values))


def fingerprint(path: str) -> tuple[str, int]:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture(scope="module")
def baseline(prefix: Path, teacher_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Teach, filter and merge with 2 replicas, uninterrupted. Each replica's first request is held until
    both are open at once; the worker processes holding them are recorded then."""
    out = tmp_path_factory.mktemp("baseline")
    store = resume_copy(prefix, out)
    groups = fanout.shards(failures_of(store), 2)
    server(teacher_url, "/admin/reset")
    server(teacher_url, "/admin/faults", {"hold": [g[0]["input"] for g in groups]})
    job = Job(make_spec(out, teacher_url), out / "scratch")
    job.start()
    try:
        wait_for(lambda: server(teacher_url, "/stats")["held"] == 2, "both replicas' first requests open", job)
        clients = [p.pid for p in teacher_clients(teacher_url)]
        in_flight = server(teacher_url, "/stats")["in_flight"]
    finally:
        server(teacher_url, "/admin/faults", {"hold": None})
    status = job.result()
    return {"store": store, "groups": groups, "status": status, "clients": clients, "in_flight": in_flight,
            "asked": asked(teacher_url, [f for g in groups for f in g]),
            "max_in_flight": server(teacher_url, "/stats")["max_in_flight"]}


# --- tests ---------------------------------------------------------------------------------------

def test_infer_two_replicas_commit_every_row_once_in_order(prefix: Path) -> None:
    import torch

    from llm2llm.tasks import Task
    from llm2llm_jobs.infer import generate

    store = RunStorage(str(prefix), RUN)
    assert store.stage_done(0, "infer")["replicas"] == 2
    seed = store.read_table(store.path("data", "seed.parquet")).to_pylist()
    test = store.read_table(store.path("data", "test.parquet")).to_pylist()
    preds = rows(store, "infer", "predictions.parquet")
    # Every seed and test row exactly once, in data order, whatever replica answered it.
    want = [("seed", r["id"]) for r in seed] + [("test", r["id"]) for r in test]
    assert [(p["split"], p["id"]) for p in preds] == want
    # And the same answers as one unsharded pass (one thread, as a 1-CPU Ray task has).
    spec = make_spec(prefix, "http://unused/v1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        texts, _ = generate(resolve_model("tiny-llama"), [Task(spec.task).prompt(r["input"]) for r in seed + test],
                            adapter_path=f"{store.stage_dir(0, 'train')}/model", max_tokens=3, backend="hf",
                            batch_size=1)
    finally:
        torch.set_num_threads(threads)
    assert [p["prediction"] for p in preds] == texts


def test_teach_two_replicas_fan_out_and_commit_every_row_once(baseline: dict) -> None:
    store, groups, it = baseline["store"], baseline["groups"], baseline["status"]
    failures = [f for g in groups for f in g]
    # Two Ray worker processes had a request open at the same moment (each replica allows only one).
    assert len(set(baseline["clients"])) == 2 and os.getpid() not in baseline["clients"], baseline
    assert baseline["in_flight"] == 2 and baseline["max_in_flight"] == 2, baseline
    assert store.stage_done(0, "teach")["replicas"] == 2
    # Each replica committed its own shard, holding exactly its failures, in order.
    shard_rows = [rows(store, "teach", f"shard-{k}.parquet") for k in range(2)]
    for k in range(2):
        assert unique_in_order([r["parent_id"] for r in shard_rows[k]]) == [f["id"] for f in groups[k]]
    # The stage's output is the shards in shard order: every row once, every failure asked once.
    generated = rows(store, "teach", "generated.parquet")
    assert generated == shard_rows[0] + shard_rows[1]
    assert len({r["id"] for r in generated}) == len(generated)
    assert baseline["asked"] == {f["id"]: 1 for f in failures}
    # Filter and merge committed them without a duplicate.
    assert it.generated == len(generated)
    train = store.read_table(store.path("data", "seed.parquet")).column("id").to_pylist()
    kept = [r["id"] for r in rows(store, "filter", "kept.parquet")]
    assert [r["id"] for r in rows(store, "merge", "train.parquet")] == train + kept
    assert it.kept == len(kept)


def test_replica_killed_mid_stage_loses_no_rows(prefix: Path, baseline: dict, teacher_url: str,
                                                 tmp_path: Path) -> None:
    store = resume_copy(prefix, tmp_path)
    groups = baseline["groups"]
    shard = {k: f"{store.stage_dir(0, 'teach')}/shard-{k}" for k in range(2)}
    # Shard 0's last request stays open: by then it has answered the others, and shard 1 can finish.
    server(teacher_url, "/admin/reset")
    server(teacher_url, "/admin/faults", {"hold": [groups[0][-1]["input"]]})
    job = Job(make_spec(tmp_path, teacher_url), tmp_path / "scratch")
    job.start()
    try:
        wait_for(lambda: server(teacher_url, "/stats")["held"] == 1, "shard 0's last request open", job)
        wait_for(lambda: store.exists(shard[1] + ".json"), "shard 1 committed while shard 0 still runs", job)
        before = {name: fingerprint(shard[1] + name) for name in (".json", ".parquet")}
        assert not store.exists(shard[0] + ".json")
        victims = teacher_clients(teacher_url)
        assert len(victims) == 1, victims  # shard 0's worker, inside its request
        victim = victims[0]
        victim.send_signal(signal.SIGKILL)
        gone, _ = psutil.wait_procs([victim], timeout=30)
        assert gone, f"worker {victim.pid} survived SIGKILL"
    finally:
        server(teacher_url, "/admin/faults", {"hold": None})
    it = job.result()

    # Ray retried the killed replica; the output is exactly the uninterrupted run's: no row lost or doubled.
    generated = rows(store, "teach", "generated.parquet")
    assert generated == rows(baseline["store"], "teach", "generated.parquet")
    assert len({r["id"] for r in generated}) == len(generated)
    # Shard 1 finished before the kill: neither asked again nor rewritten.
    assert {name: fingerprint(shard[1] + name) for name in (".json", ".parquet")} == before
    assert asked(teacher_url, groups[0] + groups[1]) == {**{f["id"]: 2 for f in groups[0]},
                                                         **{f["id"]: 1 for f in groups[1]}}
    # And the iteration committed what the uninterrupted one did.
    for stage, name in (("filter", "kept.parquet"), ("merge", "train.parquet")):
        assert rows(store, stage, name) == rows(baseline["store"], stage, name), stage
    assert (it.generated, it.kept) == (baseline["status"].generated, baseline["status"].kept)


def test_replica_that_keeps_crashing_fails_the_stage_and_the_retry_redoes_only_its_shard(
        prefix: Path, baseline: dict, teacher_url: str, tmp_path: Path) -> None:
    store = resume_copy(prefix, tmp_path)
    groups = baseline["groups"]
    shard = {k: f"{store.stage_dir(0, 'teach')}/shard-{k}" for k in range(2)}
    server(teacher_url, "/admin/reset")
    server(teacher_url, "/admin/faults", {"hold": [groups[0][-1]["input"]]})
    job = Job(make_spec(tmp_path, teacher_url), tmp_path / "scratch")
    job.start()
    kills = 0
    try:
        wait_for(lambda: store.exists(shard[1] + ".json"), "shard 1 committed while shard 0 still runs", job)
        before = {name: fingerprint(shard[1] + name) for name in (".json", ".parquet")}
        # Kill shard 0's worker inside its last request, every time Ray retries it, until the stage gives up.
        # (A killed request stays held at the server, so attempt n is in its request once n are held.)
        while job.is_alive():
            victims = teacher_clients(teacher_url) if server(teacher_url, "/stats")["held"] == kills + 1 else []
            if victims:
                assert len(victims) == 1, victims
                victims[0].send_signal(signal.SIGKILL)
                psutil.wait_procs(victims, timeout=30)
                kills += 1
            time.sleep(0.1)
    finally:
        server(teacher_url, "/admin/faults", {"hold": None})
    job.join(WAIT_S)
    assert isinstance(job.error, ray.exceptions.WorkerCrashedError), job.error
    assert kills >= 2  # Ray retried the replica before giving up
    # The stage failed without committing, but shard 1, finished meanwhile, is committed and kept.
    assert store.stage_done(0, "teach") is None and store.iteration(0) is None
    assert not store.exists(shard[0] + ".json")

    # The retried job redoes shard 0 only, and ends with exactly the uninterrupted run's rows.
    it = Iteration(RUN, "uid-s", make_spec(tmp_path, teacher_url), 0, 2, tmp_path / "scratch-2").run()
    assert rows(store, "teach", "generated.parquet") == rows(baseline["store"], "teach", "generated.parquet")
    assert {name: fingerprint(shard[1] + name) for name in (".json", ".parquet")} == before
    assert asked(teacher_url, groups[0] + groups[1]) == {**{f["id"]: kills + 1 for f in groups[0]},
                                                         **{f["id"]: 1 for f in groups[1]}}
    assert (it.generated, it.kept) == (baseline["status"].generated, baseline["status"].kept)


def test_teacher_token_budget_stops_generation_with_a_reason(prefix: Path, teacher_url: str, tmp_path: Path) -> None:
    store = resume_copy(prefix, tmp_path)
    failures = failures_of(store)
    # 2 tokens (1 per replica): round 0 goes out, and uses far more; rounds 1 and 2 must not.
    spec = make_spec(tmp_path, teacher_url, teacher={"maxRounds": 3}, budget={"teacherTokens": 2})
    server(teacher_url, "/admin/reset")
    it = Iteration(RUN, "uid-s", spec, 0, 1, tmp_path / "scratch").run()

    kept_parents = {r["parent_id"] for r in rows(store, "filter", "kept.parquet")}
    assert kept_parents < {f["id"] for f in failures}, "every failure got a row in round 0: no round 1 to stop"
    assert asked(teacher_url, failures) == {f["id"]: 1 for f in failures}  # round 0 only, at the server
    generated = rows(store, "teach", "generated.parquet")
    assert {r["round"] for r in generated} == {0}
    teach = store.stage_done(0, "teach")
    assert teach["stopped"] == "TeacherBudget"
    # Stopped cleanly: the round's rows are filtered and merged, the tokens counted, the reason in the status,
    # and the planner launches no further iteration although maxIterations is 2.
    assert store.stage_done(0, "merge") is not None and it.generated == len(generated)
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in generated)
    assert it.tokens.teacher_prompt + it.tokens.teacher_completion == used > 2
    assert it.stop_reason == "TeacherBudget"
    assert store.iteration(0).stop_reason == "TeacherBudget"
    assert stop_reason(spec, [it]) == "TeacherBudget"
