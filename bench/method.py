"""Method benchmark (issue 7): does LLM2LLM's failure-driven augmentation beat its controls?

    .venv/bin/python -m bench.method [--seeds 1 2 3] [--iterations 3] [--steps 8] [--workers 1] ...

Four arms on the same seed set, model and per-iteration training budget (student.training.steps is fixed,
so more rows never means more optimizer steps), each over the same training/selection seeds:

- A  plain fine-tuning on the seed set (one iteration).
- B  LLM2LLM, the product's default loop: seed-only failures, retrain from base, samplesPerFailure new rows
     per failure per round (loop.select: failures).
- C  random control: each round adds as many teacher rows as B kept in that round (same seed), written
     from randomly drawn seed examples (loop.select: random, loop.rowsPerRound: B's kept counts).
- D  one-shot bulk: all of C's rows generated in round one (loop.select: random, rowsPerRound: [sum]),
     then one more training on seed + those rows (two iterations).

Every arm is a real run of the product: a run.yaml (from --base, default examples/demo/run.yaml) written
per arm and seed into --work, run with the LocalRunner (one Ray job per iteration on a local Ray), read
back from its status.json. Iteration 0 is the same computation in every arm (same seed data, base model,
steps and training seed), so A, C and D start from a copy of B's committed iteration-0 prepare/train/
infer/score stages (the product's stage-level resume skips them); C and D then run their own teach
stage. --no-reuse trains iteration 0 in every arm instead.

Reports held-out test accuracy per iteration, mean and spread over the seeds, rows added per round,
teacher acceptance, into bench/results/<name>.md/.json/.png. Re-running resumes finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import yaml

from bench import _common as C

ARMS = ("A", "B", "C", "D")
ARM_NAMES = {
    "A": "A plain fine-tuning",
    "B": "B LLM2LLM (failures)",
    "C": "C random control",
    "D": "D one-shot bulk",
}
REUSED_STAGES = ("prepare", "train", "infer", "score")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.method", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="examples/demo/run.yaml", help="run.yaml the arms are derived from")
    p.add_argument("--name", default="method_demo", help="results name: bench/results/<name>.md/.json/.png")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training/selection seeds")
    p.add_argument("--arms", default="ABCD", help="which arms (B runs first; C needs B, D needs C)")
    p.add_argument("--iterations", type=int, default=3, help="loop.maxIterations for B and C")
    p.add_argument("--steps", type=int, default=None, help="student.training.steps (default: the base's)")
    p.add_argument("--workers", type=int, default=None, help="student.workers (default: the base's)")
    p.add_argument("--seed-limit", type=int, default=None, help="data.seedLimit")
    p.add_argument("--test-limit", type=int, default=None, help="data.testLimit")
    p.add_argument("--teacher-rounds", type=int, default=None, help="teacher.maxRounds (default: the base's)")
    p.add_argument("--teacher-model", default=None, help="teacher.model (default: the base's)")
    p.add_argument("--self-consistency", type=int, default=None,
                   help="filters.verify.selfConsistency (gsm8k; default: the base's)")
    p.add_argument("--keep-warm", choices=("true", "false"), default=None,
                   help="spec.ray.keepWarm (default: the base's); false keeps one engine or trainer at a time in memory")
    p.add_argument("--work", default="/tmp/llm2llm-bench-method", help="scratch folder for the runs (not committed)")
    p.add_argument("--no-reuse", action="store_true", help="train iteration 0 in every arm")
    p.add_argument("--notes", default=None, help="a markdown file appended to the report (the analysis)")
    return p.parse_args(argv)


# --- run.yaml per arm --------------------------------------------------------------------------------
def arm_doc(base: dict[str, Any], args: argparse.Namespace, arm: str, seed: int,
            rows_per_round: list[int] | None = None, samples_per_failure: int | None = None) -> dict[str, Any]:
    doc = json.loads(json.dumps(base))
    doc["metadata"] = {"name": f"{args.name.replace('_', '-')}-{arm.lower()}-s{seed}"}
    s = doc["spec"]
    s["student"].setdefault("training", {})["seed"] = seed
    if args.steps is not None:
        s["student"]["training"]["steps"] = args.steps
    if not s["student"]["training"].get("steps"):
        raise SystemExit("the budget must be fixed: set student.training.steps in the base or pass --steps")
    if args.workers is not None:
        s["student"]["workers"] = args.workers
    if args.seed_limit is not None:
        s["data"]["seedLimit"] = args.seed_limit
    if args.test_limit is not None:
        s["data"]["testLimit"] = args.test_limit
    if args.teacher_rounds is not None:
        s.setdefault("teacher", {})["maxRounds"] = args.teacher_rounds
    if args.teacher_model is not None:
        s.setdefault("teacher", {})["model"] = args.teacher_model
    if args.self_consistency is not None:
        s.setdefault("filters", {}).setdefault("verify", {})["selfConsistency"] = args.self_consistency
    if samples_per_failure is not None:
        s.setdefault("teacher", {})["samplesPerFailure"] = samples_per_failure
    loop = s.setdefault("loop", {})
    # Every arm runs all its iterations (a round with no failures adds nothing), so iteration counts match.
    loop["stopWhen"] = {"noFailures": False}
    loop["maxIterations"] = {"A": 1, "B": args.iterations, "C": args.iterations, "D": 2}[arm]
    if arm in ("C", "D"):
        loop["select"] = "random"
        loop["rowsPerRound"] = rows_per_round
    s["output"] = str(Path(args.work) / args.name)
    s.setdefault("ray", {})["launcher"] = "local"
    if args.keep_warm is not None:
        s["ray"]["keepWarm"] = args.keep_warm == "true"
    return doc


def reuse_iteration0(src: Path, dest: Path) -> None:
    """Copy B's committed iteration-0 stages that do not depend on the arm (and the prepared data)."""
    if (dest / "iter-0").exists() or not (src / "iter-0" / "score" / "_DONE.json").exists():
        return
    shutil.copytree(src / "data", dest / "data", dirs_exist_ok=True)
    for stage in REUSED_STAGES:
        shutil.copytree(src / "iter-0" / stage, dest / "iter-0" / stage)


