"""Warm vLLM engines owned by a run: named, detached Ray actors that outlive one iteration's job.

Every iteration used to build a fresh engine for failure inference and another for the teacher (about 20 s
each on CPU here, a model load and CUDA-graph capture per stage on GPUs), although the base model and the
teacher never change within a run. Now each job asks for the engines it needs by what they are
(``EngineSpec``: model, dtype, tensor parallelism, LoRA rank, context length) and gets the run's live one:

- created on first use, named ``llm2llm-<run uid>-<spec key>-<replica>`` in the Ray namespace ``NAMESPACE``
  (``lifetime="detached"``: the job's driver exits, the engine stays, on the same Ray cluster); a job whose
  run has none yet starts them (``start``) before it trains, so their load overlaps the train stage;
- reused by later iterations' jobs; a job that finds a dead engine, or one of another spec, replaces it;
- failure inference loads the iteration's LoRA adapter into the warm base-model engine (merged into its weights
  on CPU, ``llm2llm_jobs.lora``; vLLM's LoRARequest on GPUs),
  so the student's engine is the same engine in every iteration; when teacher and student are one model, one
  engine serves both;
- removed when the run ends (the last iteration's job calls ``release``), and by itself after
  ``IDLE_SECONDS`` without a call (a run that failed for good, was deleted or lost its controller).

With a RayCluster per job (a clusterTemplate), the engines live as long as that job's cluster. Engines
reserve no Ray CPU (training would otherwise wait for the CPUs an idle engine holds) and are placed on nodes
that have CPUs to give (never on a head started with num-cpus 0, which runs only drivers); on GPUs they
hold ``tensor_parallel`` GPUs each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "llm2llm-engines"
IDLE_SECONDS_ENV = "LLM2LLM_ENGINE_IDLE_SECONDS"
IDLE_SECONDS = 900.0
MAX_MODEL_LEN = 4096


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What an engine is; two stages (or iterations) with equal specs share it."""

    model: str  # a spec model name, resolved on the engine's node (llm2llm_jobs.models.resolve_model)
    # "student": failure inference's dtype (infer.default_dtype: float32 on CPU, where vLLM and HF agree token for
    # token); "teacher": infer.teacher_dtype (bf16 where native); or a torch dtype name. Decided on the engine's
    # node, by its hardware: the job's driver may run on a head without the workers' GPUs, and asking torch
    # there cost each job its 4 s import of torch.
    dtype: str = "student"
    tensor_parallel: int = 1
    max_lora_rank: int | None = None  # LoRA enabled up to this rank (the student's), or no LoRA
    max_model_len: int = MAX_MODEL_LEN

    def key(self) -> str:
        return spec_key(self)


