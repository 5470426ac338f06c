"""Failure inference as a run pays for it: the run's warm vLLM engine vs HF generate, over N iterations.

    .venv/bin/python -m bench.infer_warm_vs_hf [--iterations 3] [--prompts 128] [--max-tokens 64]

``bench.infer_vllm_vs_hf`` times one generate call in a fresh process: every call pays its engine's start.
A run does not: its infer stage asks the run's warm base-model engine (``llm2llm_jobs.engines.EngineActor``)
to generate with that iteration's LoRA adapter, so the engine starts once per run. This bench measures that,
against what the HF backend pays in each iteration (a fresh process: imports, base model, adapter, generate):

- vLLM: one process builds an ``EngineActor`` exactly as the run does (for the student's LoRA rank; on CPU it
  merges each adapter into its weights, ``llm2llm_jobs.lora``), then generates once per iteration, each time
  with another adapter; every second from process start counts.
- HF: one fresh process per iteration, ``llm2llm_jobs.infer.generate(backend="hf")`` with that adapter.

The adapters are the student's LoRA (the spec's default rank and target modules) with small random weights,
one per iteration, so each iteration loads a new adapter as a run does. Tokens are counted the same way on
both sides (the texts re-tokenised). The same prompts as bench.infer_vllm_vs_hf: GSM8K test questions in the
student format, greedy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _common as C
from bench.infer_vllm_vs_hf import prompts

GOAL = 3.0
MODEL = "smollm2-135m"


def _tokens(model_path: str, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


def make_adapters(cfg: dict) -> dict:
    """The student's LoRA adapter on the base model, ``cfg['n']`` times with other small random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llm2llm.spec import LoraSpec
    from llm2llm_jobs.models import resolve_model

    spec = LoraSpec()
    paths = []
    for k in range(cfg["n"]):
        torch.manual_seed(k)
        model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), torch_dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                 target_modules=spec.target_modules, task_type="CAUSAL_LM"))
        with torch.no_grad():  # B starts at zero (the adapter would be the base model): give it weights
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1e-3)
        path = os.path.join(cfg["dir"], f"adapter-{k}")
        model.save_pretrained(path)
        paths.append(path)
    return {"adapters": paths, "rank": spec.r}


def warm_vllm(cfg: dict) -> dict:
    """One process, as a run's engine: start once, then one generate per adapter."""
    t_start = time.perf_counter()
    from llm2llm_jobs.engines import EngineActor, EngineSpec
    from llm2llm_jobs.infer import lora_rank
    from llm2llm_jobs.models import resolve_model

    ps = prompts(cfg["prompts"])
    engine = EngineActor(EngineSpec(model=MODEL, dtype="student", max_lora_rank=lora_rank(cfg["rank"])),
                         idle_seconds=24 * 3600)
    startup = time.perf_counter() - t_start
    iters = []
    for adapter in cfg["adapters"]:
        t0 = time.perf_counter()
        texts, (_, gen_s) = engine.generate(ps, cfg["max_tokens"], adapter)
        iters.append({"wall_s": round(time.perf_counter() - t0, 3), "gen_s": gen_s, "texts": texts})
    model_path = resolve_model(MODEL)
    for it in iters:
        it["tokens"] = _tokens(model_path, it.pop("texts"))
    return {"startup_s": round(startup, 3), "iterations": iters}


def hf_once(cfg: dict) -> dict:
    """One fresh process, as a non-warm stage: imports, base model and adapter, generate."""
    t_start = time.perf_counter()
    import llm2llm_jobs.infer as infer
    from llm2llm_jobs.infer import default_dtype, generate
    from llm2llm_jobs.models import resolve_model

    split: list[tuple] = []
    speed = infer._log_speed
    infer._log_speed = lambda *a: (split.append(a), speed(*a))  # (backend, load_s, gen_s, tokens)
    model_path = resolve_model(MODEL)
    texts, used = generate(model_path, prompts(cfg["prompts"]), max_tokens=cfg["max_tokens"], backend="hf",
                           batch_size=cfg["batch_size"], dtype=default_dtype(), adapter_path=cfg["adapter"])
    wall = time.perf_counter() - t_start
    assert used == "hf", used
    return {"wall_s": round(wall, 3), "gen_s": round(split[-1][2], 3), "tokens": _tokens(model_path, texts)}


WORKERS = {"adapters": make_adapters, "warm-vllm": warm_vllm, "hf": hf_once}