def start_ray(num_cpus: int, timeout_s: float = 300.0):
    """One private local Ray head for all the runs (the runner's own, on free ports, ready once it has taken
    a job); each run's jobs go to it through the Jobs API, as the runner does with spec.ray.address."""
    from llm2llm.localray import LocalRayHead

    head = LocalRayHead(num_cpus, timeout=timeout_s)
    address = head.start()
    print(f"local Ray at {address} ({num_cpus} logical CPUs) takes jobs", flush=True)
    return head, address


def run_arm(doc: dict[str, Any], work: Path, log: Path, address: Callable[[], str]) -> dict[str, Any]:
    """Run one arm's run.yaml with the product's LocalRunner; returns its status.json and wall time."""
    from llm2llm.runner import LocalRunner, format_table
    from llm2llm.spec import parse_run

    name = doc["metadata"]["name"]
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    run = parse_run(doc, str(path))  # validated exactly as `llm2llm validate` would
    out = Path(doc["spec"]["output"]) / name
    status_path = out / "status.json"
    wall_path = out / "bench_wall.json"
    if status_path.exists() and json.loads(status_path.read_text()).get("phase") == "Succeeded":
        print(f"[{name}] already finished, reading {status_path}", flush=True)
        wall = json.loads(wall_path.read_text())["wall_s"] if wall_path.exists() else None
        return {"status": json.loads(status_path.read_text()), "wall_s": wall, "run_yaml": str(path)}
    print(f"[{name}] {time.strftime('%H:%M:%S')} start, load {C.load_str()}", flush=True)
    t0 = time.monotonic()
    with open(log, "a") as fh:
        status = LocalRunner(run, address=address(), echo=lambda line: (fh.write(f"[{name}] {line}\n"), fh.flush())).execute()
    wall = round(time.monotonic() - t0, 1)
    wall_path.write_text(json.dumps({"wall_s": wall}))
    print(format_table(status), flush=True)
    print(f"[{name}] {time.strftime('%H:%M:%S')} {status.phase} in {wall:.0f}s", flush=True)
    if status.phase != "Succeeded":
        raise SystemExit(f"{name}: run {status.phase} ({status.stop_reason}); see {log}")
    return {"status": status.wire(), "wall_s": wall, "run_yaml": str(path)}


