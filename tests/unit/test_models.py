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
    import torch
    from transformers import AutoConfig, AutoTokenizer

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    path = Path(resolve_model("tiny-llama"))
    assert torch.equal(torch.rand(3), expected)  # the build seeds torch; the caller's RNG is left as it was
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


def test_a_train_worker_of_rank_1_builds_a_complete_folder(fresh_cache: Path) -> None:
    """Each node resolves the model where it is used, so a train worker of rank 1 may be the first on its node.
    There torch.distributed is up, and transformers' save_pretrained writes nothing on ranks above 0."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # a process group with no peers to wait for

    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        path = Path(resolve_model("tiny-llama"))
        assert torch.equal(torch.rand(3), expected)  # nor is the caller's torch RNG reseeded by the build
    finally:
        dist.destroy_process_group()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_builtin_models_are_the_specs_builtin_names():
    """The spec admits built-in names from llm2llm.spec.BUILTIN_MODELS (CRD rule); the jobs prepare exactly those."""
    from llm2llm.spec import BUILTIN_MODELS
    from llm2llm_jobs.models import _FOLDERS

    assert sorted(_FOLDERS) == sorted(BUILTIN_MODELS)
