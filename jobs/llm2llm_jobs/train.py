"""The train stage: fine-tune the BASE student on prompt/target rows with Ray Train + DeepSpeed.

Every iteration trains from the base checkpoint (the LLM2LLM recipe), with the loss on the target only.
Rank 0 saves a PEFT adapter (LoRA) or a full Hugging Face folder (full fine-tuning), reports it to
Ray Train as a checkpoint (so it reaches the driver even from another node), and the driver moves or copies
it into ``output_dir`` with ``train_result.json``.

Nothing a worker reads comes from the driver's disk, so the workers may be other machines (KubeRay pods):
the rows travel in Ray's object store, each worker resolves the model name itself, and the checkpoint goes
through ``storage_path``, a folder the driver and every worker reach (a shared volume or an fsspec URL).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Literal

import pyarrow as pa
from pydantic import BaseModel, Field

from llm2llm.spec import DeepSpeedSpec, LoraSpec, StudentSpec, TrainingSpec

log = logging.getLogger(__name__)

# Driver variables the workers need (on an existing cluster they do not inherit the driver's environment);
# they travel in the loop config and each worker sets them before importing DeepSpeed.
_WORKER_ENV = (
    "DS_ACCELERATOR",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TORCH_EXTENSIONS_DIR",
    "TOKENIZERS_PARALLELISM",
)

# Ray Train's controller settings for this job (the driver's environment reaches the controller; a value the
# user set wins). The preemption watcher is one more actor process per fit (7 s of a 80-85 s fit of the tiny
# model on 2 cores) that turns a node drain into a worker-group restart; a fit here has no retries of its own
# (a failed fit fails the iteration, which the operator or `llm2llm run` retries from its last finished stage).
_CONTROLLER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Dense bf16 peak FLOP/s per GPU, matched as a substring of torch.cuda.get_device_name(); for MFU only.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}

RESULT_FILE = "train_result.json"


class TrainConfig(BaseModel):
    model: str = Field(description="The BASE model: a built-in name or a folder every worker sees (resolve_model).")
    method: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    workers: int = Field(1, ge=1)
    gpus_per_worker: int = Field(0, ge=0)
    cpus_per_worker: int = Field(1, ge=1)
    output_dir: str = Field(description="Driver-local folder (absent or empty) that receives the adapter or model, "
                            "and train_result.json.")
    storage_path: str = Field(description="Ray Train's run records and checkpoint (RunConfig.storage_path): a folder "
                              "or fsspec URL the driver and every worker reach.")

    @classmethod
    def from_spec(cls, student: StudentSpec, output_dir: str, storage_path: str) -> TrainConfig:
        return cls(
            model=student.model,
            method=student.method,
            lora=student.lora,
            training=student.training,
            deepspeed=student.deepspeed,
            workers=student.workers,
            gpus_per_worker=student.gpus_per_worker,
            cpus_per_worker=student.cpus_per_worker,
            output_dir=output_dir,
            storage_path=storage_path,
        )


class TrainResult(BaseModel):
    steps: int = Field(description="Optimizer steps taken.")
    tokens: int = Field(description="Non-padding tokens the optimizer saw, all workers and epochs.")
    loss: float = Field(description="Mean training loss of the final optimizer step.")
    initial_loss: float = Field(description="Mean training loss of the first optimizer step.")
    seconds: float = Field(description="Wall time of the whole stage, Ray Train start-up included.")
    train_seconds: float = Field(description="Wall time of the optimisation loop alone.")
    setup_seconds: float = Field(0.0, description="Rank 0's worker from its start to the loop: imports, model and "
                                 "tokenizer load, tokenising, DeepSpeed initialize.")
    tokens_per_second: float = Field(description="tokens / train_seconds.")
    mfu: float | None = Field(None, description="Model FLOPs utilisation (6*params*tokens/s / peak); None on CPU.")
    gpu_seconds: float = Field(description="seconds * workers * gpus_per_worker.")
    examples: int = Field(description="Training rows used (rows with no target token left are dropped).")
    global_batch_size: int = Field(description="micro_batch_size * workers * gradient accumulation steps.")
    worker_hosts: list[str] = Field(default_factory=list, description="Distinct hostnames the workers ran on.")
    precision: str = Field("fp32", description="bf16 or fp32: training.precision as the workers resolved it.")
    trainers: list[dict[str, Any]] = Field(default_factory=list, description="The run's warm training workers "
                                           "(llm2llm_jobs.trainers): name, pid, node, when made, whether reused.")


# ---------------------------------------------------------------------------------------------- data


def tokenize_example(tokenizer: Any, prompt: str, target: str, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels for one row: loss only on the target and the EOS that ends it.

    Prompt and target are tokenised separately, as at inference (the prompt alone, then generation),
    and the pair is cut to ``max_length`` from the right. None when no target token survives the cut.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest row; padding gets attention 0 and label -100."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        pad = width - len(e["input_ids"])
        ids.append(e["input_ids"] + [pad_id] * pad)
        mask.append([1] * len(e["input_ids"]) + [0] * pad)
        labels.append(e["labels"] + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def _index_stream(n: int, seed: int) -> Iterator[int]:
    """Row indices forever, reshuffled each epoch; identical on every worker, so workers just take slices."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield from order
        epoch += 1