def spec_key(spec: Any) -> str:
    """A short stable digest of a warm actor's spec (a dataclass): equal specs share the actor."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:10]


def actor_name(run_uid: str, spec: EngineSpec, replica: int) -> str:
    return f"llm2llm-{run_uid}-{spec.key()}-{replica}"


class WarmActor:
    """What the run's warm actors (engines here, trainers in llm2llm_jobs.trainers) share: their ``info``, and a
    watchdog that ends the process once no call came for ``idle_seconds`` (a run that died leaves none behind)."""

    _kind = "actor"
    _info: dict[str, Any]
    _last: float

    def _watch(self, idle_seconds: float) -> None:
        self._last = time.monotonic()
        threading.Thread(target=self._watch_idle, args=(idle_seconds,), daemon=True).start()

    def _watch_idle(self, idle_seconds: float) -> None:
        while True:
            time.sleep(min(30.0, idle_seconds / 4))
            if time.monotonic() - self._last > idle_seconds:
                log.warning("%s %s idle for %.0fs: exiting", self._kind, self._info.get("name"), idle_seconds)
                os._exit(0)  # the actor dies (no restarts); its name is free for a new one

    def info(self, name: str | None = None) -> dict[str, Any]:
        if name:
            self._info["name"] = name
        return dict(self._info)


class EngineActor(WarmActor):
    """One vLLM engine in its own Ray worker process. Calls are serial (a sync actor)."""

    _kind = "engine"

    def __init__(self, spec: EngineSpec, idle_seconds: float):
        began = time.time()
        from .infer import default_dtype, has_cuda, teacher_dtype
        from .lora import MergedAdapter
        from .models import resolve_model
        from .teach import vllm_engine_args

        from vllm import LLM

        self.spec = spec
        started = time.monotonic()
        path = resolve_model(spec.model)
        # On CPU an adapter is merged into the weights (llm2llm_jobs.lora); on GPUs vLLM applies it per request.
        merge = spec.max_lora_rank is not None and not has_cuda()
        lora = {} if spec.max_lora_rank is None or merge else {"enable_lora": True, "max_loras": 1,
                                                                "max_lora_rank": spec.max_lora_rank}
        dtype = {"student": default_dtype, "teacher": teacher_dtype}.get(spec.dtype, lambda: spec.dtype)()
        self._llm = LLM(model=path, dtype=dtype, seed=0, tensor_parallel_size=spec.tensor_parallel,
                        enforce_eager=not has_cuda(), **vllm_engine_args(_context(path, spec.max_model_len)), **lora)
        self._merged = MergedAdapter(self._llm, path) if merge else None
        self._info = {"name": None, "key": spec.key(), "pid": os.getpid(), "node": os.uname().nodename,
                      "dtype": dtype, "started_at": began, "created_at": time.time(),
                      "load_seconds": round(time.monotonic() - started, 3), "calls": 0}
        self._loras: dict[str, int] = {}
        self._watch(idle_seconds)

    def _touch(self) -> None:
        self._last = time.monotonic()
        self._info["calls"] += 1

    def generate(self, prompts: list[str], max_tokens: int, adapter: str | None = None,
                 stop: list[str] | None = None) -> tuple[list[str], list[float]]:
        """Greedy completions of raw prompts (failure inference), with the adapter at ``adapter`` (a storage
        location, fetched here) applied. Returns the texts and the span inside generate (clock.Span)."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        from .fanout import local_copy
        from .infer import _length_order

        self._touch()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop or None)
        with local_copy(adapter) as path:
            request = None
            if self._merged is not None:
                self._merged.use(path, key=adapter)  # a no-op while the weights hold this adapter
            elif path is not None:
                # A new id per adapter: vLLM caches loaded adapters by id (max_loras=1 keeps one resident).
                lora_id = self._loras.setdefault(adapter or "", len(self._loras) + 1)
                request = LoRARequest(f"student-{lora_id}", lora_id, path)
            order = _length_order(prompts)
            start, t0 = time.time(), time.monotonic()
            outs = self._llm.generate([prompts[i] for i in order], params, lora_request=request, use_tqdm=False)
            seconds = time.monotonic() - t0
        texts = [""] * len(prompts)
        for i, out in zip(order, outs):
            texts[i] = out.outputs[0].text
        self._last = time.monotonic()
        return texts, [round(start, 3), round(seconds, 3)]

    def chat(self, conversations: list[list[dict]], params: list[dict[str, Any]]) -> list[list[tuple[str, int, int]]]:
        """The teacher's sampled chat completions (teach.sampling_params): (text, prompt tokens, completion
        tokens) per sample."""
        from .teach import vllm_sampling_params

        self._touch()
        if self._merged is not None:
            self._merged.use(None)  # the teacher is the base model (an engine both roles share)
        outs = self._llm.chat(conversations, [vllm_sampling_params(**p) for p in params], use_tqdm=False)
        self._last = time.monotonic()
        return [[(c.text, len(out.prompt_token_ids or []), len(c.token_ids)) for c in out.outputs] for out in outs]


def _context(model_path: str, want: int) -> int:
    """``want`` tokens of context, within what the model itself supports."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None) or want
    return min(want, int(limit))


def _placement(replica: int, gpus: int, total: float = 1, timeout: float = 300.0) -> Any:
    """A node that has what the actor needs (CPUs to give, or GPUs): the replica-th of them, so replicas spread.
    A head started with num-cpus 0 runs drivers only and never gets one. Waits (up to ``timeout``) until the
    cluster's nodes offer ``total`` CPUs (GPUs) between them: a RayCluster made for this job may still be
    bringing its worker pods up, and an actor placed before they join would land where there is room, the head."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    need = "GPU" if gpus else "CPU"
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted((n["NodeID"], n["Resources"].get(need, 0)) for n in ray.nodes()
                       if n.get("Alive") and n.get("Resources", {}).get(need, 0) > 0)
        if nodes and sum(r for _, r in nodes) >= total:
            # Hard: Ray places an actor that asks for no resources on a random node whatever a soft affinity
            # says (the node test saw both trainers land on the CPU-less head). A node gone before the actor
            # starts fails the actor (and the attempt) instead of placing it elsewhere.
            return NodeAffinitySchedulingStrategy(node_id=nodes[replica % len(nodes)][0], soft=False)
        if time.monotonic() > deadline:
            have = sum(r for _, r in nodes)
            raise RuntimeError(f"the Ray cluster offers {have:g} {need} after {timeout:.0f}s; {total:g} needed")
        time.sleep(2)


