"""The smallest real run the job tests share: a tiny-llama student trained for 2 steps on 8 demo rows."""

from __future__ import annotations

from typing import Any

from tests.conftest import REPO


def tiny_spec(out: str, **sections: Any) -> dict:
    """The spec as a dict; each keyword replaces one whole top-level section (teacher=..., infer=...)."""
    spec: dict[str, Any] = {
        "task": {"kind": "classification", "labels": ["positive", "negative"],
                 "studentTemplate": "Review: {input}\nSentiment:"},
        "data": {"seed": str(REPO / "examples/demo/seed.jsonl"), "test": str(REPO / "examples/demo/test.jsonl"),
                 "inputField": "text", "outputField": "label", "seedLimit": 8, "testLimit": 8},
        "student": {"model": "tiny-llama", "method": "full", "workers": 1,
                    "training": {"steps": 2, "batchSize": 4, "microBatchSize": 4, "maxLength": 48, "precision": "fp32"},
                    "deepspeed": {"zeroStage": 0}},
        "infer": {"backend": "hf", "maxTokens": 3},
        "teacher": {"kind": "hf", "model": "tiny-llama", "maxTokens": 24, "maxRounds": 1},
        "loop": {"maxIterations": 2},
        "output": out,
    }
    spec.update(sections)
    return spec
