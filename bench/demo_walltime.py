"""The demo's total wall time (the figures come from bench/iteration_overhead.py's analysis).

    .venv/bin/python -m bench.demo_walltime            # runs/reviews/status.json (make demo)
    .venv/bin/python -m bench.demo_walltime --run      # run the demo now (when quiet), then report

Total = the run's ``finishedAt - startedAt`` in status.json (runner start to the last iteration's commit),
with each iteration's share. ``--run`` and its options are those of bench.iteration_overhead.
"""

from __future__ import annotations

import json
import sys

from bench import _common as C
from bench import iteration_overhead as io

GOAL_S = 240.0


def main(argv: list[str] | None = None) -> int:
    rc = io.main(argv)
    if rc != 0:
        return rc
    # The analysis io.main just wrote.
    res = json.loads((C.RESULTS / f"{io.results_name(io.parser().parse_args(argv))}.json").read_text())
    a = res["analysis"]
    def num(x):
        return "n/a" if x is None else f"{x:.0f}"

    rows = [[it["iteration"], f"{it['wall_s']:.0f}", num(it["compute_s"]), num(it["overhead_s"])]
            for it in a["iterations"]]
    md = "\n".join([
        f"Source: {res['source']}; load while it ran: {res['load_during']}.",
        "",
        C.md_table(["iteration", "wall s", "compute s (optimiser steps + generate calls)", "fixed cost s"], rows),
        "",
        f"**Demo total wall time: {a['demo_wall_s']:.0f}s ({a['demo_wall_s'] / 60:.1f} min)**, phase {a['phase']} "
        f"({a['stop_reason']}), {a['started_at']} -> {a['finished_at']}. Goal (issue 14): <= {GOAL_S / 60:.0f} min: "
        f"{'met' if a['demo_wall_s'] <= GOAL_S else 'MISSED'}.",
    ])
    C.save("demo_walltime", {"source": res["source"], "load_during": res["load_during"],
                             "demo_wall_s": a["demo_wall_s"], "iterations": a["iterations"]}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
