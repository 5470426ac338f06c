"""GPU: training MFU of our train stage (Ray Train + DeepSpeed) on a >= 1B-parameter random-init Llama.

    .venv/bin/python -m bench.gpu_train_mfu [--steps 30] [--micro-batch 8] [--seq 1024] [--zero 2]
    .venv/bin/python -m bench.gpu_train_mfu --cpu-smoke    # the same code path, tiny model, on CPU

Builds a random Llama (TinyLlama-1.1B shape: 22 layers, hidden 2048, 32 heads / 4 KV heads, MLP 5632)
with SmolLM2's tokenizer (vocab 49,152: ~1.2B parameters), writes synthetic prompt/target rows that fill
``--seq`` tokens, and trains it with ``llm2llm_jobs.train.run_train`` (full fine-tune, bf16, ZeRO
``--zero``, torch AdamW, one worker per GPU). MFU = 6 * params * tokens/s / (GPUs * dense bf16 peak),
computed by the stage itself (``train._mfu``; peak table ``PEAK_BF16_FLOPS``) over the optimisation
loop (Ray Train start-up excluded; the first steps, with kernel warm-up, included).

Without a GPU it prints why and exits 0 (results/gpu_train_mfu.json says skipped), unless
``--cpu-smoke`` runs the whole path on CPU with a tiny model (no MFU: there is no peak to compare to).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

from bench import _common as C

GOAL_NOTE = "no numeric goal in the brief: report MFU (H100 dense bf16 peak 989 TFLOP/s)"


def gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def build_model(out: Path, layers: int, hidden: int, heads: int, kv_heads: int, mlp: int, seq: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm2llm_jobs.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(2048, seq),
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return n


def write_data(path: Path, rows: int, seq: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = "apples pencils Tom buys sells each how many more than twice half total boxes of with and the".split()
    n_words = int(seq * 0.7)  # ~1.3 tokens per word: fills max_length, the cut trims the rest
    prompts = [" ".join(rng.choice(words) for _ in range(n_words // 2)) + "\nAnswer:" for _ in range(rows)]
    targets = [" " + " ".join(rng.choice(words) for _ in range(n_words // 2)) + "\n#### 7" for _ in range(rows)]
    pq.write_table(pa.table({"prompt": prompts, "target": targets}), path)


def run(args: argparse.Namespace, n_gpu: int) -> dict:
    from llm2llm.spec import DeepSpeedSpec, TrainingSpec
    from llm2llm_jobs.train import TrainConfig, run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-mfu-"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if n_gpu else "cpu")
    if args.cpu_smoke:
        shape = dict(layers=2, hidden=64, heads=4, kv_heads=2, mlp=256)
        args.seq, args.micro_batch, args.steps = 64, 2, 3
    else:
        shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, mlp=args.mlp)
    print(f"load {C.load_str()}: building a random Llama {shape} ...", flush=True)
    n_params = build_model(tmp / "model", seq=args.seq, **shape)
    print(f"  {n_params / 1e9:.3f}B parameters", flush=True)
    workers = max(1, n_gpu)
    batch = args.micro_batch * workers * args.accumulation
    write_data(tmp / "data.parquet", rows=batch * args.steps, seq=args.seq)
    import ray

    ray.init(num_cpus=max(2, workers + 1), num_gpus=n_gpu, include_dashboard=False, log_to_driver=True,
             _temp_dir=str(tmp / "ray"))
    try:
        cfg = TrainConfig(
            model=str(tmp / "model"), method="full",
            training=TrainingSpec(steps=args.steps, lr=1e-4, batch_size=batch, micro_batch_size=args.micro_batch,
                                  max_length=args.seq, precision="bf16",
                                  gradient_checkpointing=args.gradient_checkpointing),
            deepspeed=DeepSpeedSpec(zero_stage=args.zero), workers=workers, gpus_per_worker=1 if n_gpu else 0,
            output_dir=str(tmp / "out"), storage_path=str(tmp / "ray-storage"),
        )
        load0 = C.load_str()
        import pyarrow.parquet as pq

        result = run_train(cfg, pq.read_table(tmp / "data.parquet"))
    finally:
        ray.shutdown()
    import torch

    return {"params": n_params, "shape": shape, "gpus": n_gpu,
            "gpu_name": torch.cuda.get_device_name() if n_gpu else None, "seq": args.seq,
            "micro_batch": args.micro_batch, "global_batch": batch, "zero": args.zero, "steps": result.steps,
            "tokens": result.tokens, "train_seconds": round(result.train_seconds, 2),
            "stage_seconds": round(result.seconds, 2), "tokens_per_second": round(result.tokens_per_second, 1),
            "mfu": round(result.mfu, 4) if result.mfu is not None else None, "cpu_smoke": args.cpu_smoke,
            "load_start": load0, "load_end": C.load_str(), "goal": GOAL_NOTE}


def report(res: dict) -> str:
    if res.get("skipped"):
        return f"Skipped: {res['skipped']}"
    rows = [[f"{res['params'] / 1e9:.3f}B", res["gpu_name"] or "CPU (smoke)", res["gpus"], res["seq"], res["global_batch"],
             res["zero"], res["steps"], f"{res['tokens_per_second']:,.0f}", f"{res['train_seconds']:.1f}",
             f"{res['stage_seconds']:.1f}", "-" if res["mfu"] is None else f"**{100 * res['mfu']:.1f}%**",
             f"{res['load_start']} -> {res['load_end']}"]]
    return C.md_table(["params", "device", "GPUs", "seq", "global batch", "ZeRO", "steps", "tokens/s", "loop s",
                       "stage s", "MFU", "load"], rows) + f"\n\n{res['goal']}."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_train_mfu", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the code path, no MFU")
    args = p.parse_args(argv)
    n_gpu = gpus()
    if n_gpu == 0 and not args.cpu_smoke:
        msg = "no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing measured"
        print(f"gpu_train_mfu: {msg}. Run it on a GPU machine, or pass --cpu-smoke to check the code path.")
        C.save("gpu_train_mfu", {"skipped": msg}, f"Skipped: {msg}.")
        return 0
    res = run(args, n_gpu)
    C.save("gpu_train_mfu" + ("_cpu_smoke" if args.cpu_smoke else ""), res, report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
