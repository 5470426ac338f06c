"""The train stage on a real local Ray with DeepSpeed on CPU (gloo), using the tiny random Llama."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pyarrow as pa
import pytest

from llm2llm.spec import DeepSpeedSpec, LoraSpec, StudentSpec, TrainingSpec
from llm2llm_jobs.models import resolve_model
from llm2llm_jobs.train import RESULT_FILE, TrainConfig, native_bf16, run_train, tokenize_example

pytestmark = pytest.mark.integration

# Short prompts and targets the tiny tokenizer's vocabulary covers well; memorised by test (b).
ROWS = [
    {"prompt": "Question: What is the capital of France?\nAnswer:", "target": " Paris"},
    {"prompt": "Question: How many clips did she sell?\nAnswer:", "target": " 72"},
    {"prompt": "Question: Who wrote it?\nAnswer:", "target": " the lazy dog"},
    {"prompt": "Question: When?\nAnswer:", "target": " in April"},
]


@pytest.fixture(scope="module")
def tiny_model() -> str:
    return resolve_model("tiny-llama")


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    return pa.Table.from_pylist(ROWS)


def test_labels_cover_only_the_target_and_eos(tiny_model: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt, target = ROWS[0]["prompt"], ROWS[0]["target"]
    n_prompt = len(tok(prompt)["input_ids"])
    target_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    ex = tokenize_example(tok, prompt, target, max_length=512)
    assert ex["input_ids"] == tok(prompt)["input_ids"] + target_ids
    assert ex["labels"] == [-100] * n_prompt + target_ids

    cut = tokenize_example(tok, prompt, target, max_length=n_prompt + 1)  # only the first target token survives
    assert cut["labels"] == [-100] * n_prompt + target_ids[:1]
    assert tokenize_example(tok, prompt, target, max_length=n_prompt) is None  # nothing left to learn


def test_lora_zero2_two_workers(ray_local, tiny_model: str, rows: pa.Table, tmp_path: Path) -> None:
    cfg = TrainConfig(
        model=tiny_model,
        method="lora",
        lora=LoraSpec(r=4, alpha=8),
        training=TrainingSpec(steps=3, batch_size=8, micro_batch_size=2, lr=1e-3),
        deepspeed=DeepSpeedSpec(zero_stage=2),
        workers=2,
        output_dir=str(tmp_path / "out"),
        storage_path=str(tmp_path / "ray-storage"),
    )
    result = run_train(cfg, rows)

    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert result.steps == 3
    assert result.global_batch_size == 8  # 2 per micro-batch x 2 workers x 2 accumulation steps
    assert math.isfinite(result.loss) and math.isfinite(result.initial_loss)
    assert result.tokens > 0 and result.mfu is None and result.gpu_seconds == 0
    assert result.worker_hosts == [socket.gethostname()]
    # precision auto: bf16 only where this machine computes it natively (a CPU without AVX512-BF16/AMX
    # emulates it some 15x slower than fp32).
    assert result.precision == ("bf16" if native_bf16() else "fp32")
    assert json.loads((out / RESULT_FILE).read_text()) == result.model_dump()
    # Same filesystem: the checkpoint was moved out of Ray's storage, not copied.
    assert not list((tmp_path / "ray-storage").rglob("adapter_model.safetensors"))


def test_full_zero3_memorises_and_saves_trained_weights(
    ray_local, tiny_model: str, rows: pa.Table, tmp_path: Path
) -> None:
    student = StudentSpec(
        model="tiny-llama",
        method="full",
        training=TrainingSpec(steps=60, batch_size=4, micro_batch_size=2, lr=1e-2, precision="bf16"),
        deepspeed=DeepSpeedSpec(zero_stage=3),
        workers=2,
    )
    out = tmp_path / "out"
    result = run_train(TrainConfig.from_spec(student, str(out), str(tmp_path / "storage")), rows)
    assert result.steps == 60 and result.loss < result.initial_loss
    assert result.precision == "bf16"  # asked for explicitly: kept, emulated or not

    # Measure with plain transformers from the saved folder: proves the gathered ZeRO-3 weights are the trained ones.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def mean_loss(model) -> float:
        losses = []
        for row in ROWS:
            ex = tokenize_example(tok, row["prompt"], row["target"], 512)
            with torch.no_grad():
                losses.append(model(torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item())
        return sum(losses) / len(losses)

    base_loss, trained_loss = mean_loss(base), mean_loss(trained)
    assert trained_loss < 0.2 * base_loss, (base_loss, trained_loss)

    for row in ROWS:
        ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
        n_target = len(tok(row["target"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            gen = trained.generate(ids, max_new_tokens=n_target + 1, do_sample=False)
        assert gen[0, ids.shape[1] :].tolist()[-1] == tok.eos_token_id  # learned to stop
        assert tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True) == row["target"]