def start(run_uid: str, spec: EngineSpec, replica: int = 0, *, gpus: int = 0) -> Any | None:
    """Begin starting the run's engine for ``spec`` and return at once: the engine loads in its own process while
    the caller goes on (the job starts them before it trains), and ``acquire(..., pending=handle)`` waits for
    it. Returns the new handle, or None when an engine of that name exists (``acquire`` checks it) or no node
    has room for it right now (the stage that needs it starts it then)."""
    import ray

    name = actor_name(run_uid, spec, replica)
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return None
    except ValueError:
        pass
    try:
        placement = _placement(replica, gpus, timeout=0)
    except RuntimeError as err:
        log.info("engine %s not started early: %s", name, err)
        return None
    log.info("engine %s starting in the background", name)
    return _create(name, spec, gpus, placement)


def _create(name: str, spec: EngineSpec, gpus: int, placement: Any) -> Any:
    import ray

    idle = float(os.environ.get(IDLE_SECONDS_ENV) or IDLE_SECONDS)
    return ray.remote(EngineActor).options(
        name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=0, num_cpus=0, num_gpus=gpus,
        scheduling_strategy=placement,
    ).remote(spec, idle)


def acquire(run_uid: str, spec: EngineSpec, replica: int = 0, *, gpus: int = 0,
            pending: Any | None = None) -> tuple[Any, dict[str, Any]]:
    """The run's engine for ``spec`` (replica ``replica``): the live one, or a new one in its place. ``pending``
    is the handle ``start`` returned for it: waited for, however long its load takes. Returns (actor handle,
    info) where info says whether it was reused, started early (and how long this call still waited for it),
    and when it was made."""
    import ray

    name = actor_name(run_uid, spec, replica)
    if pending is not None:
        t0 = time.monotonic()
        try:
            info = ray.get(pending.info.remote(name))
            return pending, {**info, "reused": False, "prestarted": True,
                             "waited_seconds": round(time.monotonic() - t0, 3)}
        except Exception as err:  # noqa: BLE001 - it died while loading: replaced below like any dead engine
            log.warning("engine %s failed while starting early (%s): starting it again", name, err)
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        handle = None
    if handle is not None:
        try:
            info = ray.get(handle.info.remote(), timeout=60)
            if info["key"] == spec.key():
                return handle, {**info, "reused": True}
            log.warning("engine %s is another spec (%s): replacing it", name, info["key"])
        except Exception as err:  # noqa: BLE001 - dead, dying or wedged: replaced either way
            log.warning("engine %s does not answer (%s): replacing it", name, err)
        ray.kill(handle, no_restart=True)
        _wait_gone(name)
    started = time.monotonic()
    handle = _create(name, spec, gpus, _placement(replica, gpus))
    info = ray.get(handle.info.remote(name))
    log.info("engine %s started in %.1fs on %s", name, time.monotonic() - started, info["node"])
    return handle, {**info, "reused": False}


def _wait_gone(name: str, timeout: float = 60.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.5)


def running(run_uid: str | None = None) -> list[str]:
    """Names of the live engines (of one run, or all)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE]
    return sorted(n for n in names if run_uid is None or n.startswith(f"llm2llm-{run_uid}-"))


def release(run_uid: str) -> list[str]:
    """Remove every engine of the run (its last iteration is committed). Returns their names."""
    import ray

    gone = []
    for name in running(run_uid):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            gone.append(name)
        except ValueError:
            pass
    for name in gone:
        _wait_gone(name)
    return gone