def _spawn(kind: str, cfg: dict) -> dict:
    proc = subprocess.run([C.python(), "-m", "bench.infer_warm_vs_hf", kind, json.dumps(cfg)], cwd=C.ROOT,
                          env={**os.environ, **C.VLLM_CPU_ENV}, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {cfg} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(iterations: int, n: int, max_tokens: int, batch: int, workdir: str) -> dict:
    made = _spawn("adapters", {"n": iterations, "dir": workdir})
    base = {"prompts": n, "max_tokens": max_tokens, "batch_size": batch}
    sides: dict[str, dict] = {}
    # vLLM first, then HF, then vLLM again: load drift hits both sides; each side's better pass is the headline.
    for label in ("vllm", "hf", "vllm-repeat"):
        load0 = C.load_str()
        print(f"load {load0}: {label} ...", flush=True)
        if label.startswith("vllm"):
            r = _spawn("warm-vllm", {**base, "adapters": made["adapters"], "rank": made["rank"]})
            total = r["startup_s"] + sum(i["wall_s"] for i in r["iterations"])
        else:
            its = [_spawn("hf", {**base, "adapter": a}) for a in made["adapters"]]
            r = {"startup_s": None, "iterations": its}
            total = sum(i["wall_s"] for i in its)
        r.update(label=label, total_s=round(total, 2), tokens=sum(i["tokens"] for i in r["iterations"]),
                 load_start=load0, load_end=C.load_str())
        r["tok_s"] = round(r["tokens"] / total, 1)
        print(f"  {r['tokens']} tokens in {total:.1f}s = {r['tok_s']:.0f} tok/s", flush=True)
        sides[label] = r
    v = min((sides["vllm"], sides["vllm-repeat"]), key=lambda r: r["total_s"])
    h = sides["hf"]
    ratio = round(v["tok_s"] / h["tok_s"], 2)
    return {"iterations": iterations, "prompts": n, "max_tokens": max_tokens, "batch_size": batch, "goal": GOAL,
            "sides": list(sides.values()), "headline": {"vllm": v["label"], "ratio_incl_startup": ratio,
                                                         "met": ratio >= GOAL}}


def report(res: dict) -> str:
    rows = []
    for s in res["sides"]:
        rows.append([s["label"], "-" if s["startup_s"] is None else f"{s['startup_s']:.1f}",
                     " / ".join(f"{i['wall_s']:.1f}" for i in s["iterations"]),
                     " / ".join(f"{i['gen_s']:.1f}" for i in s["iterations"]), s["tokens"], f"{s['total_s']:.1f}",
                     f"{s['tok_s']:.0f}", f"{s['load_start']} -> {s['load_end']}"])
    h = res["headline"]
    by = {s["label"]: s for s in res["sides"]}
    v, hf = by[h["vllm"]], by["hf"]
    return "\n".join([
        f"{res['iterations']} iterations x {res['prompts']} GSM8K test prompts, max_tokens {res['max_tokens']}, greedy, "
        "SmolLM2-135M with a new LoRA adapter each iteration. vLLM: one warm engine (llm2llm_jobs.engines."
        "EngineActor) started once; HF: a fresh process per iteration (llm2llm_jobs.infer.generate). Every second "
        "from process start counts; tokens re-tokenised from the texts on both sides.",
        "",
        C.md_table(["side", "engine start s", "iteration s (adapter + generate)", "of which generate s", "tokens",
                    "total s", "tok/s incl. start-up", "load (1/5/15) start -> end"], rows),
        "",
        f"**Over {res['iterations']} iterations including every start-up: vLLM {v['tok_s']:.0f} tok/s "
        f"({v['total_s']:.1f} s, its better pass) vs HF {hf['tok_s']:.0f} tok/s ({hf['total_s']:.1f} s) = "
        f"{h['ratio_incl_startup']:.2f}x.** Goal >= {res['goal']:.0f}x: {'met' if h['met'] else 'MISSED'}.",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in WORKERS:
        print(json.dumps(WORKERS[argv[0]](json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.infer_warm_vs_hf", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="the HF stage's batch (spec.infer.batchSize)")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from results/*.json")
    args = p.parse_args(argv)
    if args.report_only:
        res = json.loads((C.RESULTS / "infer_warm_vs_hf.json").read_text())
        C.save("infer_warm_vs_hf", res, report(res))
        return 0
    with tempfile.TemporaryDirectory(prefix="llm2llm-bench-adapters-") as tmp:
        res = run(args.iterations, args.prompts, args.max_tokens, args.batch_size, tmp)
    C.save("infer_warm_vs_hf", res, report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
