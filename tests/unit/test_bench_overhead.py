"""bench/iteration_overhead.py's arithmetic: fixed cost = iteration wall time - time inside optimiser steps and
generate calls, per stage, from a status and the stage markers as the job writes them."""

from __future__ import annotations

import json

from bench import iteration_overhead as io


def _write(run_dir, i, stage, marker):
    path = run_dir / f"iter-{i}" / stage / "_DONE.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(marker))


def _status():
    return {
        "phase": "Succeeded", "stopReason": "MaxIterations",
        "startedAt": "2026-12-01T10:00:00Z", "finishedAt": "2026-12-01T10:02:00Z",
        "jobs": [{"name": "j0", "iteration": 0, "state": "Succeeded", "submittedAt": "2026-12-01T10:00:00Z",
                  "finishedAt": "2026-12-01T10:01:40Z"}],
        "iterations": [{"index": 0, "startedAt": "2026-12-01T10:00:05Z", "finishedAt": "2026-12-01T10:01:38Z",
                        "seconds": {"prepare": 0.5, "train": 50.0, "infer": 20.0, "score": 0.5, "teach": 21.0,
                                    "filter": 0.5, "merge": 0.5}}],
    }


def test_fixed_cost_is_wall_minus_steps_and_generate_calls(tmp_path):
    _write(tmp_path, 0, "train", {"seconds": 50.0, "train_seconds": 6.0, "setup_seconds": 30.0})
    _write(tmp_path, 0, "infer", {"seconds": 20.0, "generate_seconds": 4.0, "engine_seconds": 12.0})
    _write(tmp_path, 0, "teach", {"seconds": 21.0, "generate_seconds": 10.0, "engine_seconds": 9.0})
    it = io.analyse(_status(), None, tmp_path)["iterations"][0]
    assert it["wall_s"] == 100.0
    assert it["compute_s"] == 20.0 and it["overhead_s"] == 80.0 and it["overhead_share"] == 0.8
    assert not it["met"]
    assert it["stages"]["train"] == {"seconds": 50.0, "compute_s": 6.0, "fixed_s": 44.0, "startup_s": 30.0,
                                     "other_fixed_s": 14.0}
    assert it["stages"]["infer"]["fixed_s"] == 16.0 and it["stages"]["infer"]["other_fixed_s"] == 4.0
    assert it["outside_stages_s"] == 9.0  # the old metric: wall - the three stages' seconds
    assert it["submit_to_start_s"] == 5.0 and it["end_to_observed_s"] == 2.0
    md = io.report({"analysis": io.analyse(_status(), None, tmp_path), "source": "test", "load_during": "n/a"})
    assert "**80.0 (80%)**" in md and "MISSED" in md


def test_markers_from_before_the_clocks_give_no_figure(tmp_path):
    _write(tmp_path, 0, "train", {"seconds": 50.0, "train_seconds": 6.0})
    _write(tmp_path, 0, "infer", {"seconds": 20.0})  # no generate_seconds: not guessed from the stage's seconds
    it = io.analyse(_status(), None, tmp_path)["iterations"][0]
    assert it["compute_s"] is None and it["overhead_s"] is None and not it["met"]
    md = io.report({"analysis": io.analyse(_status(), None, tmp_path), "source": "test", "load_during": "n/a"})
    assert "not measurable" in md