def _load_examples(table: pa.Table, tokenizer: Any, max_length: int, cache: dict | None = None,
                   model_key: str = "") -> list[dict[str, list[int]]]:
    rows = table.select(["prompt", "target"]).to_pylist()
    cache = {} if cache is None else cache  # a warm trainer's: rows of earlier iterations are tokenised once

    def one(r: dict[str, str]) -> dict[str, list[int]] | None:
        key = (model_key, max_length, r["prompt"], r["target"])
        if key not in cache:
            cache[key] = tokenize_example(tokenizer, r["prompt"], r["target"], max_length)
        return cache[key]

    examples = [one(r) for r in rows]
    kept = [e for e in examples if e is not None]
    if len(kept) < len(rows):
        log.warning("dropped %d of %d rows whose prompt fills max_length", len(rows) - len(kept), len(rows))
    if not kept:
        raise ValueError(f"no usable training rows among {len(rows)}")
    return kept


# ------------------------------------------------------------------------------------------ schedule


def planned_steps(training: TrainingSpec, rows: int) -> int:
    """Fixed steps when set (more data then does not mean more training), else epochs over the data."""
    if training.steps:
        return training.steps
    return max(1, math.ceil(training.epochs * rows / training.batch_size))


def deepspeed_config(cfg: TrainConfig, world: int, precision: str) -> dict[str, Any]:
    """``precision``: "bf16" or "fp32", as resolved by the workers (training.precision may say auto)."""
    t, zero = cfg.training, cfg.deepspeed
    accumulation = max(1, t.batch_size // (t.micro_batch_size * world))
    zero_opt: dict[str, Any] = {"stage": zero.zero_stage}
    if zero.offload == "cpu" and zero.zero_stage > 0:
        zero_opt["offload_optimizer"] = {"device": "cpu"}
    if zero.zero_stage == 3:
        zero_opt["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * accumulation * world,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero_opt,
        # We pass torch's AdamW: DeepSpeed's CPU Adam is JIT-compiled on first use (~40 s+).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,
    }


def _lr_lambda(total: int, warmup_ratio: float):
    """Linear warmup then cosine to 0. Warmup starts above 0, so no optimizer step is wasted at lr 0."""
    warmup = int(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


# --------------------------------------------------------------------------------------------- worker


def _load_shm_op_safely() -> None:
    """Load DeepSpeed's CPU shared-memory comm op before deepspeed.initialize does.

    torch's JIT loader marks an op folder busy with a plain ``lock`` file while it checks or builds the op,
    and waits, forever, while that file exists. A job SIGKILLed in that window (a stopped or retried
    iteration) leaves the file behind, and every later training on the node hangs. So the op is loaded
    here under an flock, which the kernel drops when its holder dies: whoever holds it knows any ``lock``
    file is stale and removes it. DeepSpeed caches the loaded op, so initialize() does not load it again."""
    import fcntl

    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op
    from torch.utils.cpp_extension import get_default_build_root

    if get_accelerator().device_name() != "cpu":
        return
    # (torch reads TORCH_EXTENSIONS_DIR itself when building; its default adds a python/cuda tag folder)
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".llm2llm.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for stale in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            log.warning("removing %s, left by a process killed while loading the op", stale)
            stale.unlink(missing_ok=True)
        build_shm_op()


def native_bf16() -> bool:
    """Whether this process's training device computes bf16 natively (else torch emulates it, slowly)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # AVX512-BF16 or AMX


def _agreed_precision(requested: str, device: Any) -> str:
    """training.precision for every rank alike: "auto" is bf16 only when all ranks compute it natively
    (one DeepSpeed config for all; a rank emulating bf16 would hold the others back)."""
    if requested != "auto":
        return requested
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(native_bf16())], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return "bf16" if int(flag.item()) else "fp32"


def _device(gpus: int) -> Any:
    import torch

    if gpus:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_base(model_path: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.config.use_cache = False
    return model


def fit_rank(cfg: TrainConfig, rows: pa.Table, rank: int, world: int, node: str, entered: float,
             base: Callable[[str, Any], Any] = load_base, tokenized: dict | None = None) -> tuple[dict[str, Any], Any]:
    """One rank's fit, with torch.distributed already up (Ray Train's worker group, or a warm trainer's own):
    train the BASE model on ``rows`` with DeepSpeed. Returns the metrics (rank 0's are the run's) and a
    callable that saves the adapter or model into a folder (a collective under ZeRO-3: every rank calls it).
    ``base(path, dtype)`` gives a fresh copy of the base model (a warm trainer keeps it loaded);
    ``tokenized`` caches rows' token ids across fits (keyed by the row and the tokenizer's settings)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from .models import resolve_model

    t = cfg.training
    log.info("worker %d/%d on %s: %d torch threads", rank, world, socket.gethostname(), torch.get_num_threads())
    torch.manual_seed(t.seed)
    device = _device(cfg.gpus_per_worker)
    # Resolved here, not on the driver: this machine's cache (built under a file lock when absent).
    model_path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    precision = _agreed_precision(t.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = base(model_path, dtype)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if t.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them

    examples = _load_examples(rows, tokenizer, t.max_length, tokenized, model_path)
    total_steps = planned_steps(t, len(examples))
    ds_config = deepspeed_config(cfg, world, precision)
    accumulation = ds_config["gradient_accumulation_steps"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, t.warmup_ratio)),
        config=ds_config,
    )
    engine.train()

    stream = _index_stream(len(examples), t.seed)
    per_micro = t.micro_batch_size
    tokens = 0
    step_losses: list[float] = []
    start = time.perf_counter()
    for step in range(total_steps):
        losses = []
        for _ in range(accumulation):
            chunk = [next(stream) for _ in range(per_micro * world)]  # same on every rank
            batch = collate([examples[i] for i in chunk[rank * per_micro : (rank + 1) * per_micro]], pad_id)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed only updates at the accumulation boundary
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
        step_losses.append(sum(losses) / len(losses))
        if rank == 0 and (step + 1) % max(1, total_steps // 10) == 0:
            log.info("step %d/%d loss %.4f", step + 1, total_steps, step_losses[-1])
    train_seconds = time.perf_counter() - start

    # Sum tokens and average the first/last step losses over workers (a device tensor, so nccl works too).
    stats = torch.tensor([tokens, step_losses[0], step_losses[-1]], dtype=torch.float64, device=engine.device)
    dist.all_reduce(stats)
    tokens, initial_loss, final_loss = int(stats[0]), float(stats[1]) / world, float(stats[2]) / world
    # Where each rank ran, for the driver's log and the stage's figures (only rank 0's metrics reach the driver).
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, [socket.gethostname(), node])
    metrics = {
        "steps": total_steps,
        "tokens": tokens,
        "loss": final_loss,
        "initial_loss": initial_loss,
        "train_seconds": train_seconds,
        "setup_seconds": start - entered,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        "mfu": _mfu(n_params, tokens / train_seconds, world * cfg.gpus_per_worker) if cfg.gpus_per_worker else None,
        "examples": len(examples),
        "global_batch_size": ds_config["train_batch_size"],
        "precision": precision,
        "rank_hosts": hosts,
    }
    return metrics, lambda out: _save(engine, cfg, tokenizer, Path(out), rank)