# --- analysis -----------------------------------------------------------------------------------------
def per_iteration(status: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for it in status["iterations"]:
        rej = it.get("rejected") or {}
        out.append({
            "iteration": it["index"], "train_rows": it.get("trainRows"), "train_steps": it.get("trainSteps"),
            "tokens_trained": (it.get("tokens") or {}).get("trained"), "train_loss": it.get("trainLoss"),
            "seed_accuracy": it.get("seedAccuracy"), "test_accuracy": it.get("testAccuracy"),
            "failures": it.get("failures", 0), "generated": it.get("generated", 0), "kept": it.get("kept", 0),
            "rejected": rej,
        })
    return out


def added_rows(output: str) -> list[dict[str, Any]]:
    """The teacher rows a run added (every iteration's filter/kept.parquet), for the label mix."""
    import pyarrow.parquet as pq

    rows = []
    for kept in sorted(Path(output).glob("iter-*/filter/kept.parquet")):
        rows += pq.read_table(kept, columns=["parent_id", "iteration", "input", "output"]).to_pylist()
    return rows


def last_scored(output: str, columns: list[str]) -> list[dict[str, Any]]:
    """The rows of the run's last committed iteration's score/scored.parquet (none before one is scored)."""
    import pyarrow.parquet as pq

    its = sorted(Path(output).glob("iter-*/score/scored.parquet"), key=lambda p: int(p.parent.parent.name[5:]))
    return pq.read_table(its[-1], columns=columns).to_pylist() if its else []


def final_test_errors(output: str) -> dict[str, int]:
    """Wrong test answers of the run's last iteration, by gold output (short outputs only, e.g. labels)."""
    out: dict[str, int] = {}
    for r in last_scored(output, ["split", "output", "correct"]):
        if r["split"] == "test" and not r["correct"]:
            key = r["output"] if len(r["output"]) <= 20 else "(long)"
            out[key] = out.get(key, 0) + 1
    return out


def test_kinds(run_yaml: str) -> dict[str, str]:
    """input -> its "kind" column, for a test file that has one (examples/reviews: plain, negated, contrast)."""
    spec = yaml.safe_load(Path(run_yaml).read_text())["spec"]["data"]
    path = C.ROOT / spec["test"]
    kinds = {}
    if path.suffix == ".jsonl" and path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if "kind" in row:
                kinds[row[spec.get("inputField", "input")]] = row["kind"]
    return kinds


def final_kind_accuracy(output: str, kinds: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(right, total) of the last iteration's test answers per kind of test row."""
    out: dict[str, tuple[int, int]] = {}
    if not kinds:
        return out
    for r in last_scored(output, ["split", "input", "correct"]):
        if r["split"] == "test" and r["input"] in kinds:
            right, total = out.get(kinds[r["input"]], (0, 0))
            out[kinds[r["input"]]] = (right + bool(r["correct"]), total + 1)
    return out


NEGATION_WORDS = frozenset({"not", "never", "no", "nobody", "nothing", "neither", "nor", "none"})


def shape(text: str) -> str:
    """A rough shape of a teacher-written review, to compare what the arms added (not a label)."""
    words = {w.strip(".,!?;:\"'").lower() for w in text.split()}
    if " but " in f" {text.lower()} ":
        return "contrast (but)"
    if words & NEGATION_WORDS or any(w.endswith("n't") for w in words):
        return "negation word"
    return "neither"


def mean_spread(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sample standard deviation (0 for one value), min, max."""
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd, min(values), max(values)


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m, sd, lo, hi = mean_spread(values)
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}]"


def summarize(results: dict[str, dict[int, dict[str, Any]]], iterations: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for arm, by_seed in results.items():
        its = {s: per_iteration(r["status"]) for s, r in by_seed.items()}
        n = max(len(v) for v in its.values())
        rows = []
        for i in range(n):
            acc = [v[i]["test_accuracy"] for v in its.values() if len(v) > i and v[i]["test_accuracy"] is not None]
            rows.append({
                "iteration": i,
                "test_accuracy": acc,
                "train_rows": [v[i]["train_rows"] for v in its.values() if len(v) > i],
                "kept": [v[i]["kept"] for v in its.values() if len(v) > i],
                "generated": [v[i]["generated"] for v in its.values() if len(v) > i],
                "failures": [v[i]["failures"] for v in its.values() if len(v) > i],
                "train_steps": [v[i]["train_steps"] for v in its.values() if len(v) > i],
            })
        final = [v[-1]["test_accuracy"] for v in its.values() if v and v[-1]["test_accuracy"] is not None]
        summary[arm] = {"per_iteration": rows, "final_test_accuracy": final}
    return summary


def markdown(args: argparse.Namespace, cmd: str, settings: dict[str, Any], summary: dict[str, Any],
             results: dict[str, dict[int, dict[str, Any]]], notes: list[str]) -> str:
    arms = [a for a in ARMS if a in summary]
    n_it = max(len(summary[a]["per_iteration"]) for a in arms)
    head = ["arm", *[f"iter {i}" for i in range(n_it)], "final"]
    rows = []
    for a in arms:
        per = summary[a]["per_iteration"]
        rows.append([ARM_NAMES[a], *[fmt(per[i]["test_accuracy"]) if i < len(per) else "-" for i in range(n_it)],
                     fmt(summary[a]["final_test_accuracy"])])
    detail_head = ["arm", "seed", "iter", "train rows", "steps", "seed acc", "test acc", "failures", "generated",
                   "kept", "rejected"]
    detail = []
    for a in arms:
        for s, r in sorted(results[a].items()):
            for it in per_iteration(r["status"]):
                rej = ", ".join(f"{k}={v}" for k, v in sorted(it["rejected"].items())) or "-"
                detail.append([a, s, it["iteration"], it["train_rows"], it["train_steps"],
                               _f(it["seed_accuracy"]), _f(it["test_accuracy"]), it["failures"], it["generated"],
                               it["kept"], rej])
    lines = [
        f"Command: `{cmd}`",
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".",
        "",
        "Held-out test accuracy per iteration: mean ± sample standard deviation [min, max] over the seeds "
        f"({', '.join(str(s) for s in args.seeds)}). A trains once; D trains twice (seed, then seed + all its rows).",
        "",
        C.md_table(head, rows),
        "",
        "Per run (rows added per round = kept; teacher output: generated = candidates, rejected by reason):",
        "",
        C.md_table(detail_head, detail),
        "",
        *notes,
    ]
    return "\n".join(lines)


def comparisons(summary: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Final-accuracy differences of B against each control, paired by seed, and teacher acceptance."""
    out = []
    if "B" not in summary:
        return out
    b_final = {s: per_iteration(r["status"])[-1]["test_accuracy"] for s, r in results["B"].items()}
    for arm in ("A", "C", "D"):
        if arm not in results:
            continue
        diffs = [b_final[s] - per_iteration(r["status"])[-1]["test_accuracy"] for s, r in results[arm].items()
                 if b_final.get(s) is not None and per_iteration(r["status"])[-1]["test_accuracy"] is not None]
        if diffs:
            wins = sum(d > 0 for d in diffs)
            ties = sum(d == 0 for d in diffs)
            out.append(f"- B final - {ARM_NAMES[arm]} final, paired by seed: {fmt(diffs)} "
                       f"(B higher in {wins}, equal in {ties} of {len(diffs)} seeds).")
    if "C" in results:
        matched = rounds = b_total = c_total = 0
        for s, r in results["C"].items():
            b_its, c_its = per_iteration(results["B"][s]["status"]), per_iteration(r["status"])
            for b_it, c_it in zip(b_its[:-1], c_its[:-1]):
                rounds += 1
                matched += c_it["kept"] == b_it["kept"]
                b_total += b_it["kept"]
                c_total += c_it["kept"]
        out.append(f"- Rows added: C matched B's count in {matched} of {rounds} rounds; in all, B added {b_total} "
                   f"rows and C {c_total} (a short round is one where fewer random draws survived the filters; "
                   "D adds C's total).")
    for arm in ("A", "B", "C", "D"):
        if arm not in results:
            continue
        errs: dict[str, int] = {}
        for r in results[arm].values():
            for k, v in final_test_errors(r["status"]["output"]).items():
                errs[k] = errs.get(k, 0) + v
        mix = ", ".join(f"gold {k}: {v}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1])) or "none"
        out.append(f"- {ARM_NAMES[arm]}: wrong test answers at its last iteration, all seeds: {mix}.")
    kinds = test_kinds(next(iter(results["B"].values()))["run_yaml"])
    for arm in ("A", "B", "C", "D"):
        if arm not in results or not kinds:
            continue
        per_kind: dict[str, list[float]] = {}
        for r in results[arm].values():
            for kind, (right, total) in final_kind_accuracy(r["status"]["output"], kinds).items():
                per_kind.setdefault(kind, []).append(right / total)
        mix = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(per_kind.items()))
        out.append(f"- {ARM_NAMES[arm]}: final test accuracy by kind of test row, over the seeds: {mix}.")
    for arm in ("B", "C", "D"):
        if arm not in results:
            continue
        shapes = Counter(shape(row["input"]) for r in results[arm].values() for row in added_rows(r["status"]["output"]))
        if shapes and kinds:
            mix = ", ".join(f"{k} {v}" for k, v in shapes.most_common())
            out.append(f"- {ARM_NAMES[arm]}: shape of the added inputs, all seeds: {mix}.")
    for arm in ("B", "C", "D"):
        if arm not in results:
            continue
        labels: dict[str, int] = {}
        for r in results[arm].values():
            for row in added_rows(r["status"]["output"]):
                key = row["output"] if len(row["output"]) <= 20 else "(long)"
                labels[key] = labels.get(key, 0) + 1
        if labels:
            mix = ", ".join(f"{k} {v}" for k, v in sorted(labels.items(), key=lambda kv: -kv[1]))
            out.append(f"- {ARM_NAMES[arm]}: outputs of the added rows, all seeds: {mix}.")
        gen = sum(it["generated"] for r in results[arm].values() for it in per_iteration(r["status"]))
        kept = sum(it["kept"] for r in results[arm].values() for it in per_iteration(r["status"]))
        fails = sum(it["failures"] for r in results[arm].values() for it in per_iteration(r["status"])[:-1])
        share = f"{kept / gen:.0%}" if gen else "-"
        out.append(f"- {ARM_NAMES[arm]}: {gen} teacher candidates, {kept} kept ({share}) over all seeds and rounds"
                   + (f"; {fails} seed failures in the rounds that asked the teacher." if arm == "B" else "."))
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(name: str, summary: dict[str, Any]) -> Path | None:
    plt = C.pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"A": "tab:gray", "B": "tab:blue", "C": "tab:orange", "D": "tab:green"}
    offsets = {"A": -0.09, "B": -0.03, "C": 0.03, "D": 0.09}  # keep equal points apart
    n_it = max(len(v["per_iteration"]) for v in summary.values())
    for arm in ARMS:
        if arm not in summary:
            continue
        per = [p for p in summary[arm]["per_iteration"] if p["test_accuracy"]]
        ms = [statistics.fmean(p["test_accuracy"]) for p in per]
        lo = [m - min(p["test_accuracy"]) for m, p in zip(ms, per)]
        hi = [max(p["test_accuracy"]) - m for m, p in zip(ms, per)]
        xs = [p["iteration"] + offsets[arm] for p in per]
        style = dict(marker="o", capsize=4, label=ARM_NAMES[arm], color=colors[arm])
        ax1.errorbar(xs, ms, yerr=[lo, hi], **style)
        if arm == "A":  # one training: its level, for reference across the iterations
            ax1.axhline(ms[0], color=colors[arm], ls="--", lw=1)
        rows = [statistics.fmean(p["train_rows"]) for p in per]
        ax2.errorbar(rows, ms, yerr=[lo, hi], **style)
    ax1.set_xticks(range(n_it))
    ax1.set_xlabel("iteration (fixed training steps each)")
    ax1.set_ylabel("test accuracy (mean; bars: min-max over seeds)")
    ax2.set_xlabel("training rows (seed + teacher rows, mean over seeds)")
    ax1.set_title("held-out accuracy per iteration")
    ax2.set_title("held-out accuracy vs training rows")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    return C.save_plot(fig, name)


# --- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A stopped benchmark (SIGTERM) still stops its Ray head and the runs' actors (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmd = ".venv/bin/python -m bench.method " + " ".join(sys.argv[1:] if argv is None else argv)
    arms = [a for a in ARMS if a in args.arms.upper()]
    if ("C" in arms or "A" in arms) and "B" not in arms:
        raise SystemExit("arms A and C need B (A reuses B's iteration 0, C copies B's per-round counts)")
    if "D" in arms and "C" not in arms:
        raise SystemExit("arm D needs C (it generates all of C's rows in round one)")
    base = yaml.safe_load((C.ROOT / args.base).read_text())
    work = Path(args.work)
    (work / args.name).mkdir(parents=True, exist_ok=True)
    log = work / f"{args.name}.runs.log"
    print(f"bench.method: arms {''.join(arms)}, seeds {args.seeds}, work {work}, runner log {log}", flush=True)
    t_start = time.monotonic()
    st = arm_doc(base, args, "B", args.seeds[0])["spec"]["student"]
    heads: list[Any] = []

    def address() -> str:
        """The shared Ray head, started when the first unfinished run needs it (a re-run of a finished
        bench only re-reads the statuses)."""
        if not heads:
            heads.append(start_ray(max(os.cpu_count() or 1, st.get("workers", 1) * st.get("cpusPerWorker", 1) + 2)))
        return heads[0][1]

    try:
        return _run_all(args, base, arms, work, log, address, cmd, t_start)
    finally:
        for head, _ in heads:
            head.stop()


def _run_all(args: argparse.Namespace, base: dict[str, Any], arms: list[str], work: Path, log: Path,
             address: Callable[[], str], cmd: str, t_start: float) -> int:
    results: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
    notes: list[str] = []
    out_root = work / args.name
    for seed in args.seeds:
        b = run_arm(arm_doc(base, args, "B", seed), work, log, address)
        results["B"][seed] = b
        b_name = arm_doc(base, args, "B", seed)["metadata"]["name"]
        b_dir = out_root / b_name
        kept_b = [it.get("kept", 0) for it in b["status"]["iterations"]][: args.iterations - 1] or [0]
        for arm in arms:
            if arm == "B":
                continue
            if arm == "A":
                doc = arm_doc(base, args, "A", seed)
            elif arm == "C":
                doc = arm_doc(base, args, "C", seed, rows_per_round=kept_b)
            else:
                c_its = results["C"][seed]["status"]["iterations"]
                total = sum(it.get("kept", 0) for it in c_its)
                seed_rows = c_its[0]["trainRows"]
                k = max(1, math.ceil(total / max(seed_rows, 1)))
                doc = arm_doc(base, args, "D", seed, rows_per_round=[total], samples_per_failure=k)
            if not args.no_reuse:
                reuse_iteration0(b_dir, out_root / doc["metadata"]["name"])
            results[arm][seed] = run_arm(doc, work, log, address)
    summary = summarize(results, args.iterations)
    base_spec = arm_doc(base, args, "B", args.seeds[0])["spec"]
    st = base_spec["student"]
    settings = {
        "base": args.base,
        "student": f"{st['model']} {st.get('method', 'lora')}",
        "training steps per iteration": st["training"]["steps"],
        "batch size": st["training"].get("batchSize", 8),
        "lr": st["training"].get("lr"),
        "workers": st.get("workers", 1),
        "teacher": f"{base_spec['teacher'].get('kind')} {base_spec['teacher'].get('model')}, "
                   f"samplesPerFailure {base_spec['teacher'].get('samplesPerFailure', 1)}, "
                   f"maxRounds {base_spec['teacher'].get('maxRounds', 3)}, "
                   f"temperature {base_spec['teacher'].get('temperature', 1.0)}, "
                   f"keepLabel {str(base_spec['teacher'].get('keepLabel', False)).lower()}",
        "filters.verify": json.dumps((base_spec.get("filters") or {}).get("verify") or {}, sort_keys=True),
        "seedLimit": base_spec["data"].get("seedLimit", "all"),
        "testLimit": base_spec["data"].get("testLimit", "all"),
        "maxIterations (B, C)": args.iterations,
        "iteration 0 shared from B": not args.no_reuse,
    }
    wall = round(time.monotonic() - t_start, 1)
    run_walls = [r["wall_s"] for by in results.values() for r in by.values() if r["wall_s"] is not None]
    notes.append(f"Run wall time, all runs: {sum(run_walls) / 60:.1f} min ({len(run_walls)} runs timed).")
    notes += ["", "## Measured differences", "", *comparisons(summary, results)]
    if args.notes:
        notes += ["", Path(args.notes).read_text().strip()]
    md = markdown(args, cmd, settings, summary, results, notes)
    payload = {
        "command": cmd, "settings": settings, "seeds": args.seeds, "arms": arms, "summary": summary,
        "runs": {a: {str(s): {"wall_s": r["wall_s"], "run_yaml": r["run_yaml"],
                              "iterations": per_iteration(r["status"])} for s, r in by.items()}
                 for a, by in results.items()},
        "bench_wall_s": wall,
    }
    C.save(args.name, payload, md)
    plot(args.name, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
