"""Warm engines (llm2llm_jobs.engines): the demo's three iterations on a Ray head of the test's own, each
iteration its own Ray job. The student's base-model engine, which loads each iteration's LoRA adapter, and the
teacher (the same SmolLM2 weights, so the same engine) start once for the whole run, while iteration 0 trains,
and are gone once it ends, while the Ray cluster itself stays up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

import pytest
import yaml

from llm2llm.localray import LocalRayHead
from llm2llm.runner import LocalRunner
from llm2llm.spec import parse_run
from llm2llm.storage import RunStorage
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

LIST_ENGINES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps(sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a.get("namespace") == "llm2llm-engines")))
"""


def test_engines_start_once_for_three_iterations_and_go_with_the_run(tmp_path):
    doc = yaml.safe_load((REPO / "examples" / "demo" / "run.yaml").read_text())
    doc["spec"]["output"] = str(tmp_path / "runs")
    doc["spec"]["loop"] = {"maxIterations": 3, "stopWhen": {"noFailures": False}}
    # SmolLM2 for both roles, whatever teacher the demo names: one model, so the engines could be one.
    doc["spec"]["teacher"].update(kind="vllm", model="smollm2-135m")
    doc["spec"]["data"].update(seed=str(REPO / "examples/demo/seed.jsonl"), test=str(REPO / "examples/demo/test.jsonl"))
    run = parse_run(doc)
    head = LocalRayHead(4)
    address = head.start()
    try:
        status = LocalRunner(run, address=address, poll_seconds=1.0, echo=lambda line: None).execute()
        assert status.phase == "Succeeded" and len(status.iterations) == 3, status.wire()
        store = RunStorage(str(tmp_path / "runs"), run.metadata.name)
        infer = [store.stage_done(i, "infer") for i in range(3)]
        teach = [store.stage_done(i, "teach") for i in range(2)]  # the last iteration teaches nothing
        # One engine per role for the whole run: the same process, made once by the first stage that needed it.
        # (Teacher and student are both SmolLM2 here; they share one engine when they decode in one dtype, and
        # get two where the teacher runs in bf16, natively computed, and failure inference in float32.)
        for stages in (infer, teach):
            seen = [e for m in stages for e in m["engines"]]
            assert len({(e["name"], e["pid"], e["created_at"]) for e in seen}) == 1, json.dumps(seen, indent=1)
        shared = infer[0]["engines"][0]["name"] == teach[0]["engines"][0]["name"]
        assert [e["reused"] for e in infer[0]["engines"]] == [False]
        assert [e["reused"] for e in teach[0]["engines"]] == [shared]
        assert all(e["reused"] for m in infer[1:] + teach[1:] for e in m["engines"])
        assert all(m["engine_seconds"] == 0 for m in infer[1:] + teach[1:])
        # Iteration 0 started its engines before it trained: they loaded while the student trained, and the
        # stages waited only for what was left of the load.
        trained = datetime.fromisoformat(store.stage_done(0, "train")["finished_at"].replace("Z", "+00:00"))
        for e in infer[0]["engines"] + teach[0]["engines"]:
            assert e["started_at"] < trained.timestamp(), (e, trained)
        first = infer[0]["engines"][0]
        assert first["prestarted"] and infer[0]["engine_seconds"] == first["waited_seconds"]
        assert all(m["backend"] == "vllm" for m in infer)
        # Each iteration's adapter was loaded, not iteration 0's over and over: predictions are the student's.
        assert all(it.seed_accuracy is not None for it in status.iterations)
        # The run is over: its engine is gone from the cluster, which is still up.
        left = subprocess.run([sys.executable, "-c", LIST_ENGINES, head.gcs_address], capture_output=True, text=True,
                              timeout=120)
        assert left.returncode == 0, left.stderr[-2000:]
        assert json.loads(left.stdout.strip().splitlines()[-1]) == []
    finally:
        head.stop()
