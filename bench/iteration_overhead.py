"""The fixed cost of an iteration, per stage, read from a real demo run's status and stage markers.

    .venv/bin/python -m bench.iteration_overhead                 # analyse runs/reviews/status.json
    .venv/bin/python -m bench.iteration_overhead --status PATH   # another run's status.json
    .venv/bin/python -m bench.iteration_overhead --run           # run the demo now (tmp output), then analyse

Compute = the time inside optimiser steps (the train stage's optimisation loop, ``train_seconds`` in its
marker) and inside generate calls (``generate_seconds`` of the infer and teach markers: the union of their
replicas' time inside generate/complete calls, see ``llm2llm_jobs.clock``). Fixed cost = the iteration's wall
time - compute: everything a run pays whatever its data, reported per stage:
- train: Ray Train's worker group start, the workers' imports, model load, tokenising and DeepSpeed
  initialize (``setup_seconds``, rank 0), then saving and handing the checkpoint over;
- infer and teach: the engine start (``engine_seconds``: vLLM or HF model load), the Ray task and its worker
  process, reading and writing the stage's tables;
- prepare, score, filter, merge: all of it;
- the job: submit -> start (Ray job submission, driver start, imports, ray.init, up to the iteration's
  ``startedAt``), in-job time outside any stage (markers, reads), end -> observed (job exit, the runner's poll).
The iteration's wall time is the runner's view: job submitted -> job seen finished (``status.jobs[]``; for the
run's last job, which the runner stops watching once the iteration is committed, up to the run's
``finishedAt``). Those timestamps are whole seconds (+-1 s); the stage figures are monotonic milliseconds.

The earlier figure of this bench, "overhead" = wall - (train + infer + teach stage seconds), counted every
stage's start-up as compute; it is kept as a column (``outside_stages_s``) for comparison.

``--run`` starts ``llm2llm run examples/reviews/run.yaml`` (what ``make demo`` runs) (the same LocalRunner, in this process) with its
output in a temp dir, only when the 1-minute load is below ``--max-load`` (default 2.5; ``--wait`` seconds
for it to drop, ``--force`` to run anyway), samples the load while it runs, and also reads each job's
start/end from the Ray Jobs API. Goal (issue 14): fixed cost <= 25% of the iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from bench import _common as C

GOAL_SHARE = 0.25
COMPUTE = ("train", "infer", "teach")
OTHER = ("prepare", "score", "filter", "merge")
DEMO = C.ROOT / "examples" / "reviews" / "run.yaml"  # what `make demo` runs


def _ts(s: str | None) -> float | None:
    return None if not s else datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _marker(run_dir: Path | None, i: int, stage: str) -> dict:
    if run_dir is None:
        return {}
    path = run_dir / f"iter-{i}" / stage / "_DONE.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_split(stage: str, seconds: float, marker: dict) -> dict:
    """One compute stage's seconds as compute, its start-up (worker setup or engine start) and the rest; compute
    is None when the marker predates the stage clocks."""
    inner_key, startup_key = ("train_seconds", "setup_seconds") if stage == "train" else \
        ("generate_seconds", "engine_seconds")
    inner = marker.get(inner_key)
    row = {"seconds": round(seconds, 1), "compute_s": None if inner is None else round(inner, 1),
           "startup_s": None, "other_fixed_s": None}
    if inner is not None:
        startup = float(marker.get(startup_key) or 0.0)
        row.update(fixed_s=round(seconds - inner, 1), startup_s=round(startup, 1),
                   other_fixed_s=round(seconds - inner - startup, 1))
    return row


def analyse(status: dict, ray_jobs: dict | None = None, run_dir: Path | None = None) -> dict:
    jobs = {j["iteration"]: j for j in status.get("jobs", []) if j.get("state") != "Failed"}
    its = []
    for it in status["iterations"]:
        i = it["index"]
        job = jobs.get(i, {})
        sec = it.get("seconds", {})
        submitted = _ts(job.get("submittedAt"))
        end_seen = _ts(job.get("finishedAt"))
        end_note = "job seen finished"
        if end_seen is None:
            end_seen, end_note = _ts(status.get("finishedAt")), "run finishedAt (runner stopped watching)"
        started, committed = _ts(it.get("startedAt")), _ts(it.get("finishedAt"))
        wall = end_seen - submitted
        staged = sum(sec.get(s, 0.0) for s in COMPUTE)
        other = sum(sec.get(s, 0.0) for s in OTHER)
        in_job = committed - started
        stages = {s: stage_split(s, sec[s], _marker(run_dir, i, s)) for s in COMPUTE if s in sec}
        known = all(st["compute_s"] is not None for st in stages.values())
        compute = sum(st["compute_s"] for st in stages.values()) if known else None
        row = {
            "iteration": i, "wall_s": round(wall, 1), "stages": stages,
            "other_stages": {s: sec[s] for s in OTHER if s in sec},
            "compute_s": None if compute is None else round(compute, 1),
            "overhead_s": None if compute is None else round(wall - compute, 1),
            "overhead_share": None if compute is None else round((wall - compute) / wall, 3),
            "submit_to_start_s": round(started - submitted, 1), "other_stages_s": round(other, 1),
            "in_job_outside_stages_s": round(in_job - staged - other, 1),
            "end_to_observed_s": round(end_seen - committed, 1), "end_note": end_note,
            "outside_stages_s": round(wall - staged, 1),
        }
        if ray_jobs and job.get("name") in ray_jobs:
            row["ray_job_start_to_end_s"] = ray_jobs[job["name"]].get("seconds")
        row["met"] = row["overhead_share"] is not None and row["overhead_share"] <= GOAL_SHARE
        its.append(row)
    run_wall = _ts(status["finishedAt"]) - _ts(status["startedAt"]) if status.get("finishedAt") else None
    return {"phase": status.get("phase"), "stop_reason": status.get("stopReason"), "iterations": its,
            "demo_wall_s": round(run_wall, 1) if run_wall else None,
            "started_at": status.get("startedAt"), "finished_at": status.get("finishedAt")}


class LoadSampler(threading.Thread):
    def __init__(self, every: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self._halt = every, [], threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(C.loadavg()[0])
            self._halt.wait(self.every)

    def stop(self) -> dict:
        self._halt.set()
        s = self.samples or [C.loadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "max": round(max(s), 2), "samples": len(s)}


def run_demo(out_dir: Path, keep_warm: bool = True) -> tuple[dict, dict, Path, float]:
    """The demo through the same LocalRunner `llm2llm run` uses, output under ``out_dir``."""
    import yaml

    from llm2llm.cli import _check_data
    from llm2llm.jobsapi import JobsApiLauncher
    from llm2llm.localray import LocalRayHead
    from llm2llm.runner import LocalRunner, format_table, local_cpus
    from llm2llm.spec import load_run

    doc = yaml.safe_load(DEMO.read_text())
    for key in ("seed", "test"):
        doc["spec"]["data"][key] = str((C.ROOT / doc["spec"]["data"][key]).resolve())
    doc["spec"]["output"] = str(out_dir)
    if not keep_warm:  # the A/B's other arm: every iteration starts its engines and trainers afresh
        doc["spec"].setdefault("ray", {})["keepWarm"] = False
    path = out_dir / "run.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    run = load_run(str(path))
    problems = _check_data(run)
    if problems:
        raise RuntimeError(problems)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The head `llm2llm run` would start, held open here so the jobs' records can be read after the run.
    with LocalRayHead(local_cpus(run.spec)) as address:
        runner = LocalRunner(run, address=address)
        t0 = time.monotonic()
        status = runner.execute()
        wall = time.monotonic() - t0
        print(format_table(status), flush=True)
        ray_jobs = {}
        client = JobsApiLauncher(address).client
        for job in status.jobs:
            try:
                info = client.get_job_info(job.name)
                ray_jobs[job.name] = {"start_time_ms": info.start_time, "end_time_ms": info.end_time,
                                      "seconds": round((info.end_time - info.start_time) / 1000, 2)
                                      if info.end_time and info.start_time else None}
            except Exception as err:  # the figures from status.json stand on their own
                ray_jobs[job.name] = {"error": str(err)}
    return status.wire(), ray_jobs, out_dir / run.metadata.name, wall


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def report(res: dict) -> str:
    a = res["analysis"]
    its = a["iterations"]
    rows = []
    for it in its:
        st = it["stages"]
        share = "n/a" if it["overhead_share"] is None else f"{100 * it['overhead_share']:.0f}%"
        rows.append([it["iteration"], f"{it['wall_s']:.0f}",
                     " + ".join(_f(st[s]["compute_s"]) if s in st else "0" for s in COMPUTE) + f" = {_f(it['compute_s'])}",
                     f"**{_f(it['overhead_s'])} ({share})**", f"{it['outside_stages_s']:.0f}",
                     "met" if it["met"] else "MISSED"])
    per_stage = []
    for it in its:
        for s, st in it["stages"].items():
            per_stage.append([it["iteration"], s, _f(st["seconds"]), _f(st["compute_s"]), _f(st.get("fixed_s")),
                              _f(st["startup_s"]), _f(st["other_fixed_s"])])
        per_stage.append([it["iteration"], "prepare+score+filter+merge", _f(it["other_stages_s"]), "0",
                          _f(it["other_stages_s"]), "", ""])
        per_stage.append([it["iteration"], "job: submit->start, outside stages, end->observed",
                          _f(it["submit_to_start_s"] + it["in_job_outside_stages_s"] + it["end_to_observed_s"]), "0",
                          _f(it["submit_to_start_s"] + it["in_job_outside_stages_s"] + it["end_to_observed_s"]),
                          f"{it['submit_to_start_s']:.0f} + {it['in_job_outside_stages_s']:.1f} + "
                          f"{it['end_to_observed_s']:.0f}", ""])
    known = [it for it in its if it["overhead_share"] is not None]
    lines = [
        f"Source: {res['source']}. Load while the demo ran: {res['load_during']}.",
        "",
        "Compute = time inside optimiser steps (train) and inside generate calls (infer, teach); fixed cost = "
        "iteration wall time - compute. \"old\" = the earlier metric, wall - (train + infer + teach stage seconds).",
        "",
        C.md_table(["iter", "wall s", "compute s (train + infer + teach)", "fixed cost s (share)", "old s", "goal"],
                   rows),
        "",
        "Per stage (startup: train = rank 0's worker setup (imports, model load, tokenising, DeepSpeed init); "
        "infer/teach = engine start):",
        "",
        C.md_table(["iter", "stage", "stage s", "compute s", "fixed s", "of which startup s", "other fixed s"],
                   per_stage),
        "",
    ]
    if known:
        worst = max(known, key=lambda it: it["overhead_share"])
        total_wall = sum(it["wall_s"] for it in known)
        total_fixed = sum(it["overhead_s"] for it in known)
        lines.append(f"Goal: fixed cost <= {100 * GOAL_SHARE:.0f}% of the iteration: "
                     f"{'met' if all(it['met'] for it in known) else 'MISSED'} (worst: iteration {worst['iteration']}, "
                     f"{worst['overhead_s']:.0f} s = {100 * worst['overhead_share']:.0f}%; all iterations: "
                     f"{total_fixed:.0f} of {total_wall:.0f} s = {100 * total_fixed / total_wall:.0f}%).")
    else:
        lines.append("Goal: not measurable from this run: its markers predate the stage clocks.")
    lines += [
        "",
        f"**Demo total wall time: {a['demo_wall_s']:.0f}s ({a['demo_wall_s'] / 60:.1f} min)**, {len(its)} "
        f"iterations, phase {a['phase']} ({a['stop_reason']}); {a['started_at']} -> {a['finished_at']}.",
    ]
    if res.get("runner_wall_s"):
        lines.append(f"Runner wall time in this process, Ray start included: {res['runner_wall_s']:.0f}s.")
    return "\n".join(lines)


def plot(res: dict) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    its = [it for it in res["analysis"]["iterations"] if it["compute_s"] is not None]
    if not its:
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    parts = [(f"{s} compute", lambda it, s=s: (it["stages"].get(s) or {}).get("compute_s") or 0) for s in COMPUTE]
    parts += [(f"{s} fixed", lambda it, s=s: (it["stages"].get(s) or {}).get("fixed_s") or 0) for s in COMPUTE]
    parts += [("other stages + job", lambda it: it["other_stages_s"] + it["submit_to_start_s"]
               + it["in_job_outside_stages_s"] + it["end_to_observed_s"])]
    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#aec7e8", "#98df8a", "#c5b0d5", "#bbbbbb"]
    left = [0.0] * len(its)
    for (name, f), color in zip(parts, colors):
        vals = [max(f(it), 0) for it in its]
        ax.barh([f"iter {it['iteration']}" for it in its], vals, left=left, label=name, color=color)
        left = [x + v for x, v in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"Demo iterations: compute (dark) vs fixed cost (light); demo total "
                 f"{res['analysis']['demo_wall_s']:.0f}s", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    C.save_plot(fig, "iteration_overhead")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.iteration_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--status", default=str(C.ROOT / "runs" / "reviews" / "status.json"))
    p.add_argument("--run", action="store_true", help="run the demo now (output in a temp dir)")
    p.add_argument("--max-load", type=float, default=2.5)
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for the load to drop")
    p.add_argument("--force", action="store_true", help="run even when the machine is busy")
    p.add_argument("--keep", action="store_true", help="keep the temp run folder")
    p.add_argument("--cold", action="store_true",
                   help="spec.ray.keepWarm false (nothing kept warm across iterations); results as iteration_overhead_cold")
    p.add_argument("--load-note", help="what the load was while an earlier run (--status) ran, for the report")
    p.add_argument("--name", default=None, help="results name (default iteration_overhead, or iteration_overhead_cold "
                   "with --cold); e.g. iteration_overhead_1p5b for a --status run with the 1.5B teacher")
    return p


def results_name(args: argparse.Namespace) -> str:
    """The results file (bench/results/<name>.*) these arguments write."""
    return args.name or ("iteration_overhead_cold" if args.cold else "iteration_overhead")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    status_path = Path(args.status)
    if not args.run and not status_path.is_file():
        print(f"{status_path} does not exist: running the demo (--run)", flush=True)
        args.run = True
    res: dict = {}
    if args.run:
        load = C.wait_quiet(args.max_load, args.wait)
        if load >= args.max_load and not args.force:
            print(f"machine busy (1-min load {load:.2f} >= {args.max_load}): not running the demo now. The bench is "
                  "ready: rerun when quiet, or pass --force.", flush=True)
            return 3
        tmp = Path(tempfile.mkdtemp(prefix="bench-demo-"))
        sampler = LoadSampler()
        sampler.start()
        try:
            status, ray_jobs, run_dir, wall = run_demo(tmp / "runs", keep_warm=not args.cold)
        finally:
            res["load_during"] = sampler.stop()
        res.update(source=f"fresh demo run ({DEMO.relative_to(C.ROOT)}{', spec.ray.keepWarm false' if args.cold else ''}), "
                          "output in a temp dir", runner_wall_s=round(wall, 1),
                   ray_jobs=ray_jobs)
        res["analysis"] = analyse(status, ray_jobs, run_dir)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        status = json.loads(status_path.read_text())
        if status.get("phase") not in ("Succeeded", "Failed"):
            print(f"{status_path}: the run is still {status.get('phase')}; analysing what is there", flush=True)
        res.update(source=str(status_path.relative_to(C.ROOT) if status_path.is_relative_to(C.ROOT) else status_path),
                   load_during=args.load_note or "not recorded (an earlier run: pass --load-note)")
        res["analysis"] = analyse(status, None, status_path.parent)
    res["goals"] = {"fixed_share": GOAL_SHARE}
    name = results_name(args)
    C.save(name, res, report(res))
    if name == "iteration_overhead":
        plot(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
