"""Warm training workers (llm2llm_jobs.trainers) on a real local Ray: two fits of the tiny model with LoRA over
2 ranks (DeepSpeed ZeRO-2, gloo) reuse one group of processes, the second without their start-up; a lost rank
takes the group down and the next fit builds a new one; what comes back is a PEFT adapter that loads."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from llm2llm.spec import StudentSpec
from llm2llm_jobs.train import TrainConfig, run_train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RUN = "warm-trainers-test"


def _rows(n: int = 12) -> pa.Table:
    return pa.table({"prompt": [f"Review: item {i} was {'good' if i % 2 else 'bad'}\nSentiment:" for i in range(n)],
                     "target": [" positive" if i % 2 else " negative" for i in range(n)]})


def _cfg(tmp_path, name: str) -> TrainConfig:
    student = StudentSpec.model_validate({
        "model": "tiny-llama", "method": "lora", "workers": 2, "deepspeed": {"zeroStage": 2},
        "training": {"steps": 2, "batchSize": 4, "microBatchSize": 2, "maxLength": 32, "precision": "fp32"}})
    return TrainConfig.from_spec(student, str(tmp_path / name), str(tmp_path / "ray-storage"))


def test_two_fits_share_one_group_and_a_lost_rank_is_replaced(ray_local, tmp_path):
    import ray
    from peft import PeftConfig

    from llm2llm_jobs import engines, trainers

    first = run_train(_cfg(tmp_path, "a"), _rows(), warm_run=RUN)
    second = run_train(_cfg(tmp_path, "b"), _rows(16), warm_run=RUN)
    assert [t["reused"] for t in first.trainers] == [False, False]
    assert [t["reused"] for t in second.trainers] == [True, True]
    assert [t["pid"] for t in first.trainers] == [t["pid"] for t in second.trainers]
    # The second fit did not import, rendezvous or load the base model again.
    assert second.seconds < first.seconds and second.setup_seconds < first.setup_seconds, (first, second)
    for name in ("a", "b"):
        out = tmp_path / name
        assert PeftConfig.from_pretrained(str(out)).r == 8
        assert json.loads((out / "train_result.json").read_text())["steps"] == 2
    print(f"\nwarm trainers: first fit {first.seconds:.1f}s (setup {first.setup_seconds:.1f}s), "
          f"second {second.seconds:.1f}s (setup {second.setup_seconds:.1f}s)")

    # A rank dies between fits (its node lost): the next fit finds the group broken and builds a new one.
    spec = trainers.GroupSpec.of(_cfg(tmp_path, "c"))
    ray.kill(ray.get_actor(trainers.actor_name(RUN, spec, 1), namespace=engines.NAMESPACE), no_restart=True)
    third = run_train(_cfg(tmp_path, "c"), _rows(), warm_run=RUN)
    assert [t["reused"] for t in third.trainers] == [False, False]
    assert not {t["pid"] for t in third.trainers} & {t["pid"] for t in first.trainers}
    # The run's end removes them with its engines.
    assert engines.release(RUN) and engines.running(RUN) == []
