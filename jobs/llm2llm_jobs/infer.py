"""Greedy batch generation for failure inference: vLLM when it starts, else Hugging Face ``generate``.

Prompts are raw text (no chat template): the student is trained on raw ``prompt + target``. Both
backends decode greedily from the same tokenisation, so they agree on the answers (see
tests/integration/test_infer.py). Engines are released before returning, so the same process can
build the teacher's engine next.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from .clock import Clock

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def default_dtype() -> str:
    # float32 on CPU: vLLM-CPU and HF then agree token for token (0/64 GSM8K answers differ). bf16 is about
    # 1.5-2x faster on CPUs with avx512_bf16, but its kernels differ per backend (28/64 texts differ).
    return "bfloat16" if has_cuda() else "float32"


def teacher_dtype() -> str:
    """The teacher engine's dtype: bf16 where it is computed natively (a CUDA GPU; a CPU with AVX512-BF16 or
    AMX), else float32. A teacher samples, so unlike failure inference it need not match HF token for token.
    Measured here (AVX512-BF16), qwen2.5-coder-1.5b: vLLM-CPU 37.7 vs 4.7 tok/s, HF 5.4 vs 0.8 tok/s, the same
    GSM8K answers (bench/results/teacher_dtype.md); a CPU without native bf16 emulates it, much slower."""
    import torch

    if has_cuda():
        return "bfloat16"
    return "bfloat16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def is_adapter(path: str | None) -> bool:
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def split_model(model_path: str, adapter_path: str | None) -> tuple[str, str | None]:
    """(model folder, LoRA adapter folder or None). A full fine-tune's folder replaces the base model."""
    if adapter_path is None:
        return model_path, None
    if is_adapter(adapter_path):
        return model_path, adapter_path
    if (Path(adapter_path) / "config.json").is_file():
        return adapter_path, None
    raise ValueError(f"{adapter_path} is neither a PEFT adapter (adapter_config.json) nor a model (config.json)")


def trim_stop(text: str, stop: list[str] | None) -> str:
    """Cut the text at the first stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop or []:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def _length_order(prompts: list[str]) -> list[int]:
    # Longest first: similar lengths share a batch (less padding for HF), and big prompts fail early.
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def generate(
    model_path: str,
    prompts: list[str],
    *,
    adapter_path: str | None = None,
    max_tokens: int = 256,
    backend: str = "auto",
    batch_size: int = 64,
    stop: list[str] | None = None,
    dtype: str | None = None,
    clock: Clock | None = None,
) -> tuple[list[str], str]:
    """Greedy completions (the text after each prompt, in prompt order) and the backend used ('vllm'/'hf').

    ``adapter_path`` is a PEFT LoRA adapter for ``model_path`` or a full model folder (a full fine-tune).
    Generation stops at EOS or at the first of ``stop``, which is trimmed from the text. ``clock`` records the
    engine's start and the generate calls (a failed vLLM start that falls back to HF counts as start-up).
    """
    clock = clock or Clock()
    if backend not in ("auto", "vllm", "hf"):
        raise ValueError(f"unknown backend {backend!r}")
    if not prompts:
        return [], "hf" if backend == "hf" else "vllm"
    dtype = dtype or default_dtype()
    if backend in ("auto", "vllm"):
        try:
            return _generate_vllm(model_path, prompts, adapter_path, max_tokens, batch_size, stop, dtype, clock), "vllm"
        except Exception as err:  # auto: any failure to import or start vLLM falls back to HF
            if backend == "vllm":
                raise
            log.warning("vLLM unavailable, falling back to HF generate: %s: %s", type(err).__name__, err)
    return _generate_hf(model_path, prompts, adapter_path, max_tokens, batch_size, stop, dtype, clock), "hf"


def _log_speed(backend: str, load_s: float, gen_s: float, tokens: int) -> None:
    log.info("%s: loaded in %.1fs, generated %d tokens in %.1fs (%.0f tok/s)", backend, load_s, tokens, gen_s,
             tokens / max(gen_s, 1e-9))


# --- vLLM ----------------------------------------------------------------------------------------

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


def lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank ``r``."""
    return next((v for v in _LORA_RANKS if v >= r), _LORA_RANKS[-1])