def prepare_worker(env: dict[str, str]) -> None:
    """What a training worker process does once, before its first fit: the environment DeepSpeed and
    transformers read at import, the imports themselves, and DeepSpeed's CPU comm op."""
    os.environ.update(env)
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    _load_shm_op_safely()


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker (spec.ray.keepWarm false): set up, fit, rank 0 saves and reports."""
    entered = time.perf_counter()
    # Before DeepSpeed and transformers are imported: they read DS_ACCELERATOR and the offline flags then.
    # (Set here rather than in a worker runtime_env, which would rule out Ray's pre-started workers.)
    prepare_worker(loop_config["env"])
    import ray
    import ray.train

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    metrics, save = fit_rank(cfg, ray.get(loop_config["rows"]), ctx.get_world_rank(), ctx.get_world_size(),
                             ray.get_runtime_context().get_node_id(), entered)
    with tempfile.TemporaryDirectory(prefix="llm2llm-train-") as out:
        save(out)
        checkpoint = ray.train.Checkpoint.from_directory(out) if ctx.get_world_rank() == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)  # once: each report blocks ~1.6 s


def _save(engine: Any, cfg: TrainConfig, tokenizer: Any, out: Path, rank: int) -> None:
    import deepspeed

    module = engine.module
    zero3 = cfg.deepspeed.zero_stage == 3
    if cfg.method == "lora":
        # Only the adapter is saved; under ZeRO-3 its (small) weights are gathered first.
        trainable = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=zero3):
            if rank == 0:
                module.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
        return
    # ZeRO-3 holds a shard per rank: consolidate layer by layer onto rank 0's CPU.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if rank == 0:
        module.save_pretrained(out, state_dict=state_dict)
        tokenizer.save_pretrained(out)


def _mfu(n_params: int, tokens_per_second: float, gpus: int) -> float | None:
    import torch

    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        log.warning("no peak FLOP/s known for %r; MFU not reported", name)
        return None
    # 6 FLOPs per parameter per token (forward + backward); an over-estimate for LoRA's frozen weights.
    return 6 * n_params * tokens_per_second / (peak * gpus)


# --------------------------------------------------------------------------------------------- driver


# A fit has no retries of its own: the iteration is retried from its last committed stage (the planner, with
# backoff and retry.maxAttempts). Ray Train's defaults retry a lost node and its own worker-group start forever:
# on the real node, a worker pod killed mid-train left the new worker group's placement group pending behind
# the old one's, and the fit waited for ever (controller "Error count: 7 (max allowed: inf)"). A worker group
# that cannot start is tried a few times (60 s each: pods may still be coming up), then the attempt fails.
FAILURES = {"max_failures": 0, "controller_failure_limit": 3, "max_preemption_failures": 0}


def run_train(cfg: TrainConfig, rows: pa.Table, warm_run: str | None = None) -> TrainResult:
    """Train on ``rows`` (string columns 'prompt' and 'target') on the Ray cluster this process is connected
    to (or a local one), then fill ``output_dir``. ``warm_run``: the run's uid, to train on its warm group of
    workers (llm2llm_jobs.trainers); None: a Ray Train worker group of this fit's own."""
    import ray

    if not ray.is_initialized():
        ray.init()
    gpu = cfg.gpus_per_worker > 0
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"
    rows = rows.select(["prompt", "target"])
    start = time.perf_counter()
    if warm_run is not None:
        from . import trainers

        metrics, files, group = trainers.fit(warm_run, cfg, ray.put(rows), env)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        return _result(cfg, metrics, time.perf_counter() - start, out,
                       trainers=[{k: v for k, v in i.items() if k != "key"} for i in group])
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    for key, value in _CONTROLLER_ENV.items():
        os.environ.setdefault(key, value)  # this process is the iteration's own driver
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if gpu:
        resources["GPU"] = cfg.gpus_per_worker
    storage_path, storage_fs = ray_storage(cfg.storage_path)
    # The rows go through the object store, as a reference: each node fetches them once, however large, and
    # by value they would also be copied into Ray Train's run state (which records the loop config).
    rows_ref = ray.put(rows)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "env": env, "rows": rows_ref},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpu, resources_per_worker=resources),
        # A fresh name per call: Ray Train V2 would otherwise try to resume a finished run of the same name.
        run_config=RunConfig(name=f"train-{uuid.uuid4().hex[:12]}", storage_path=storage_path,
                             storage_filesystem=storage_fs, failure_config=FailureConfig(**FAILURES)),
    )
    result = trainer.fit()
    seconds = time.perf_counter() - start
    out = Path(cfg.output_dir)
    _take_checkpoint(result.checkpoint, out)
    return _result(cfg, dict(result.metrics), seconds, out)


