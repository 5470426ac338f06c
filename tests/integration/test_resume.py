"""Stage resume: an iteration job killed after train, when re-run, skips train and finishes the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llm2llm.launch import encode_run
from llm2llm.spec import parse_spec
from llm2llm.storage import RunStorage
from tests.conftest import REPO
from tests.integration.tiny import tiny_spec

pytestmark = pytest.mark.integration



def _job(out, env) -> list[str]:
    spec = parse_spec(tiny_spec(str(out)))
    return [sys.executable, "-m", "llm2llm_jobs.iteration", "--run", encode_run("resume", "uid-r", spec),
            "--iteration", "0", "--attempt", "1"]


def test_killed_after_train_resumes_without_retraining(tmp_path):
    out = tmp_path / "out"
    # Outside a Ray job: the stage starts its own local Ray for training.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    store = RunStorage(str(out), "resume")
    proc = subprocess.Popen(_job(out, env), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while store.stage_done(0, "train") is None:
        assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
        assert time.monotonic() < deadline, "train never committed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, Ray workers included
    proc.wait()
    first = store.stage_done(0, "train")
    assert store.iteration(0) is None  # the iteration did not commit

    done = subprocess.run(_job(out, env), env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "train already done, skipping" in done.stderr + done.stdout
    assert store.stage_done(0, "train") == first  # not redone: same marker, same timestamps
    it = store.iteration(0)
    assert it is not None and it.train_steps == 2 and it.seed_accuracy is not None
    assert set(it.seconds) >= {"prepare", "train", "infer", "score", "teach", "filter", "merge"}
    # Every stage's Parquet carries lineage columns.
    for stage, name in (("merge", "train.parquet"), ("filter", "kept.parquet"), ("teach", "generated.parquet")):
        cols = store.read_table(f"{store.stage_dir(0, stage)}/{name}").column_names
        assert {"id", "parent_id", "iteration", "source", "teacher_model", "prompt_hash"} <= set(cols), (stage, cols)
    print(json.dumps(it.model_dump(mode="json"), indent=1))