def _max_model_len(model: str, prompts: list[str], max_tokens: int) -> int:
    """Enough for the longest prompt plus max_tokens (rounded up), within the model's own limit. A modest
    length keeps vLLM's per-sequence KV reservation small on CPU."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    longest = max(len(ids) for ids in tok(prompts)["input_ids"])
    limit = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None) or 1 << 30
    want = -(-(longest + max_tokens) // 256) * 256
    return min(want, limit)


def release_vllm(llm) -> None:
    """Shut the in-process engine core down (model executor, KV cache, distributed state), so another
    engine can start in this process. The caller then drops its reference and calls ``free_memory``."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as err:  # best effort: gc frees the memory either way
        log.debug("vLLM engine shutdown: %s", err)


def free_memory() -> None:
    gc.collect()  # engines hold reference cycles: refcounting alone does not free them
    if has_cuda():
        import torch

        torch.cuda.empty_cache()


def _generate_vllm(model_path, prompts, adapter_path, max_tokens, batch_size, stop, dtype, clock) -> list[str]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from .lora import MergedAdapter

    model, adapter = split_model(model_path, adapter_path)
    merge = adapter is not None and not has_cuda()  # see llm2llm_jobs.lora: vLLM's LoRA path is slow on CPU
    lora = {}
    if adapter and not merge:
        rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
        lora = {"enable_lora": True, "max_loras": 1,
                "max_lora_rank": lora_rank(rank)}
    start = time.monotonic()
    with clock.engine():
        llm = LLM(
            model=model,
            dtype=dtype,
            seed=0,
            max_model_len=_max_model_len(model, prompts, max_tokens),
            max_num_seqs=batch_size,
            enforce_eager=not has_cuda(),  # CUDA graphs / compilation only pay off on a GPU
            **lora,
        )
        if merge:
            MergedAdapter(llm, model).use(adapter)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop or None)
        request = LoRARequest("student", 1, adapter) if adapter and not merge else None
        order = _length_order(prompts)
        up = time.monotonic()
        with clock.span():
            outs = llm.generate([prompts[i] for i in order], params, lora_request=request, use_tqdm=False)
        texts = [""] * len(prompts)
        for i, out in zip(order, outs):
            texts[i] = out.outputs[0].text
        _log_speed("vllm", up - start, time.monotonic() - up, sum(len(o.outputs[0].token_ids) for o in outs))
        return texts
    finally:
        release_vllm(llm)
        del llm
        free_memory()


# --- Hugging Face --------------------------------------------------------------------------------

def load_hf(model_path: str, adapter_path: str | None, dtype: str):
    """(tokenizer with left padding, eval-mode model with the adapter applied when given)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter = split_model(model_path, adapter_path)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        # Merged (W + s * B @ A, once) rather than applied per token: faster, and the same weights the vLLM
        # engine merges on CPU (llm2llm_jobs.lora), so both backends still agree token for token.
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to("cuda" if has_cuda() else "cpu").eval()
    return tok, model


def _generate_hf(model_path, prompts, adapter_path, max_tokens, batch_size, stop, dtype, clock) -> list[str]:
    import torch

    start = time.monotonic()
    with clock.engine():
        tok, model = load_hf(model_path, adapter_path, dtype)
    up = time.monotonic()
    order = _length_order(prompts)
    texts = [""] * len(prompts)
    tokens = 0
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
            extra = {"stop_strings": stop, "tokenizer": tok} if stop else {}
            with torch.inference_mode(), clock.span():
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id,
                                     **extra)
            new = out[:, enc["input_ids"].shape[1] :]
            tokens += int((new != tok.pad_token_id).sum())
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                texts[i] = trim_stop(text, stop)
        _log_speed("hf", up - start, time.monotonic() - up, tokens)
        return texts
    finally:
        del model
        free_memory()
