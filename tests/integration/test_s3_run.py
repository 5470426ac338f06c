"""`llm2llm run` with spec.output and spec.data on a real S3-compatible server (versitygw, tests/s3server.py):
the whole local loop (private Ray head, one Ray job per iteration, real training, inference, teacher) reads its
inputs from the bucket and commits every stage there, each file once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from llm2llm.storage import MARKER, RunStorage
from llm2llm_jobs import fanout
from tests.conftest import REPO
from tests.integration.tiny import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

# What each committed stage holds besides its marker (one teach shard: teacher.replicas is 1).
STAGE_FILES = {
    "prepare": set(),
    "infer": {"predictions.parquet"},
    "score": {"scored.parquet"},
    "teach": {"shard-0.json", "shard-0.parquet", "generated.parquet"},
    "filter": {"kept.parquet", "rejected.parquet"},
    "merge": {"train.parquet"},
}


def test_local_run_on_s3(s3, tmp_path):
    prefix = f"s3://{s3.bucket}/run-{uuid.uuid4().hex[:8]}"
    store = RunStorage(f"{prefix}/runs", "ons3")
    # The inputs live in the bucket too.
    for name in ("seed", "test"):
        store.fs.put_file(str(REPO / f"examples/demo/{name}.jsonl"), f"{prefix}/inputs/{name}.jsonl"[5:])
    spec = tiny_spec(f"{prefix}/runs")
    spec["data"].update(seed=f"{prefix}/inputs/seed.jsonl", test=f"{prefix}/inputs/test.jsonl")
    spec["ray"] = {"launcher": "local"}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"apiVersion": "llm2llm.io/v1alpha1", "kind": "AugmentationRun",
                                        "metadata": {"name": "ons3"}, "spec": spec}))
    cli = Path(sys.executable).with_name("llm2llm")
    out = subprocess.run([str(cli), "run", str(run_yaml)], cwd=REPO, capture_output=True, text=True, timeout=1100)
    log = out.stdout[-5000:] + out.stderr[-5000:]
    assert out.returncode == 0, log
    assert s3.secret_key not in out.stdout + out.stderr

    status = store.read_json(store.path("status.json"))
    assert status["phase"] == "Succeeded", log
    iterations = status["iterations"]
    assert iterations and all(it["trainSteps"] == 2 for it in iterations)
    assert s3.secret_key not in json.dumps(status)

    store.fs.invalidate_cache()
    keys = sorted(p[len(store.root) + 1:] for p in store.fs.find(store.root))
    print("\n".join(["objects under the run:", *keys]))
    top = {k for k in keys if not k.startswith("iter-")}
    assert top == {"run.json", "status.json", "data/seed.parquet", "data/test.parquet"}, keys
    assert {k.split("/")[0] for k in keys if k.startswith("iter-")} == {f"iter-{i}" for i in range(len(iterations))}
    for i, it in enumerate(iterations):
        mine = [k[len(f"iter-{i}/"):] for k in keys if k.startswith(f"iter-{i}/")]
        assert len(mine) == len(set(mine))
        done = store.stage_done(i, "train")
        model_dir = done["model_dir"]
        assert re.fullmatch(r"model-a\d+", model_dir), done
        model = {k[len(f"train/{model_dir}/"):] for k in mine if k.startswith(f"train/{model_dir}/")}
        # One flat copy of the model: no nested folder, no second attempt's prefix, no Ray Train leftovers.
        assert model >= {"config.json", "model.safetensors", "train_result.json"} and all("/" not in f for f in model)
        stages = {s for s in STAGE_FILES if f"{s}/{MARKER}" in mine}
        assert {"prepare", "infer", "score"} <= stages
        expected = {"_ITERATION.json", f"train/{MARKER}", *(f"train/{model_dir}/{f}" for f in model)}
        expected |= {f"{s}/{f}" for s in stages for f in (*STAGE_FILES[s], MARKER)}
        assert set(mine) == expected, sorted(set(mine) ^ expected)
        # The committed model is the one infer used, and it loads.
        with fanout.local_copy(store.trained_model(i)) as local:
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(local)

    shown = subprocess.run([str(cli), "status", store.uri()], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "Succeeded" in shown.stdout
    store.delete_all()
    assert not store.exists(store.root)
