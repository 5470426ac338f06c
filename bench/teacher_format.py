"""Structured (JSON-schema) teacher replies against the numbered text format (issue 17, item 4).

    .venv/bin/python -m bench.teacher_format [--failures 12] [--tasks demo tickets wordmath gsm8k]

For each task (its examples/<task>/run.yaml) and each reply format, the real teach stage function
``llm2llm_jobs.fanout.teach_shard`` runs in this process with the run's teacher (SmolLM2-135M through
vLLM on CPU: teacher.kind vllm, as in the run.yaml files), then the real filter (``CandidateFilter`` +
``filter_candidates``, as ``Iteration.filter`` does). Inputs are the same for both formats:

- failures: the first N seed rows (they play the examples the student got wrong; prediction "");
- samplesPerFailure, maxRounds, maxTokens, temperature: the run.yaml's (GSM8K: maxRounds is the spec default);
- existing: every seed input (iteration 0's training rows); held_out: the test inputs (decontaminate is on);
- examples: ``tasks.demonstration_rows`` of the seed, as ``Iteration._demonstration``; iteration 0, shard 0,
  so the sampling seeds are the same for both formats;
- json: teacher.structuredOutput true and reply_format None (what iteration 0 passes); text:
  structuredOutput false and reply_format "text" (what ``Iteration._known_reply_format`` passes).

``teach_shard`` builds and closes its own engine, as in a run. ``make_teacher`` is wrapped (same function,
timed) so the figures split the stage into engine start-up, generation (``Teacher.complete``), engine
release (``close``) and the rest (parsing, judging). Every measurement records the 1-minute load before
and after and this process's CPU seconds: the machine is shared, so compare formats within one run.
Formats alternate in order from task to task (json first, then text first) so a load change hits both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import _common as C

ENV = {**C.VLLM_CPU_ENV, "RAY_USAGE_STATS_ENABLED": "0"}
TASKS = {
    "demo": "examples/demo/run.yaml",
    "tickets": "examples/tickets/run.yaml",
    "wordmath": "examples/wordmath/run.yaml",
    "gsm8k": "examples/gsm8k/run.yaml",
}
PARSE_FAILURES = ("unparseable", "bad_format")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sha(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


class _Timed:
    """The teacher make_teacher built, with its complete() and close() timed."""

    def __init__(self, inner: Any, times: dict[str, float]):
        self._inner, self._times = inner, times

    def reply_format(self, wanted: str) -> str:
        return self._inner.reply_format(wanted)

    def complete(self, conversations, **kw):
        t0 = time.perf_counter()
        try:
            return self._inner.complete(conversations, **kw)
        finally:
            self._times["generate_s"] += time.perf_counter() - t0
            self._times["complete_calls"] += 1

    def close(self) -> None:
        t0 = time.perf_counter()
        try:
            self._inner.close()
        finally:
            self._times["close_s"] += time.perf_counter() - t0


def _inputs(path: str, n_failures: int) -> dict[str, Any]:
    from llm2llm.data import load_examples
    from llm2llm.spec import load_run
    from llm2llm.tasks import demonstration_rows

    spec = load_run(path).spec
    d = spec.data
    seed = load_examples(d.seed, d.input_field, d.output_field, "seed", d.seed_limit).to_pylist()
    test = (load_examples(d.test, d.input_field, d.output_field, "test", d.test_limit).to_pylist()
            if d.test else [])
    pairs = [(r["input"], r["output"]) for r in seed]
    return {
        "spec": spec,
        "seed": seed,
        "failures": [{"id": r["id"], "input": r["input"], "output": r["output"], "prediction": ""}
                     for r in seed[:n_failures]],
        "existing": [r["input"] for r in seed],
        "held_out": [r["input"] for r in test] if (d.test and spec.filters.decontaminate) else [],
        "examples": [list(e) for e in demonstration_rows(spec.task, pairs, spec.student.training.seed)],
        "data_sha256": {d.seed: _sha(d.seed), **({d.test: _sha(d.test)} if d.test else {})},
    }


def _raw_checks(rows: list[dict], fmt: str, max_tokens: int) -> dict[str, Any]:
    """Per teacher reply (the first candidate row of a completion carries its tokens): truncation, JSON
    validity, whitespace."""
    replies = [r for r in rows if r["prompt_tokens"] > 0]
    raw = [r["raw"] for r in replies]
    out: dict[str, Any] = {
        "replies": len(replies),
        "replies_at_max_tokens": sum(r["completion_tokens"] >= max_tokens for r in replies),
        "completion_tokens_mean": round(sum(r["completion_tokens"] for r in replies) / max(len(replies), 1), 1),
        "raw_with_outer_whitespace": sum(t != t.strip() for t in raw),
        "raw_with_newline": sum("\n" in t for t in raw),
        "fields_with_outer_whitespace": 0,
        # The same reply text for different failures (all requests of a round share one sampling seed).
        "identical_replies": len(raw) - len(set(raw)),
        # Characters of whitespace outside the fields' strings (JSON) or in total (text) per reply, on average.
        "whitespace_chars_mean": round(sum(sum(ch.isspace() for ch in (_outside_strings(t) if fmt == "json" else t))
                                           for t in raw) / max(len(raw), 1), 1),
    }
    if fmt == "json":
        bad = 0
        for t in raw:
            try:
                doc = json.loads(t)
            except ValueError:
                bad += 1
                continue
            for item in doc.get("items", []) if isinstance(doc, dict) else []:
                if isinstance(item, dict):
                    out["fields_with_outer_whitespace"] += sum(
                        isinstance(v, str) and v != v.strip() for v in item.values())
        out["raw_not_json"] = bad
    return out


def _outside_strings(text: str) -> str:
    """The characters of a JSON text that are not inside string literals."""
    out, inside, escaped = [], False, False
    for ch in text:
        if inside:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inside = False
        elif ch == '"':
            inside = True
        else:
            out.append(ch)
    return "".join(out)


def warm_up(spec: Any) -> dict[str, float]:
    """This process's one-off costs, paid before the measurements so that neither format pays them alone:
    importing vLLM, a first engine, a first text request and a first JSON-schema request (the structured-output
    backend's own start). A teach stage in a run is a fresh process and pays them once."""
    from llm2llm.tasks import Task
    from llm2llm_jobs.teach import make_teacher

    out = {}
    t0 = time.perf_counter()
    import vllm  # noqa: F401

    out["import_vllm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = make_teacher(spec.teacher, None, None)
    out["engine_start_s"] = time.perf_counter() - t0
    task = Task(spec.task)
    conv = [task.teacher_messages("The food was cold.", "negative", 1, None, "text")]
    try:
        t0 = time.perf_counter()
        teacher.complete(conv, n=1, temperature=1.0, top_p=1.0, max_tokens=16, seed=0)
        out["first_text_request_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        teacher.complete([task.teacher_messages("The food was cold.", "negative", 1, None, "json")], n=1,
                         temperature=1.0, top_p=1.0, max_tokens=16, seed=0, schemas=[task.reply_schema(1, 4000)])
        out["first_json_request_s"] = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        teacher.close()
        out["close_s"] = time.perf_counter() - t0
    return {k: round(v, 2) for k, v in out.items()}


def timed_teach_shard(wire: dict, inp: dict[str, Any], reply_format: str | None) -> tuple[dict, dict, float, float]:
    """The teach stage's own function on ``inp`` under the spec ``wire``, with the teacher's start-up, generate
    and close time counted apart (``_Timed``). Returns (result, those times, wall s, CPU s of this process)."""
    import llm2llm_jobs.teach as teach_mod
    from llm2llm.launch import API_KEY_ENV
    from llm2llm_jobs import fanout

    times = {"startup_s": 0.0, "generate_s": 0.0, "close_s": 0.0, "complete_calls": 0}
    real = teach_mod.make_teacher

    def timed_make_teacher(*a, **kw):
        t0 = time.perf_counter()
        try:
            teacher = real(*a, **kw)
        finally:
            times["startup_s"] += time.perf_counter() - t0
        return _Timed(teacher, times)

    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    teach_mod.make_teacher = timed_make_teacher
    try:
        res = fanout.teach_shard(
            spec=wire, model_path=None, failures=inp["failures"], existing=inp["existing"],
            held_out=inp["held_out"], iteration=0, shard=0, token_budget=None, api_key_env=API_KEY_ENV,
            examples=inp["examples"], reply_format=reply_format)
    finally:
        teach_mod.make_teacher = real
    return res, times, time.perf_counter() - t0, _cpu_seconds() - cpu0


def measure(task_name: str, inp: dict[str, Any], fmt: str) -> dict[str, Any]:
    import pyarrow as pa

    from llm2llm.schemas import GENERATED, table
    from llm2llm.tasks import Task
    from llm2llm_jobs import filter as flt

    spec = inp["spec"]
    wire = spec.model_dump(mode="json", by_alias=True)
    wire["teacher"]["structuredOutput"] = fmt == "json"
    load_before = [round(x, 2) for x in os.getloadavg()]
    res, times, teach_s, teach_cpu = timed_teach_shard(wire, inp, None if fmt == "json" else "text")
    load_after_teach = [round(x, 2) for x in os.getloadavg()]

    # The filter stage, as Iteration.filter does it (task without examples; cap None: loop.rowsPerRound unset).
    rows = res["rows"]
    gen = table(rows, GENERATED) if rows else GENERATED.empty_table()
    task = Task(spec.task)
    t1 = time.perf_counter()
    cf = flt.CandidateFilter(task, spec.filters, spec.teacher.samples_per_failure, existing=inp["existing"],
                             held_out=inp["held_out"])
    kept, rejected, reasons = flt.filter_candidates(cf, gen, spec.teacher.model, task.prompt_hash(), 0, cap=None)
    filter_s = time.perf_counter() - t1
    load_after = [round(x, 2) for x in os.getloadavg()]

    candidates = len(rows)
    parse_fail = sum(reasons.get(r, 0) for r in PARSE_FAILURES)
    tokens = res["prompt_tokens"] + res["completion_tokens"]
    assert isinstance(kept, pa.Table)
    rej = rejected.to_pylist()
    return {
        "task": task_name,
        "format": fmt,
        "reply_format_used": res["reply_format"],
        "failures": len(inp["failures"]),
        "samples_per_failure": spec.teacher.samples_per_failure,
        "max_rounds": spec.teacher.max_rounds,
        "max_tokens": spec.teacher.max_tokens,
        "rounds_used": 1 + max((r["round"] for r in rows), default=0),
        "candidates": candidates,
        "kept": kept.num_rows,
        "rejected": dict(sorted(reasons.items())),
        "parse_failures": parse_fail,
        "parse_failure_rate": round(parse_fail / candidates, 4) if candidates else None,
        "prompt_tokens": res["prompt_tokens"],
        "completion_tokens": res["completion_tokens"],
        "kept_per_1k_tokens": round(1000 * kept.num_rows / tokens, 3) if tokens else None,
        "teach_s": round(teach_s, 2),
        "startup_s": round(times["startup_s"], 2),
        "generate_s": round(times["generate_s"], 2),
        "close_s": round(times["close_s"], 2),
        "teach_other_s": round(teach_s - times["startup_s"] - times["generate_s"] - times["close_s"], 2),
        "complete_calls": times["complete_calls"],
        "teach_cpu_s": round(teach_cpu, 1),
        "filter_s": round(filter_s, 3),
        "load_before": load_before,
        "load_after_teach": load_after_teach,
        "load_after": load_after,
        "stopped": res["stopped"],
        "checks": _raw_checks(rows, fmt, spec.teacher.max_tokens),
        "samples": {
            "kept": kept.to_pylist()[:4],
            "rejected": [{"reason": r["reason"], "input": r["input"], "output": r["output"],
                          "raw": (r["raw"] or "")[:600]} for r in rej[:6]],
            "raw_replies": [r["raw"][:800] for r in rows if r["prompt_tokens"] > 0][:3],
        },
    }


def _table(results: list[dict]) -> str:
    head = ["task", "format", "candidates", "kept", "parse-failure rate", "kept / 1k teacher tokens",
            "teach s (start-up + generate + rest)", "CPU s", "rejections", "load 1-min before -> after"]
    rows = []
    for r in results:
        rate = "-" if r["parse_failure_rate"] is None else f"{r['parse_failure_rate']:.0%} ({r['parse_failures']})"
        rows.append([
            r["task"], r["format"], r["candidates"], r["kept"], rate,
            "-" if r["kept_per_1k_tokens"] is None else f"{r['kept_per_1k_tokens']:.2f}",
            f"{r['teach_s']:.0f} ({r['startup_s']:.0f} + {r['generate_s']:.0f} + "
            f"{r['teach_s'] - r['startup_s'] - r['generate_s']:.0f})",
            f"{r['teach_cpu_s']:.0f}",
            ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "none",
            f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}",
        ])
    return C.md_table(head, rows)


def _detail_table(results: list[dict]) -> str:
    head = ["task", "format", "replies", "rounds", "prompt tok", "completion tok", "mean completion tok / reply",
            "replies at maxTokens", "JSON replies not parseable as JSON", "fields with outer whitespace", "identical replies", "mean whitespace chars / reply (JSON: outside strings)"]
    rows = []
    for r in results:
        c = r["checks"]
        rows.append([r["task"], r["format"], c["replies"], r["rounds_used"], r["prompt_tokens"],
                     r["completion_tokens"], c["completion_tokens_mean"],
                     f"{c['replies_at_max_tokens']} (maxTokens {r['max_tokens']})",
                     c.get("raw_not_json", "-"), c["fields_with_outer_whitespace"] if r["format"] == "json" else "-",
                     c["identical_replies"], c["whitespace_chars_mean"]])
    return C.md_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.teacher_format", description=__doc__.split("\n")[0])
    p.add_argument("--failures", type=int, default=12, help="first N seed rows of each task play the failures")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--formats", nargs="+", default=["json", "text"], choices=["json", "text"])
    p.add_argument("--name", default="teacher_format")
    args = p.parse_args(argv)

    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    os.chdir(C.ROOT)  # the run.yaml data paths are relative to the repository root
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llm2llm_jobs").setLevel(logging.INFO)

    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    results, inputs_info = [], {}
    from llm2llm.spec import load_run

    print(f"== warm-up (not counted; load {C.load_str()})", flush=True)
    warm = warm_up(load_run(TASKS["demo"]).spec)
    print(f"   {warm}", flush=True)

    def write(done: bool) -> None:
        """Results so far (after every measurement, so an interrupted run keeps what it measured)."""
        wall = time.perf_counter() - started
        warm_md = ", ".join(f"{k} {v}" for k, v in warm.items())
        state = "" if done else f" **Partial: {len(results)} measurement(s) so far.**"
        md = (
            f"Command: `.venv/bin/python -m bench.teacher_format --failures {args.failures} --tasks "
            f"{' '.join(args.tasks)}`; total wall {wall / 60:.1f} min; 1-minute load at the start {load_start[0]}."
            f"{state}\n\n"
            "Per task and reply format, the real `teach_shard` (SmolLM2-135M teacher, vLLM on CPU, its own engine "
            "per call as in a run) on the first "
            f"{args.failures} seed rows as failures, then the real filter. Parse-failure rate = (unparseable + "
            "bad_format) / candidates. Teach seconds are wall time of `teach_shard`: engine start-up (`make_teacher`) "
            "+ generation (`Teacher.complete`) + the rest (engine release, parsing, judging). CPU s: this process's "
            "CPU seconds during teach_shard. The machine is shared (2 cores): the load columns say how busy it was. "
            f"Before the measurements, a warm-up (not counted) paid this process's one-off costs: {warm_md} (seconds).\n\n"
            + _table(results) + "\n\nReplies:\n\n" + _detail_table(results)
        )
        C.save(args.name, {"args": vars(args), "complete": done, "wall_s": round(wall, 1), "load_start": load_start,
                           "warm_up": warm, "env": {k: os.environ.get(k) for k in ENV}, "inputs": inputs_info,
                           "results": results}, md)

    for n, name in enumerate(args.tasks):
        if not Path(TASKS[name]).exists():
            print(f"{TASKS[name]} does not exist: {name} skipped", flush=True)
            continue
        inp = _inputs(TASKS[name], args.failures)
        inputs_info[name] = {"run_yaml": TASKS[name], "run_yaml_sha256": _sha(TASKS[name]),
                             "seed_rows": len(inp["seed"]), "held_out": len(inp["held_out"]),
                             "failures": len(inp["failures"]), "demonstration_rows": inp["examples"],
                             "data_sha256": inp["data_sha256"]}
        order = args.formats if n % 2 == 0 else list(reversed(args.formats))
        for fmt in order:
            print(f"== {name} / {fmt}: teach_shard, {len(inp['failures'])} failures (load {C.load_str()})",
                  flush=True)
            r = measure(name, inp, fmt)
            results.append(r)
            write(False)
            print(f"   {r['candidates']} candidates, {r['kept']} kept, rejected {r['rejected']}, "
                  f"teach {r['teach_s']} s (start-up {r['startup_s']} s), load {r['load_before'][0]} -> "
                  f"{r['load_after'][0]}", flush=True)
    write(True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
