"""The stages' inner clocks: time inside generate calls and the engine start, as the stage markers record them
(bench/iteration_overhead.py subtracts them from the iteration's wall time to get its fixed cost)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import llm2llm_jobs.iteration as iteration_mod
import llm2llm_jobs.train as train_mod
from llm2llm.spec import parse_spec
from llm2llm_jobs.clock import Clock, TimedTeacher, busy_seconds, stage_figures
from llm2llm_jobs.infer import generate
from llm2llm_jobs.models import resolve_model


def test_busy_seconds_counts_overlapping_replicas_once():
    assert busy_seconds([]) == 0
    assert busy_seconds([(100.0, 2.0), (110.0, 3.0)]) == 5.0  # apart: the sum
    assert busy_seconds([(100.0, 4.0), (102.0, 4.0)]) == 6.0  # overlapping: 100..106
    assert busy_seconds([(100.0, 10.0), (101.0, 1.0), (103.0, 2.0)]) == 10.0  # nested
    assert busy_seconds([[105.0, 1.0], [100.0, 2.0], [101.5, 1.0]]) == 3.5  # any order, lists from JSON
    assert stage_figures([{"generate_spans": [[0, 2]], "engine_seconds": 7.5},
                          {"generate_spans": [[1, 2]], "engine_seconds": 9.0}, {}]) == \
        {"generate_seconds": 3.0, "engine_seconds": 9.0}


class _Teacher:
    def __init__(self):
        self.closed = False

    def reply_format(self, wanted):
        return "text"

    def complete(self, conversations, **_):
        time.sleep(0.05)
        return [["reply"] for _ in conversations]

    def close(self):
        self.closed = True


def test_timed_teacher_times_complete_and_passes_the_rest_through():
    clock, inner = Clock(), _Teacher()
    with clock.engine():
        teacher = TimedTeacher(inner, clock)
    assert teacher.complete([["a"], ["b"]], n=1) == [["reply"], ["reply"]]
    teacher.complete([["c"]], n=1)
    assert teacher.reply_format("json") == "text"
    teacher.close()
    assert inner.closed
    figures = clock.figures()
    assert len(figures["generate_spans"]) == 2 and all(d >= 0.05 for _, d in figures["generate_spans"])
    assert 0 <= figures["engine_seconds"] < 0.05


def test_hf_generate_records_engine_start_and_each_batch(tmp_path):
    model = resolve_model("tiny-llama")
    clock = Clock()
    t0 = time.time()
    texts, backend = generate(model, ["one two", "three", "four five six"], max_tokens=3, backend="hf",
                              batch_size=2, clock=clock)
    wall = time.time() - t0
    assert backend == "hf" and len(texts) == 3
    assert clock.engine_seconds > 0
    assert len(clock.spans) == 2  # two batches
    assert all(t0 <= start and start + seconds <= t0 + wall + 0.01 for start, seconds in clock.spans)
    assert clock.engine_seconds + sum(s for _, s in clock.spans) <= wall + 0.01


# --- the markers of a real iteration (Iteration's stages, storage and markers; model-bound calls faked) ------

class _Fakes:
    def run_train(self, cfg, rows, warm_run=None):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter.bin").write_bytes(b"x")
        return {"steps": 2, "tokens": 40, "loss": 1.0, "train_seconds": 1.5, "setup_seconds": 4.0}

    def run_tasks(self, path, calls, on_result=None, **_):
        now = time.time()
        if path.endswith(":infer_shard"):
            # Two replicas in parallel: busy 10 s in all (now-20 .. now-10), not 12.
            spans = [[[now - 20, 6.0]], [[now - 16, 6.0]]]
            out = [(["#### 0"] * len(c["prompts"]), "fake", {"generate_spans": spans[i], "engine_seconds": 3.0 + i})
                   for i, c in enumerate(calls)]
        else:
            out = [{"rows": [], "prompt_tokens": 7, "completion_tokens": 3, "stopped": None,
                    "generate_spans": [[now - 8, 2.0], [now - 5, 1.0]], "engine_seconds": 4.5} for _ in calls]
        for i, res in enumerate(out):
            if on_result is not None:
                on_result(i, res)
        return out


@pytest.fixture
def spec(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i + 1}"}) + "\n"
                            for i in range(4)))
    return parse_spec({"data": {"seed": str(seed)}, "output": str(tmp_path / "out"), "loop": {"maxIterations": 3},
                       "infer": {"replicas": 2}, "filters": {"decontaminate": False}})


def test_stage_markers_carry_the_inner_times(monkeypatch, spec, tmp_path):
    fakes = _Fakes()
    monkeypatch.setattr(train_mod, "run_train", fakes.run_train)
    monkeypatch.setattr(iteration_mod.fanout, "run_tasks", fakes.run_tasks)
    it = iteration_mod.Iteration("clocked", "uid-1", spec, 0, 1, tmp_path / "scratch").run()
    assert it.failures == 4  # every answer wrong: the teacher is asked
    stage = tmp_path / "out" / "clocked" / "iter-0"
    infer = json.loads((stage / "infer" / "_DONE.json").read_text())
    assert infer["replicas"] == 2
    assert infer["generate_seconds"] == 10.0 and infer["engine_seconds"] == 4.0
    teach = json.loads((stage / "teach" / "_DONE.json").read_text())
    assert teach["generate_seconds"] == 3.0 and teach["engine_seconds"] == 4.5
    shard = json.loads((stage / "teach" / "shard-0.json").read_text())
    assert len(shard["generate_spans"]) == 2
    train = json.loads((stage / "train" / "_DONE.json").read_text())
    assert train["train_seconds"] == 1.5 and train["setup_seconds"] == 4.0
