"""Warm training workers owned by a run: a group of named, detached Ray actors, one per rank, that train the
student in every iteration of the run (``spec.ray.keepWarm``, on by default).

Ray Train starts a new worker group for every fit: new processes that import torch, transformers, PEFT and
DeepSpeed (about 13 s of CPU each here), rendezvous, load the base model and tokenise the rows, every iteration
(about 45-60 s of a demo iteration whose optimisation loop takes 10). A warm group pays that once per run:

- the actors are created by the first train stage that needs them (named ``llm2llm-<run uid>-train-<key>-<rank>``
  in the Ray namespace of the engines, ``lifetime="detached"``), import the stack and join one torch.distributed
  process group (gloo on CPU, nccl on GPUs) that lasts as long as the group;
- each fit trains a fresh copy of the base model, which every rank keeps loaded (LLM2LLM retrains from the base
  every iteration), on rows whose token ids are cached by content; rank 0 hands the saved adapter or model back
  to the driver, which commits it exactly as before: the stage's markers, retries and resume do not change;
- a lost or failed rank fails the fit and takes the whole group down (a survivor would wait on its peer in a
  collective); the next attempt builds a new group. A group of another shape (model, workers, resources) is
  replaced too;
- they go with the run's engines (``engines.release`` when the last iteration commits) or after the same idle
  time, and with the cluster when it is a RayCluster per job.

Like the engines, trainers reserve no Ray CPU between fits (the stages in between need it) and are spread over
the nodes that have CPUs (or GPUs) to give, never on a head started with num-cpus 0.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from .engines import IDLE_SECONDS, IDLE_SECONDS_ENV, NAMESPACE, WarmActor, _placement, _wait_gone, spec_key
from .train import TrainConfig, fit_rank, load_base, prepare_worker

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    model: str
    workers: int
    cpus_per_worker: int
    gpus_per_worker: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> GroupSpec:
        return cls(cfg.model, cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker)

    def key(self) -> str:
        return spec_key(self)


def actor_name(run_uid: str, spec: GroupSpec, rank: int) -> str:
    return f"llm2llm-{run_uid}-train-{spec.key()}-{rank}"


class TrainerActor(WarmActor):
    """One rank of a warm group. Calls are serial."""

    _kind = "trainer"

    def __init__(self, spec: GroupSpec, env: dict[str, str], idle_seconds: float):
        started = time.monotonic()
        prepare_worker(env)
        if not spec.gpus_per_worker:
            import torch

            # What a Ray Train worker gets from its CPU reservation, which a trainer does not hold between fits.
            torch.set_num_threads(spec.cpus_per_worker)
        self.spec = spec
        self._bases: dict[tuple[str, str], Any] = {}
        self._tokenized: dict = {}
        self._rank: int | None = None
        self._info = {"name": None, "key": spec.key(), "pid": os.getpid(), "node": socket.gethostname(),
                      "created_at": time.time(), "load_seconds": round(time.monotonic() - started, 3), "fits": 0}
        self._watch(idle_seconds)

    def address(self) -> str:
        """A free port on this node for the group's rendezvous (asked of rank 0)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return f"{ip}:{s.getsockname()[1]}"

    def join(self, master: str, rank: int, world: int, local_rank: int, local_world: int) -> None:
        """Join the group's process group: once, for every fit of the group's life."""
        import torch.distributed as dist

        backend = "nccl" if self.spec.gpus_per_worker else "gloo"
        # What a launcher (torchrun, Ray Train) sets and DeepSpeed reads. On GPUs Ray gives each trainer only
        # its own GPUs, which it sees from index 0.
        host, port = master.rsplit(":", 1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR=host, MASTER_PORT=port,
                          LOCAL_RANK="0" if self.spec.gpus_per_worker else str(local_rank),
                          LOCAL_WORLD_SIZE=str(local_world))
        # A collective waits at most this long for a peer; a lost peer is found sooner by the driver, which
        # then takes the whole group down.
        dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        self._rank = rank
        self._last = time.monotonic()

    def _base(self, path: str, dtype: Any) -> Any:
        key = (path, str(dtype))
        if key not in self._bases:
            self._bases = {key: load_base(path, dtype)}  # one base at a time: the run's student
        return copy.deepcopy(self._bases[key])

    def fit(self, cfg: dict[str, Any], rows: Any) -> dict[str, Any]:
        """One iteration's training. Rank 0 returns the saved folder's files with the metrics."""
        import ray

        entered = time.perf_counter()
        self._last = time.monotonic()
        assert self._rank is not None, "join() before fit()"
        import torch.distributed as dist

        config = TrainConfig.model_validate(cfg)
        try:
            metrics, save = fit_rank(config, rows, self._rank, dist.get_world_size(),
                                     ray.get_runtime_context().get_node_id(), entered, base=self._base,
                                     tokenized=self._tokenized)
            with tempfile.TemporaryDirectory(prefix="llm2llm-train-") as out:
                save(out)
                files = ({str(p.relative_to(out)): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
                         if self._rank == 0 else None)
        finally:
            gc.collect()  # the engine, its optimizer state and the model copy go before the next fit
            self._last = time.monotonic()
        self._info["fits"] += 1
        return {"metrics": metrics, "files": files}


def acquire(run_uid: str, spec: GroupSpec, env: dict[str, str]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The run's warm group for ``spec``: the live one if every rank answers and is of this spec, else a new
    one (the old one's live ranks killed first). Returns the handles in rank order and their infos."""
    import ray

    names = [actor_name(run_uid, spec, r) for r in range(spec.workers)]
    handles: list[Any] = []
    for name in names:
        try:
            handles.append(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            handles.append(None)
    if all(h is not None for h in handles):
        try:
            infos = ray.get([h.info.remote() for h in handles], timeout=60)
            if all(i["key"] == spec.key() for i in infos):
                return handles, [{**i, "reused": True} for i in infos]
        except Exception as err:  # noqa: BLE001 - a dead or wedged rank: the group is rebuilt
            log.warning("warm trainers of %s do not all answer (%s): rebuilding the group", run_uid, err)
    kill(handles, names)
    idle = float(os.environ.get(IDLE_SECONDS_ENV) or IDLE_SECONDS)
    started = time.monotonic()
    handles = [ray.remote(TrainerActor).options(
        name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=0, num_cpus=0,
        num_gpus=spec.gpus_per_worker,
        # Where Ray Train would have found room for the group: its resources, one rank per node where possible.
        scheduling_strategy=_placement(rank, spec.gpus_per_worker, spec.workers * (spec.gpus_per_worker or
                                                                                   spec.cpus_per_worker)),
    ).remote(spec, env, idle) for rank, name in enumerate(names)]
    infos = ray.get([h.info.remote(n) for h, n in zip(handles, names)])
    master = ray.get(handles[0].address.remote())
    nodes = [i["node"] for i in infos]
    ray.get([h.join.remote(master, rank, spec.workers, nodes[:rank].count(nodes[rank]), nodes.count(nodes[rank]))
             for rank, h in enumerate(handles)])
    log.info("warm trainers %s started in %.1fs on %s", spec.key(), time.monotonic() - started,
             ", ".join(i["node"] for i in infos))
    return handles, [{**i, "reused": False} for i in infos]


def kill(handles: list[Any], names: list[str]) -> None:
    import ray

    for handle in handles:
        if handle is not None:
            ray.kill(handle, no_restart=True)
    for name in names:
        _wait_gone(name)


def fit(run_uid: str, cfg: TrainConfig, rows_ref: Any, env: dict[str, str]) -> tuple[dict[str, Any], dict, list]:
    """Train on the run's warm group. Returns rank 0's metrics, the saved folder's files and the group's infos.
    A rank that fails or is lost fails the fit and takes the group down, so the retry starts a whole one."""
    import ray

    spec = GroupSpec.of(cfg)
    handles, infos = acquire(run_uid, spec, env)
    refs = [h.fit.remote(cfg.model_dump(mode="json"), rows_ref) for h in handles]
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except Exception:
            kill(handles, [actor_name(run_uid, spec, r) for r in range(spec.workers)])
            raise
    first = ray.get(refs[0])
    return first["metrics"], first["files"], infos
