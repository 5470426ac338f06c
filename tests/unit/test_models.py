"""Built-in model folders: built once, cached, deterministic; unknown names fail clearly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llm2llm_jobs.models import cache_dir, resolve_model


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLM2LLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_env(fresh_cache: Path) -> None:
    assert cache_dir() == fresh_cache


def test_tiny_llama_builds_once_and_is_cached(fresh_cache: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = Path(resolve_model("tiny-llama"))
    assert path.parent.parent == fresh_cache
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tiny-llama") and p.is_dir()]  # no temp left

    start = time.perf_counter()
    assert resolve_model("tiny-llama") == str(path)
    assert time.perf_counter() - start < 0.5

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_tiny_llama_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = []
    for name in ("a", "b"):
        monkeypatch.setenv("LLM2LLM_CACHE", str(tmp_path / name))
        weights.append((Path(resolve_model("tiny-llama")) / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_local_folder_is_returned_as_is(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_unknown_model_is_a_clear_error(fresh_cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'HuggingFaceTB/SmolLM2-360M'.*not reachable"):
        resolve_model("HuggingFaceTB/SmolLM2-360M")
    assert not (fresh_cache / "models").exists()