def _result(cfg: TrainConfig, metrics: dict[str, Any], seconds: float, out: Path, **extra: Any) -> TrainResult:
    rank_hosts = metrics.pop("rank_hosts")
    for rank, (host, node) in enumerate(rank_hosts):
        log.info("training worker %d ran on %s (Ray node %s)", rank, host, node)
    train = TrainResult(
        **metrics, seconds=seconds, gpu_seconds=seconds * cfg.workers * cfg.gpus_per_worker,
        worker_hosts=sorted({host for host, _ in rank_hosts}), **extra,
    )
    (out / RESULT_FILE).write_text(json.dumps(train.model_dump(), indent=2) + "\n")
    log.info("trained %d steps, loss %.4f -> %.4f, %.1f s", train.steps, train.initial_loss, train.loss, seconds)
    return train


def ray_storage(storage_path: str) -> tuple[str, Any]:
    """(path, filesystem) for RunConfig: a local folder as an absolute path, on Ray's default filesystem;
    a URL through the fsspec filesystem the run's storage uses too (one implementation, one way to find
    credentials), wrapped for pyarrow."""
    if "://" not in storage_path:
        return str(Path(storage_path).resolve()), None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(storage_path)
    return path, PyFileSystem(FSSpecHandler(fs))


def _take_checkpoint(checkpoint: Any, out: Path) -> None:
    """Put the reported checkpoint's files into ``out``: a rename when both are on one local filesystem (a
    full model can be many GB), else a download, after which the stored copy is redundant."""
    import pyarrow.fs

    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        try:
            os.rename(checkpoint.path, out)
            return
        except OSError as err:  # another filesystem (EXDEV), or out is not empty: copy instead
            log.debug("cannot rename %s to %s (%s): copying", checkpoint.path, out, err)
    out.mkdir(exist_ok=True)
    checkpoint.to_directory(str(out))
    _drop_stored_checkpoint(checkpoint)


def _drop_stored_checkpoint(checkpoint: Any) -> None:
    """The copy in Ray's storage is redundant once output_dir has it (a full model is hundreds of MB)."""
    import pyarrow

    try:
        checkpoint.filesystem.delete_dir(checkpoint.path)
    except (OSError, pyarrow.ArrowException) as err:  # keep going: only disk space is at stake
        log.warning("could not delete %s: %s", checkpoint.path, err)
