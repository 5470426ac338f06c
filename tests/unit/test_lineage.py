"""`llm2llm lineage`: walking a teacher row back to its seed row over a realistic run folder.

``make_run`` writes a run folder the way the iteration job does (real schemas from llm2llm.schemas, stage
markers and manifests through RunStorage); tests/unit/test_report.py and the MLflow test reuse it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm2llm.cli import main
from llm2llm.lineage import LineageError, format_lineage, lineage, open_run
from llm2llm.schemas import DATASET, GENERATED, PREDICTIONS, REJECTED, SCORED, row_id, table
from llm2llm.spec import parse_spec, spec_to_wire
from llm2llm.status import IterationStatus, RunStatus, TokenCounts
from llm2llm.storage import RunStorage

XSS = "<script>alert(1)</script>"
TEACHER = "smollm2-135m"
PROMPT_HASH = "9f2c1a7e55d0"
SEED = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?",
     "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
     "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"),
    ("Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
     "parents gave her $15, and her grandparents twice as much as her parents. How much more money does she need?",
     "Betty has 100/2 = $50.\nHer grandparents gave her 15*2 = $30.\nShe needs 100-50-30-15 = $5 more.\n#### 5"),
    ("James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
     "He writes each friend 3*2 = 6 pages a week.\nSo he writes 6*2 = 12 pages every week.\n"
     "That means he writes 12*52 = 624 pages a year.\n#### 624"),
    ("Albert buys 2 large pizzas and 2 small pizzas. A large pizza has 16 slices and a small pizza has 8 slices. "
     "How many pieces does he eat that day if he eats it all?",
     "He eats 32 from the largest pizzas because 2 x 16 = 32.\nHe eats 16 from the small pizza because 2 x 8 = 16."
     "\nHe eats 48 pieces because 32 + 16 = 48.\n#### 48"),
    ("Ken created a care package to send to his brother. The box weighed 2 pounds, then he tripled it. "
     "What was the final weight?", "2*3 = 6.\n#### 6"),
]
TEST = [
    ("Janet's ducks lay 16 eggs per day. She eats three and bakes with four. She sells the rest for $2 each. "
     "How much does she make every day?", "16-3-4 = 9 eggs.\n9*2 = $18.\n#### 18"),
    ("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
     "2/2 = 1 bolt of white.\n2+1 = 3 bolts.\n#### 3"),
    ("Josh buys a house for $80,000 and puts in $50,000 in repairs. This increased the value by 150%. "
     "How much profit did he make?", "80000+50000 = 130000.\n80000*2.5 = 200000.\n200000-130000 = 70000.\n#### 70000"),
    ("James runs 3 sprints 3 times a week. He runs 60 meters each sprint. How many meters does he run a week?",
     "3*3 = 9 sprints.\n9*60 = 540 meters.\n#### 540"),
]
# Which seed rows (by index) the student gets wrong, and test accuracy, per iteration.
WRONG = {0: [0, 1, 2, 3], 1: [1, 3], 2: [3]}
TEST_RIGHT = {0: 1, 1: 2, 2: 3}
SECONDS = {"prepare": 1.2, "train": 41.5, "infer": 12.25, "score": 0.3, "teach": 18.0, "filter": 0.4, "merge": 0.2}


def _answer(text: str) -> str:
    return text.rsplit("####", 1)[1].strip()


def _dataset(pairs: list[tuple[str, str]], source: str) -> list[dict]:
    return [{"id": row_id(q, a), "parent_id": None, "iteration": None, "source": source, "teacher_model": None,
             "prompt_hash": None, "input": q, "output": a} for q, a in pairs]


def make_run(tmp: Path, name: str = "gsm8k-demo", iterations: int = 3, phase: str = "Succeeded") -> RunStorage:
    """A committed run folder with ``iterations`` iterations (the last one does not teach)."""
    out = tmp / "runs"
    spec = parse_spec({
        "data": {"seed": str(tmp / "seed.jsonl"), "test": str(tmp / "test.jsonl")},
        "output": str(out),
        "loop": {"maxIterations": iterations},
        "teacher": {"kind": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": TEACHER,
                    "apiKeySecretRef": {"name": "teacher", "key": "api-key"}, "samplesPerFailure": 2},
    })
    store = RunStorage(str(out), name)
    store.write_json(store.path("run.json"), {"name": name, "uid": "6f1d2c3b-0000-4000-8000-000000000001",
                                              "spec": spec_to_wire(spec)})
    seed, test = _dataset(SEED, "seed"), _dataset(TEST, "test")
    store.write_table(store.path("data", "seed.parquet"), table(seed, DATASET))
    store.write_table(store.path("data", "test.parquet"), table(test, DATASET))
    train = list(seed)
    status = RunStatus(phase="Running", started_at="2026-03-01T10:00:00Z", output=store.uri(), max_iterations=iterations)
    for i in range(iterations):
        last = i == iterations - 1
        done = lambda stage, **info: store.mark_done(i, stage, {"seconds": SECONDS[stage], "attempt": 1, **info})
        done("prepare", train_rows=len(train))
        done("train", steps=10 + 2 * len(train), loss=1.9 - 0.3 * i)
        preds = []
        for k, r in enumerate(seed):
            wrong = k in WRONG[i]
            gold = _answer(r["output"])
            pred = f"Let me think. The answer is\n#### {int(gold) + 7 if wrong else gold}"
            preds.append({"id": r["id"], "split": "seed", "input": r["input"], "output": r["output"],
                          "prediction": pred, "iteration": i, "backend": "vllm"})
        for k, r in enumerate(test):
            gold = _answer(r["output"])
            ok = k < TEST_RIGHT[i]
            preds.append({"id": r["id"], "split": "test", "input": r["input"], "output": r["output"],
                          "prediction": f"#### {gold if ok else '0'}", "iteration": i, "backend": "vllm"})
        store.write_table(store.stage_dir(i, "infer") + "/predictions.parquet", table(preds, PREDICTIONS))
        done("infer", rows=len(preds))
        scored = [{**p, "predicted_answer": _answer(p["prediction"]), "gold_answer": _answer(p["output"]),
                   "correct": _answer(p["prediction"]) == _answer(p["output"])} for p in preds]
        store.write_table(store.stage_dir(i, "score") + "/scored.parquet", table(scored, SCORED))
        seed_acc = 1 - len(WRONG[i]) / len(seed)
        test_acc = TEST_RIGHT[i] / len(test)
        done("score", seed_accuracy=seed_acc, test_accuracy=test_acc, seed_failures=len(WRONG[i]))
        it = IterationStatus(index=i, train_rows=len(train), train_steps=10 + 2 * len(train), train_loss=1.9 - 0.3 * i,
                             seed_accuracy=seed_acc, test_accuracy=test_acc, failures=len(WRONG[i]),
                             gpu_seconds=0.0, started_at=f"2026-03-01T1{i}:00:00Z", job=f"{name}-i{i}-a1")
        it.tokens = TokenCounts(trained=1000 * len(train))
        if not last:
            gen, kept, rejected = [], [], []
            for k in WRONG[i]:
                parent = seed[k]
                base = {"parent_id": parent["id"], "iteration": i, "source": "teacher", "teacher_model": TEACHER,
                        "prompt_hash": PROMPT_HASH, "round": 0, "parse_error": None}
                q1 = f"Variant {i}.{k}: {parent['input']} (with {k + 2} more items)"
                a1 = f"Work it out step by step.\n#### {int(_answer(parent['output'])) + k + 2}"
                # Untrusted teacher text: the report must escape it, never run it.
                q2 = f"{XSS} What is {k} + {i}? <b>bold</b> & more"
                a2 = f"{k} + {i} = {k + i}\n#### {k + i}"
                raw = f"Question: {q1}\nAnswer: {a1}\n\nQuestion: {q2}\nAnswer: {a2}"
                cands = [{**base, "id": row_id(q1, a1), "input": q1, "output": a1, "raw": raw,
                          "prompt_tokens": 310 + k, "completion_tokens": 120 + k},
                         {**base, "id": row_id(q2, a2), "input": q2, "output": a2, "raw": raw,
                          "prompt_tokens": 0, "completion_tokens": 0},
                         {**base, "id": row_id(parent["input"], a1), "input": parent["input"], "output": a1, "raw": raw,
                          "prompt_tokens": 0, "completion_tokens": 0},
                         {**base, "id": row_id(parent["id"], f"garbage{i}.{k}"), "input": None, "output": None,
                          "raw": f"I cannot do that {XSS}", "parse_error": "unparseable", "round": 1,
                          "prompt_tokens": 290, "completion_tokens": 15}]
                gen += cands
                for c, reason in zip(cands, (None, None, "duplicate", "unparseable")):
                    if reason is None:
                        kept.append({"id": c["id"], "parent_id": c["parent_id"], "iteration": i, "source": "teacher",
                                     "teacher_model": TEACHER, "prompt_hash": PROMPT_HASH, "input": c["input"],
                                     "output": c["output"]})
                    else:
                        rejected.append({**c, "reason": reason})
            store.write_table(store.stage_dir(i, "teach") + "/generated.parquet", table(gen, GENERATED))
            ptok = sum(c["prompt_tokens"] for c in gen)
            ctok = sum(c["completion_tokens"] for c in gen)
            done("teach", failures=len(WRONG[i]), candidates=len(gen), prompt_tokens=ptok, completion_tokens=ctok)
            reasons: dict[str, int] = {}
            for r in rejected:
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            store.write_table(store.stage_dir(i, "filter") + "/kept.parquet", table(kept, DATASET))
            store.write_table(store.stage_dir(i, "filter") + "/rejected.parquet", table(rejected, REJECTED))
            done("filter", generated=len(gen), kept=len(kept), rejected=reasons)
            train = train + kept
            store.write_table(store.stage_dir(i, "merge") + "/train.parquet", table(train, DATASET))
            done("merge", rows=len(train), added=len(kept))
            it.generated, it.kept, it.rejected = len(gen), len(kept), reasons
            it.tokens.teacher_prompt, it.tokens.teacher_completion = ptok, ctok
        else:
            it.stop_reason = "MaxIterations"
        for stage in SECONDS:
            if store.stage_done(i, stage) is not None:
                it.seconds[stage] = SECONDS[stage]
                it.datasets[stage] = store.uri(f"iter-{i}", stage)
        it.finished_at = f"2026-03-01T1{i}:30:00Z"
        store.write_iteration(it)
        status.record_iteration(it)
    if phase == "Succeeded":
        status.phase, status.stop_reason, status.finished_at = "Succeeded", "MaxIterations", "2026-03-01T13:00:00Z"
    store.write_json(store.path("status.json"), status.wire())
    return store


def kept_rows(store: RunStorage, i: int) -> list[dict]:
    return store.read_table(store.stage_dir(i, "filter") + "/kept.parquet", DATASET).to_pylist()


@pytest.fixture
def run(tmp_path: Path) -> RunStorage:
    return make_run(tmp_path)


def test_teacher_row_walks_back_to_its_seed(run: RunStorage):
    row = kept_rows(run, 1)[0]  # a row generated in iteration 1 from seed row 1
    lin = lineage(run, row["id"])
    assert lin.row.kind == "kept" and lin.row.iteration == 1 and lin.row.file == "iter-1/filter/kept.parquet"
    assert lin.row.row["teacher_model"] == TEACHER and lin.row.row["prompt_hash"] == PROMPT_HASH
    parent = lin.ancestors[0]
    assert parent.kind == "seed" and parent.row["id"] == row["parent_id"] and lin.seed is parent
    assert parent.row["input"] == SEED[1][0]
    pred = lin.prediction
    assert pred is not None and pred["iteration"] == 1 and pred["correct"] is False
    assert pred["id"] == parent.row["id"] and pred["predicted_answer"] == "17" and pred["gold_answer"] == "10"
    chain = [s.text for s in lin.chain]
    assert chain[0].startswith(f"seed row {parent.row['id']}")
    assert any("student answered wrong (predicted 17, gold 10)" in t for t in chain)
    assert any("filter kept it" in t for t in chain)
    assert any("merged into iter-1/merge/train.parquet" in t for t in chain)
    assert chain[-1] == "trained on in iteration(s) 2"


def test_cli_prints_row_parent_prediction_and_chain(run: RunStorage, capsys):
    row = kept_rows(run, 0)[0]
    assert main(["lineage", run.uri(), row["id"]]) == 0
    out = capsys.readouterr().out
    seed_id = row["parent_id"]
    for needle in (f"row {row['id']}", "[kept, iter-0/filter/kept.parquet]", f"teacher model: {TEACHER}",
                   f"prompt hash:   {PROMPT_HASH}", "source:        teacher", "iteration:     0",
                   f"parent {seed_id}  [seed, data/seed.parquet]", SEED[0][0][:60],
                   "student's prediction for the parent in iteration 0 (wrong: predicted 79, gold 72",
                   "chain:", "trained on in iteration(s) 1-2"):
        assert needle in out, (needle, out)
    assert row["input"][:60] in out


def test_unique_prefix_and_json(run: RunStorage, capsys):
    row = kept_rows(run, 0)[1]
    assert main(["lineage", run.uri(), row["id"][:12], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["row"]["row"]["id"] == row["id"] and doc["ancestors"][0]["kind"] == "seed"
    assert doc["prediction"]["correct"] is False


def test_rejected_candidate_and_seed_row(run: RunStorage):
    rej = run.read_table(run.stage_dir(0, "filter") + "/rejected.parquet", REJECTED).to_pylist()
    unparseable = next(r for r in rej if r["reason"] == "unparseable")
    lin = lineage(run, unparseable["id"])
    assert lin.row.kind == "rejected" and lin.ancestors[0].kind == "seed"
    assert any("filter rejected it: unparseable" in s.text for s in lin.chain)
    assert "raw teacher text" in format_lineage(lin)
    seed = lineage(run, row_id(*SEED[5]))
    assert seed.row.kind == "seed" and seed.ancestors == [] and seed.prediction is None
    assert seed.chain[-1].text == "trained on in iteration(s) 0-2"


def test_unknown_id_exits_1_with_a_clear_message(run: RunStorage, capsys):
    assert main(["lineage", run.uri(), "0123456789abcdefffff"]) == 1
    err = capsys.readouterr().err
    assert "row '0123456789abcdefffff' not found" in err and "3 iteration folder(s)" in err
    with pytest.raises(LineageError):
        lineage(run, "nope")
    assert main(["lineage", run.root + "-missing", "x"]) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_fsspec_uri_and_subprocess(run: RunStorage):
    """The console script itself, on a file:// URI (any fsspec URI takes the same path)."""
    row = kept_rows(run, 1)[1]
    exe = Path(sys.executable).with_name("llm2llm")
    out = subprocess.run([str(exe), "lineage", f"file://{run.root}", row["id"]], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"row {row['id']}" in out.stdout and XSS in out.stdout  # plain text output: shown verbatim
    assert open_run(f"file://{run.root}/").run_name == run.run_name
