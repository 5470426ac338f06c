"""Iteration overhead and the demo's total wall time, read from a real demo run's status and stage markers.

    .venv/bin/python -m bench.iteration_overhead                 # analyse runs/demo/status.json
    .venv/bin/python -m bench.iteration_overhead --status PATH   # another run's status.json
    .venv/bin/python -m bench.iteration_overhead --run           # run the demo now (tmp output), then analyse

Overhead = iteration wall time - (train + infer + teach stage seconds). The iteration's wall time is the
runner's view: job submitted -> job seen finished (``status.jobs[]``; for the run's last job, which the
runner stops watching once the iteration is committed, up to the run's ``finishedAt``). It splits into:
- submit -> start: Ray job submission, job supervisor, driver process start, imports, ray.init, up to the
  iteration's ``startedAt`` (written by the job itself);
- the other stages (prepare, score, filter, merge) and in-job time outside any stage (markers, reads);
- end -> observed: job exit and the runner's poll.
Timestamps are whole seconds, so each figure is +-1 s. Stage seconds themselves contain fixed start-up
(Ray Train and DeepSpeed, engine load) that a stricter definition would also call overhead: the table
shows the training loop's own seconds next to the train stage's.

``--run`` starts ``llm2llm run examples/demo/run.yaml`` (the same LocalRunner, in this process) with its
output in a temp dir, only when the 1-minute load is below ``--max-load`` (default 2.5; ``--wait`` seconds
for it to drop, ``--force`` to run anyway), samples the load while it runs, and also reads each job's
start/end from the Ray Jobs API. Goal: overhead <= 10% of the iteration and <= 30 s.
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

GOAL_SHARE = 0.10
GOAL_SECONDS = 30.0
COMPUTE = ("train", "infer", "teach")
OTHER = ("prepare", "score", "filter", "merge")
DEMO = C.ROOT / "examples" / "demo" / "run.yaml"


def _ts(s: str | None) -> float | None:
    return None if not s else datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


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
        compute = sum(sec.get(s, 0.0) for s in COMPUTE)
        other = sum(sec.get(s, 0.0) for s in OTHER)
        in_job = committed - started
        row = {
            "iteration": i, "wall_s": round(wall, 1), "compute_s": round(compute, 1),
            "stages": {s: sec[s] for s in (*COMPUTE, *OTHER) if s in sec},
            "overhead_s": round(wall - compute, 1), "overhead_share": round((wall - compute) / wall, 3),
            "submit_to_start_s": round(started - submitted, 1), "other_stages_s": round(other, 1),
            "in_job_outside_stages_s": round(in_job - compute - other, 1),
            "end_to_observed_s": round(end_seen - committed, 1), "end_note": end_note,
        }
        if run_dir is not None:
            marker = run_dir / f"iter-{i}" / "train" / "_DONE.json"
            if marker.is_file():
                m = json.loads(marker.read_text())
                row["train_loop_s"] = round(m.get("train_seconds", 0.0), 1)
                row["train_startup_s"] = round(m.get("seconds", 0.0) - m.get("train_seconds", 0.0), 1)
        if ray_jobs and job.get("name") in ray_jobs:
            rj = ray_jobs[job["name"]]
            row["ray_job_start_to_end_s"] = rj.get("seconds")
        row["met"] = row["overhead_share"] <= GOAL_SHARE and row["overhead_s"] <= GOAL_SECONDS
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


def run_demo(out_dir: Path) -> tuple[dict, dict, Path, float]:
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


def report(res: dict) -> str:
    a = res["analysis"]
    rows = []
    for it in a["iterations"]:
        st = it["stages"]
        rows.append([it["iteration"], f"{it['wall_s']:.0f}", f"{st.get('train', 0):.0f}"
                     + (f" (loop {it['train_loop_s']:.0f})" if "train_loop_s" in it else ""),
                     f"{st.get('infer', 0):.0f}", f"{st.get('teach', 0):.0f}",
                     f"**{it['overhead_s']:.0f} ({100 * it['overhead_share']:.1f}%)**", f"{it['submit_to_start_s']:.0f}",
                     f"{it['other_stages_s']:.1f}", f"{it['in_job_outside_stages_s']:.1f}", f"{it['end_to_observed_s']:.0f}",
                     "met" if it["met"] else "MISSED"])
    worst = max(a["iterations"], key=lambda it: it["overhead_share"])
    met = all(it["met"] for it in a["iterations"])
    lines = [
        f"Source: {res['source']}. Load while the demo ran: {res['load_during']}.",
        "",
        C.md_table(["iter", "wall s", "train s", "infer s", "teach s", "overhead s (share)", "submit->start s",
                    "other stages s", "in-job outside stages s", "end->observed s", "goal"], rows),
        "",
        f"Goal: overhead <= {100 * GOAL_SHARE:.0f}% of the iteration and <= {GOAL_SECONDS:.0f}s: "
        f"{'met' if met else 'MISSED'} (worst: iteration {worst['iteration']}, {worst['overhead_s']:.0f}s = "
        f"{100 * worst['overhead_share']:.1f}%). Timestamps are whole seconds (+-1 s per figure).",
        "",
        f"**Demo total wall time: {a['demo_wall_s']:.0f}s ({a['demo_wall_s'] / 60:.1f} min)**, {len(a['iterations'])} "
        f"iterations, phase {a['phase']} ({a['stop_reason']}); {a['started_at']} -> {a['finished_at']}.",
    ]
    if res.get("runner_wall_s"):
        lines.append(f"Runner wall time in this process, Ray start included: {res['runner_wall_s']:.0f}s.")
    if any("train_startup_s" in it for it in a["iterations"]):
        su = [it["train_startup_s"] for it in a["iterations"] if "train_startup_s" in it]
        lines.append(f"Inside the train stage, start-up (Ray Train + DeepSpeed) vs the optimisation loop: "
                     f"{', '.join(f'{s:.0f}s' for s in su)} of start-up per iteration; counted as compute above.")
    return "\n".join(lines)


def plot(res: dict) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    its = res["analysis"]["iterations"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    parts = [("train", lambda it: it["stages"].get("train", 0)), ("infer", lambda it: it["stages"].get("infer", 0)),
             ("teach", lambda it: it["stages"].get("teach", 0)), ("submit->start", lambda it: it["submit_to_start_s"]),
             ("other stages + in-job", lambda it: it["other_stages_s"] + it["in_job_outside_stages_s"]),
             ("end->observed", lambda it: it["end_to_observed_s"])]
    left = [0.0] * len(its)
    for name, f in parts:
        vals = [max(f(it), 0) for it in its]
        ax.barh([f"iter {it['iteration']}" for it in its], vals, left=left, label=name)
        left = [x + v for x, v in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"Demo iterations: wall vs compute (demo total {res['analysis']['demo_wall_s']:.0f}s)", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    C.save_plot(fig, "iteration_overhead")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.iteration_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--status", default=str(C.ROOT / "runs" / "demo" / "status.json"))
    p.add_argument("--run", action="store_true", help="run the demo now (output in a temp dir)")
    p.add_argument("--max-load", type=float, default=2.5)
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for the load to drop")
    p.add_argument("--force", action="store_true", help="run even when the machine is busy")
    p.add_argument("--keep", action="store_true", help="keep the temp run folder")
    p.add_argument("--load-note", help="what the load was while an earlier run (--status) ran, for the report")
    args = p.parse_args(argv)
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
            status, ray_jobs, run_dir, wall = run_demo(tmp / "runs")
        finally:
            res["load_during"] = sampler.stop()
        res.update(source=f"fresh demo run ({DEMO.relative_to(C.ROOT)}), output in a temp dir", runner_wall_s=round(wall, 1),
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
    res["goals"] = {"overhead_share": GOAL_SHARE, "overhead_seconds": GOAL_SECONDS}
    C.save("iteration_overhead", res, report(res))
    plot(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
