"""One LLM2LLM iteration: the Ray job entrypoint.

    python -m llm2llm_jobs.iteration --run <base64 JSON {name, uid, spec}> --iteration I --attempt A

Stages run in order: prepare, train, infer, score, teach, filter, merge. Each writes its files, then its
``_DONE.json`` marker; a re-run (a retried attempt) skips every stage whose marker exists, so a finished
training is never redone. The iteration's figures go last into ``iter-<i>/_ITERATION.json``, which is
what the operator and the local runner read.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from llm2llm.data import load_examples
from llm2llm.launch import API_KEY_ENV, decode_run
from llm2llm.planner import stop_reason
from llm2llm.schemas import DATASET, GENERATED, PREDICTIONS, SCORED, table
from llm2llm.spec import AugmentationRunSpec, spec_to_wire
from llm2llm.status import IterationStatus, TokenCounts, now
from llm2llm.storage import RunStorage, StorageError, fsync_dir
from llm2llm.tasks import Task, demonstration_rows

from . import clock, fanout
from . import filter as flt
from . import select as sel

log = logging.getLogger("llm2llm_jobs.iteration")


class Iteration:
    def __init__(self, name: str, uid: str, spec: AugmentationRunSpec, index: int, attempt: int, scratch: Path):
        self.name, self.uid, self.spec, self.i, self.attempt = name, uid, spec, index, attempt
        self.store = RunStorage(spec.output, name)
        self.task = Task(spec.task)
        self.scratch = scratch
        self.timings: dict[str, float] = {}
        self._pending: dict[str, Any] = {}  # engines started before training, by actor name (_prestart_engines)

    # --- helpers -----------------------------------------------------------------------------
    def _stage(self, stage: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a stage unless its marker exists; the marker (with the stage's figures) is the commit."""
        done = self.store.stage_done(self.i, stage)
        if done is not None:
            log.info("iteration %d: %s already done, skipping", self.i, stage)
            return done
        log.info("iteration %d: %s started", self.i, stage)
        t0 = time.monotonic()
        info = fn()
        info["seconds"] = round(time.monotonic() - t0, 3)
        info["attempt"] = self.attempt
        info["finished_at"] = now()
        self.store.mark_done(self.i, stage, info)
        log.info("iteration %d: %s done in %.1fs", self.i, stage, info["seconds"])
        return info

    def _path(self, stage: str, file: str) -> str:
        return f"{self.store.stage_dir(self.i, stage)}/{file}"

    def _train_table(self) -> pa.Table:
        if self.i == 0:
            return self.store.read_table(self.store.path("data", "seed.parquet"), DATASET)
        return self.store.read_table(f"{self.store.stage_dir(self.i - 1, 'merge')}/train.parquet", DATASET)

    def _gpus(self) -> int:
        return self.spec.student.gpus_per_worker

    # --- stages ------------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.i == 0:
            d = self.spec.data
            seed = load_examples(d.seed, d.input_field, d.output_field, "seed", d.seed_limit, task=self.spec.task)
            self.store.write_table(self.store.path("data", "seed.parquet"), seed)
            info["seed_rows"] = seed.num_rows
            if d.test:
                test = load_examples(d.test, d.input_field, d.output_field, "test", d.test_limit, task=self.spec.task)
                self.store.write_table(self.store.path("data", "test.parquet"), test)
                info["test_rows"] = test.num_rows
        info["train_rows"] = self._train_table().num_rows
        return info

    def train(self) -> dict[str, Any]:
        from .train import TrainConfig, run_train

        rows = self._train_table()
        pairs = pa.table(
            {
                "prompt": [self.task.prompt(x) for x in rows.column("input").to_pylist()],
                "target": [self.task.target(y) for y in rows.column("output").to_pylist()],
            }
        )
        stage = self.store.stage_dir(self.i, "train")
        # No marker yet, so anything here is an earlier attempt's: Ray Train folders, a half-moved or half-put model.
        self.store.remove(stage)
        # Ray Train's records and checkpoint go to the run's storage, which the driver and every worker reach
        # (not the driver's scratch); a folder per attempt keeps a dying attempt's workers apart from this one.
        ray_parts = (f"iter-{self.i}", "train", f"_ray-a{self.attempt}")
        # Local: assembled next to its final place and renamed there (atomic). Object store (no rename): put from
        # the driver's scratch into a prefix of this attempt's own, so an earlier attempt's late or torn uploads
        # never mix into it; the marker names it (model_dir) and readers take it from there (trained_model).
        model_dir = "model" if self.store.is_local else f"model-a{self.attempt}"
        remote = self._path("train", model_dir)
        out = f"{stage}/.model-a{self.attempt}" if self.store.is_local else str(self.scratch / "train-model")
        import ray

        warm = self.uid if self.spec.ray.keep_warm and ray.is_initialized() else None  # the run's warm trainers
        result = run_train(TrainConfig.from_spec(self.spec.student, out, self.store.uri(*ray_parts)), pairs,
                           warm_run=warm)
        if self.store.is_local:
            try:
                os.rename(out, remote)  # atomic: a half-copied model can never sit behind a marker
                fsync_dir(stage)
            except OSError as err:
                raise StorageError(f"cannot write {remote}: {err}") from err
        else:
            self.store.put_folder(out, remote)  # every file at its key, then checked against the scratch copy
        # Before the marker: once the stage is committed, no later attempt would remove these.
        try:
            self.store.remove(self.store.path(*ray_parts))
        except StorageError as err:  # only space is at stake; the model is in place
            log.warning("could not remove Ray Train's folder %s: %s", self.store.path(*ray_parts), err)
        for name in self.store.list(stage):  # an earlier attempt's upload that landed after the removal above
            if name.startswith("model-a") and name != model_dir:
                self.store.remove(f"{stage}/{name}")
        return {"rows": rows.num_rows, "model": self.store.uri(f"iter-{self.i}", "train", model_dir),
                "model_dir": model_dir, **_dump(result)}

    def infer(self) -> dict[str, Any]:
        # The model's name and the adapter's storage location travel, not this machine's paths: each task
        # resolves the model and fetches the adapter on its own node.
        adapter = self.store.trained_model(self.i)
        rows = self._infer_rows()
        inf = self.spec.infer
        parts = fanout.shards(rows, inf.replicas)
        prompts = [[self.task.prompt(r["input"]) for _, r in part] for part in parts]
        warm = self._engines("student", len(parts))
        if warm is not None:
            # The run's warm base-model engines, each loading this iteration's adapter.
            handles, used = warm
            import ray

            got = ray.get([h.generate.remote(p, inf.max_tokens, adapter) for h, p in zip(handles, prompts)])
            results = [(texts, "vllm", {"generate_spans": [span], "engine_seconds": _started(info)})
                       for (texts, span), info in zip(got, used)]
        else:
            results = fanout.run_tasks(
                "llm2llm_jobs.fanout:infer_shard",
                [dict(model=self.spec.student.model, prompts=p, adapter=adapter, max_tokens=inf.max_tokens,
                      backend=inf.backend, batch_size=inf.batch_size) for p in prompts],
                gpus=1 if self._gpus() else 0,
            )
            used = []
        out = []
        for part, (texts, backend, _) in zip(parts, results):
            out += [{"id": r["id"], "split": split, "input": r["input"], "output": r["output"], "prediction": t,
                     "iteration": self.i, "backend": backend} for (split, r), t in zip(part, texts)]
        preds = table(out, PREDICTIONS)
        self.store.write_table(self._path("infer", "predictions.parquet"), preds)
        return {"rows": preds.num_rows, "replicas": len(parts), "backend": ",".join(sorted({r[1] for r in results})),
                **clock.stage_figures([r[2] for r in results]), **({"engines": used} if used else {})}

    def _infer_rows(self) -> list[tuple[str, dict[str, Any]]]:
        """(split, row) for every seed row, then every test row: what failure inference predicts."""
        rows = [("seed", r) for r in self.store.read_table(self.store.path("data", "seed.parquet"), DATASET).to_pylist()]
        if self.spec.data.test:
            test = self.store.read_table(self.store.path("data", "test.parquet"), DATASET)
            rows += [("test", r) for r in test.to_pylist()]
        return rows

    def score(self) -> dict[str, Any]:
        preds = self.store.read_table(self._path("infer", "predictions.parquet"), PREDICTIONS)
        scored, metrics = flt.score(self.task, preds)
        self.store.write_table(self._path("score", "scored.parquet"), scored)
        return metrics

    def teach(self, scored: pa.Table, train_rows: pa.Table) -> dict[str, Any]:
        t = self.spec.teacher
        # Failures (LLM2LLM) or, with loop.select random, randomly drawn seed examples: see select.py.
        failures = self._selected(scored)
        existing, held_out = train_rows.column("input").to_pylist(), self._held_out_inputs()
        budget = self._teacher_budget_left()
        groups = fanout.shards(failures, t.replicas)
        share = None if budget is None else budget // max(len(groups), 1)
        # Each replica's output is its own committed file: a retried job redoes only missing shards.
        todo = [k for k in range(len(groups)) if not self.store.exists(self._path("teach", f"shard-{k}.json"))]
        ran: list[dict[str, Any]] = []  # the timings of the shards this attempt ran (clock.stage_figures)
        warm = self._engines("teacher", len(todo)) if todo else None
        handles, used = warm if warm is not None else ([None] * len(todo), [])

        def commit(j: int, res: dict[str, Any]) -> None:
            # As each shard finishes, not after all: a job that dies while another shard still runs keeps it.
            ran.append(res)
            k = todo[j]
            self.store.write_table(self._path("teach", f"shard-{k}.parquet"), table(res.pop("rows"), GENERATED))
            self.store.write_json(self._path("teach", f"shard-{k}.json"), res)  # the shard's commit marker

        fanout.run_tasks(
            "llm2llm_jobs.fanout:teach_shard",
            # model_path None: each task resolves teacher.model on its own node.
            [dict(spec=self.spec.model_dump(mode="json", by_alias=True), model_path=None, failures=groups[k],
                  existing=existing, held_out=held_out, iteration=self.i, shard=k, token_budget=share,
                  api_key_env=API_KEY_ENV, examples=[list(e) for e in self._demonstration()],
                  reply_format=self._known_reply_format(), engine=h) for k, h in zip(todo, handles)],
            # An OpenAI-compatible teacher runs elsewhere, a warm engine holds its own: no GPU for the shard.
            gpus=t.tensor_parallel if self._gpus() and t.kind != "openai" and warm is None else 0, on_result=commit,
        )
        rows, totals = [], {"prompt_tokens": 0, "completion_tokens": 0, "stopped": None, "reply_format": None}
        for k in range(len(groups)):
            rows.append(self.store.read_table(self._path("teach", f"shard-{k}.parquet"), GENERATED))
            res = self.store.read_json(self._path("teach", f"shard-{k}.json"))
            totals["prompt_tokens"] += res["prompt_tokens"]
            totals["completion_tokens"] += res["completion_tokens"]
            totals["stopped"] = totals["stopped"] or res["stopped"]
            totals["reply_format"] = totals["reply_format"] or res.get("reply_format")
        gen = pa.concat_tables(rows) if rows else GENERATED.empty_table()
        self.store.write_table(self._path("teach", "generated.parquet"), gen)
        figures = clock.stage_figures(ran)
        if used:  # a warm engine's start is the stage's engine time (the shards' own is 0)
            figures["engine_seconds"] = max(_started(info) for info in used)
        return {"failures": _seed_failures(scored), "selected": len(failures), "replicas": len(groups),
                "candidates": gen.num_rows, **totals, **figures, **({"engines": used} if used else {})}

    def _engines(self, role: str, replicas: int) -> tuple[list[Any], list[dict[str, Any]]] | None:
        """The run's warm engines for ``role`` (student: failure inference with the iteration's LoRA adapter;
        teacher), one per replica, or None when this stage builds its own engines as before: ray.keepWarm off,
        no Ray, another backend, or a full fine-tune (no adapter to load into a base engine)."""
        import ray

        spec = engine_spec(self.spec, role)
        if spec is None or not ray.is_initialized():
            return None
        from . import engines

        gpus = self._engine_gpus(role, spec)
        try:
            got = [engines.acquire(self.uid, spec, k, gpus=gpus,
                                   pending=self._pending.pop(engines.actor_name(self.uid, spec, k), None))
                   for k in range(replicas)]
        except Exception as err:  # noqa: BLE001 - an engine that cannot start: the stage's own backends decide
            if role == "student" and self.spec.infer.backend == "auto":
                log.warning("no warm vLLM engine (%s): %s; failure inference builds its own", type(err).__name__, err)
                return None
            raise
        return [h for h, _ in got], [{k: v for k, v in info.items() if k != "key"} for _, info in got]

    def _engine_gpus(self, role: str, spec: Any) -> int:
        return (1 if role == "student" else spec.tensor_parallel) if self._gpus() else 0

    def _prestart_engines(self) -> None:
        """Start the warm engines this iteration's infer and teach stages will ask for, unless the run has them
        already: each loads in its own process while the train stage runs (a cold start of the 1.5B teacher and the
        student's engine is about 90 s on 2 CPU cores, paid once per run but, before this, after training, in
        series). The teacher's are skipped on the run's last iteration, which teaches nothing. Best effort: an
        engine that cannot start now is started by its stage, as before."""
        import ray

        if not ray.is_initialized():
            return
        from . import engines

        wanted: dict[str, tuple[Any, int, int]] = {}
        if self.store.stage_done(self.i, "infer") is None and (spec := engine_spec(self.spec, "student")) is not None:
            for k in range(len(fanout.shards(self._infer_rows(), self.spec.infer.replicas))):
                wanted.setdefault(engines.actor_name(self.uid, spec, k), (spec, k, self._engine_gpus("student", spec)))
        may_teach = self.i + 1 < self.spec.loop.max_iterations
        if may_teach and self.store.stage_done(self.i, "teach") is None:
            if (spec := engine_spec(self.spec, "teacher")) is not None:
                for k in range(self.spec.teacher.replicas):
                    wanted.setdefault(engines.actor_name(self.uid, spec, k), (spec, k, self._engine_gpus("teacher", spec)))
        for name, (spec, k, gpus) in wanted.items():
            try:
                handle = engines.start(self.uid, spec, k, gpus=gpus)
            except Exception as err:  # noqa: BLE001 - the stage that needs it starts it (and reports why not)
                log.warning("engine %s not started early: %s", name, err)
                continue
            if handle is not None:
                self._pending[name] = handle

    def filter(self, train_rows: pa.Table) -> dict[str, Any]:
        gen = self.store.read_table(self._path("teach", "generated.parquet"), GENERATED)
        cf = flt.CandidateFilter(self.task, self.spec.filters, self.spec.teacher.samples_per_failure,
                                 existing=train_rows.column("input").to_pylist(), held_out=self._held_out_inputs(),
                                 existing_ids=train_rows.column("id").to_pylist())
        cap = sel.round_cap(self.spec.loop, self.i)
        if cap is not None:  # loop.rowsPerRound: keep the rows of the first-selected seed examples
            scored = self.store.read_table(self._path("score", "scored.parquet"), SCORED)
            gen = table(sel.in_selection_order(gen.to_pylist(), self._selected(scored)), GENERATED)
        kept, rejected, reasons = flt.filter_candidates(cf, gen, self.spec.teacher.model, self.task.prompt_hash(), self.i,
                                                        cap=cap)
        self.store.write_table(self._path("filter", "kept.parquet"), kept)
        self.store.write_table(self._path("filter", "rejected.parquet"), rejected)
        generated = gen.num_rows
        return {"generated": generated, "kept": kept.num_rows, "rejected": reasons}

    def merge(self, train_rows: pa.Table) -> dict[str, Any]:
        kept = self.store.read_table(self._path("filter", "kept.parquet"), DATASET)
        merged = pa.concat_tables([train_rows, kept])
        ids = merged.column("id").to_pylist()
        if len(set(ids)) != len(ids):
            raise RuntimeError("merge would duplicate rows: the filter must have dropped them")
        self.store.write_table(self._path("merge", "train.parquet"), merged)
        return {"rows": merged.num_rows, "added": kept.num_rows}

    def _selected(self, scored: pa.Table) -> list[dict[str, Any]]:
        """The scored seed rows the teacher is asked about this round (deterministic given the seed)."""
        seed_rows = scored.filter(pc.equal(scored["split"], "seed")).to_pylist()
        return sel.select_seed_rows(seed_rows, self.spec.loop, self.spec.teacher.samples_per_failure,
                                    self.spec.student.training.seed, self.i)

    def _demonstration(self) -> tuple[tuple[str, str], ...]:
        """The seed rows of the teacher's worked example: the same for every iteration and shard of a run."""
        seed = self.store.read_table(self.store.path("data", "seed.parquet"), DATASET)
        rows = list(zip(seed.column("input").to_pylist(), seed.column("output").to_pylist()))
        return demonstration_rows(self.spec.task, rows, self.spec.student.training.seed)

    def _known_reply_format(self) -> str | None:
        """The reply format an earlier iteration settled on, so an endpoint is asked once per run."""
        if not self.spec.teacher.structured_output:
            return "text"
        return next((it.teacher_reply_format for it in reversed(self.store.iterations().values())
                     if it.teacher_reply_format), None)

    def _held_out_inputs(self) -> list[str]:
        if not (self.spec.data.test and self.spec.filters.decontaminate):
            return []
        return self.store.read_table(self.store.path("data", "test.parquet"), DATASET).column("input").to_pylist()

    def _teacher_budget_left(self) -> int | None:
        cap = self.spec.budget.teacher_tokens
        if cap is None:
            return None
        used = sum(it.tokens.teacher_prompt + it.tokens.teacher_completion for it in self.store.iterations().values())
        return max(cap - used, 0)

    # --- the iteration -----------------------------------------------------------------------
    def run(self) -> IterationStatus:
        existing = self.store.iteration(self.i)
        if existing is not None:
            log.info("iteration %d already committed; nothing to do", self.i)
            return existing
        previous = self.store.iterations()
        if len(previous) != self.i:
            raise RuntimeError(f"iteration {self.i} cannot start: {len(previous)} iteration(s) committed")
        if self.i == 0 and self.store.run_record() is None:
            self.store.write_run_record(self.name, self.uid, spec_to_wire(self.spec))
        started = now()
        prep = self._stage("prepare", self.prepare)
        self._prestart_engines()
        train = self._stage("train", self.train)
        self._stage("infer", self.infer)
        sc = self._stage("score", self.score)
        it = IterationStatus(
            index=self.i, attempt=self.attempt, train_rows=prep["train_rows"], train_steps=train.get("steps", 0),
            train_loss=train.get("loss"), seed_accuracy=sc.get("seed_accuracy"), test_accuracy=sc.get("test_accuracy"),
            failures=sc.get("seed_failures", 0), tokens_per_second=train.get("tokens_per_second"), mfu=train.get("mfu"),
            gpu_seconds=train.get("gpu_seconds", 0.0),
            started_at=started,
        )
        it.tokens = TokenCounts(trained=train.get("tokens", 0))
        reason = stop_reason(self.spec, [*previous.values(), it])
        if reason is None:
            train_rows = self._train_table()
            scored = self.store.read_table(self._path("score", "scored.parquet"), SCORED)
            teach = self._stage("teach", lambda: self.teach(scored, train_rows))
            filt = self._stage("filter", lambda: self.filter(train_rows))
            self._stage("merge", lambda: self.merge(train_rows))
            it.generated, it.kept, it.rejected = filt["generated"], filt["kept"], filt["rejected"]
            it.tokens.teacher_prompt = teach.get("prompt_tokens", 0)
            it.tokens.teacher_completion = teach.get("completion_tokens", 0)
            it.gpu_seconds += teach.get("gpu_seconds", 0.0)
            it.teacher_reply_format = teach.get("reply_format")
            if teach.get("stopped"):
                it.stop_reason = teach["stopped"]
            elif it.kept == 0 and it.failures > 0:
                # Another iteration would retrain on exactly this data (teach already asked up to
                # teacher.maxRounds times): stop, and say why the candidates were refused.
                it.stop_reason = "NoNewData"
        else:
            it.stop_reason = reason
        for stage in ("prepare", "train", "infer", "score", "teach", "filter", "merge"):
            marker = self.store.stage_done(self.i, stage)
            if marker is not None:
                it.seconds[stage] = marker["seconds"]
                it.datasets[stage] = self.store.uri(f"iter-{self.i}", stage)
        it.finished_at = now()
        self.store.write_iteration(it)
        if it.stop_reason is not None:
            self._release_engines()  # the run ends with this iteration: its warm engines go
        return it

    def _release_engines(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        from . import engines

        try:
            gone = engines.release(self.uid)
        except Exception as err:  # noqa: BLE001 - the iteration is committed; idle engines exit on their own
            log.warning("could not remove the run's engines (they exit after %s s idle): %s",
                        engines.IDLE_SECONDS, err)
            return
        if gone:
            log.info("removed the run's engines: %s", ", ".join(gone))


def engine_spec(spec: AugmentationRunSpec, role: str):
    """The warm engine a stage of this run uses (llm2llm_jobs.engines.EngineSpec), or None. A teacher that is the
    student's model shares the student's engine, in its dtype (float32 on CPU: slower sampling than bf16 where
    that is native, but one engine's memory and start instead of two)."""
    from .engines import EngineSpec
    from .infer import lora_rank

    if not spec.ray.keep_warm:
        return None
    st = spec.student
    student = None
    if spec.infer.backend in ("auto", "vllm") and st.method == "lora":
        student = EngineSpec(model=st.model, dtype="student", max_lora_rank=lora_rank(st.lora.r))
    if role == "student":
        return student
    t = spec.teacher
    if t.kind != "vllm":
        return None
    teacher = EngineSpec(model=t.model, dtype="teacher", tensor_parallel=t.tensor_parallel)
    if student is not None and (teacher.model, teacher.tensor_parallel) == (student.model, student.tensor_parallel):
        return student
    return teacher


def _started(info: dict[str, Any]) -> float:
    """Seconds this stage waited for its engine to start: none when it was already up, what was left of its load
    when it was started early."""
    if info.get("reused"):
        return 0.0
    if info.get("prestarted"):
        return float(info.get("waited_seconds") or 0.0)
    return float(info.get("load_seconds") or 0.0)


def _seed_failures(scored: pa.Table) -> int:
    return scored.filter(pc.and_(pc.equal(scored["split"], "seed"), pc.invert(scored["correct"]))).num_rows


def _dump(result: Any) -> dict[str, Any]:
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    if hasattr(result, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(result)
    return dict(result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llm2llm_jobs.iteration", description=__doc__.split("\n")[1])
    p.add_argument("--run", required=True, help="base64 JSON {name, uid, spec} (see encode_run)")
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument("--attempt", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name, uid, spec = decode_run(args.run)
    if os.environ.get("RAY_ADDRESS"):
        import ray

        # Inside a Ray job: join the cluster so training and the engines run on its workers.
        ray.init(log_to_driver=True)
    # A killed attempt cannot clean up after itself: a later attempt of the same run and iteration removes what
    # earlier ones left. Only earlier ones: the planner starts an attempt only once the one before is gone, and
    # an attempt never touches a later one's scratch (the uid keeps other runs' folders apart).
    prefix = f"llm2llm-{name}-{uid[:8]}-i{args.iteration}-"
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}a*-*"):
        attempt = stale.name[len(prefix) + 1:].split("-", 1)[0]
        if attempt.isdigit() and int(attempt) < args.attempt:
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}a{args.attempt}-"))
    try:
        it = Iteration(name, uid, spec, args.iteration, args.attempt, scratch).run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("iteration %d committed: %s", it.index, it.model_dump_json(by_alias=True, exclude_none=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
