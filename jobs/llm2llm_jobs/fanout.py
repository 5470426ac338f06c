"""Fan a stage out over Ray workers, and the functions those workers run.

Inference and teaching run as Ray tasks, one per replica, each with the GPUs its engine needs. A task
runs in a fresh worker process (``max_calls=1``) so an engine's memory is returned when it ends, and a
replica that crashes is retried by Ray (``max_retries``) without touching the other shards. A task may run
on another machine than the driver: it gets model names and storage locations, never the driver's paths.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import Any, Callable

import fsspec

from llm2llm.launch import API_KEY_ENDPOINTS_ENV
from llm2llm.spec import AugmentationRunSpec
from llm2llm.tasks import Task, teacher_answer

from . import verify

log = logging.getLogger(__name__)


def _call(path: str, kwargs: dict[str, Any]) -> Any:
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)(**kwargs)


def run_tasks(path: str, calls: list[dict[str, Any]], *, gpus: float = 0, cpus: float = 1, retries: int = 2,
              on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run ``module:function`` once per kwargs dict, in parallel Ray tasks when Ray is up; results in
    call order. ``on_result(i, result)`` runs here as each call finishes, so the caller can commit it at
    once: a stage that dies later loses none of the finished calls. Without Ray (unit tests, a plain
    process) the calls run here, one after another."""
    import ray

    if not ray.is_initialized():
        out = []
        for i, kw in enumerate(calls):
            out.append(_call(path, kw))
            if on_result is not None:
                on_result(i, out[-1])
        return out
    # max_calls is a decoration-time setting (Ray refuses it in .options()).
    remote = ray.remote(max_calls=1)(_call).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                                    retry_exceptions=False)
    refs = [remote.remote(path, kw) for kw in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending, error = refs, None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        i = index[ready[0]]
        try:
            results[i] = ray.get(ready[0])
        except Exception as err:
            # Let the other calls finish and be committed: a retried stage then redoes only this one.
            log.error("task %d of %s failed: %s", i, path, err)
            error = error or err
            continue
        if on_result is not None:
            on_result(i, results[i])
    if error is not None:
        raise error
    return results


@contextlib.contextmanager
def local_copy(location: str | None) -> Iterator[str | None]:
    """A folder of the run's storage (``RunStorage.uri``: a plain path when local) as a path this process can
    read: the folder itself on a local (shared) volume, else a private copy in this node's temp dir, removed
    on exit."""
    if location is None or "://" not in location:
        yield location
        return
    fs, path = fsspec.core.url_to_fs(location)
    with tempfile.TemporaryDirectory(prefix="llm2llm-fetch-") as tmp:
        dest = os.path.join(tmp, posixpath.basename(path.rstrip("/")))
        fs.get(path.rstrip("/"), dest, recursive=True)  # dest does not exist: it becomes the copy
        yield dest


def shards(items: list, n: int) -> list[list]:
    """Split into at most n contiguous, nearly equal, non-empty shards (order is kept)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for k in range(n):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return [s for s in out if s]


# --- worker functions ----------------------------------------------------------------------------

def infer_shard(model: str, prompts: list[str], adapter: str | None, max_tokens: int, backend: str,
                batch_size: int) -> tuple[list[str], str, dict[str, Any]]:
    """``model`` is a name for resolve_model (resolved on this node); ``adapter`` the trained folder's
    location in the run's storage (a path or URL), fetched here when it is not on a local volume. Returns the
    texts, the backend and the replica's ``Clock.figures()``."""
    from .clock import Clock
    from .infer import generate
    from .models import resolve_model

    clock = Clock()
    with local_copy(adapter) as adapter_path:
        texts, used = generate(resolve_model(model), prompts, adapter_path=adapter_path, max_tokens=max_tokens,
                               backend=backend, batch_size=batch_size, clock=clock)
    return texts, used, clock.figures()


def teach_shard(spec: dict, model_path: str | None, failures: list[dict], existing: list[str], held_out: list[str],
                iteration: int, shard: int, token_budget: int | None, api_key_env: str,
                examples: list[list[str]] | None = None, reply_format: str | None = None,
                engine: Any = None) -> dict[str, Any]:
    """Ask the teacher for samplesPerFailure new examples per failure, in bounded rounds: a failure whose
    candidates were all rejected is asked again, up to teacher.maxRounds. Returns GENERATED rows (every
    candidate, kept or not: the filter stage makes the final, deterministic call), token counts and the reply
    format used. ``examples``: the seed rows of the teacher's worked example (tasks.demonstration_rows).
    ``reply_format``: the format an earlier iteration of the run settled on (no need to ask the endpoint
    again); None: "json" when teacher.structuredOutput and the backend can constrain replies, else "text".
    ``engine``: the run's warm teacher engine (llm2llm_jobs.engines), instead of building one here."""
    from . import filter as flt
    from .clock import Clock, TimedTeacher
    from .teach import make_teacher

    run = AugmentationRunSpec.model_validate(spec)
    t = run.teacher
    task = Task(run.task, tuple((q, a) for q, a in examples or ()), keep_label=t.keep_label)
    # The key goes only where its owner pinned it (set beside the key, never by the run): see llm2llm.endpoints.
    api_key = os.environ.get(api_key_env) or None
    clock = Clock()
    with clock.engine():
        teacher = TimedTeacher(make_teacher(t, model_path, api_key, key_pins=os.environ.get(API_KEY_ENDPOINTS_ENV),
                                            engine=engine), clock)
    judge = flt.CandidateFilter(task, run.filters, t.samples_per_failure, existing=existing, held_out=held_out)
    need = {f["id"]: t.samples_per_failure for f in failures}
    rows: list[dict] = []
    prompt_tokens = completion_tokens = 0
    stopped = None
    try:
        fmt = reply_format or teacher.reply_format("json" if t.structured_output else "text")
        prompt_hash = task.prompt_hash(fmt)
        for round_ in range(t.max_rounds):
            pending = [f for f in failures if need[f["id"]] > 0]
            if not pending:
                break
            if token_budget is not None and prompt_tokens + completion_tokens >= token_budget:
                stopped = "TeacherBudget"
                break
            convs = [
                task.teacher_messages(f["input"], f["output"], need[f["id"]],
                                      f["prediction"] if t.show_student_answer else None, fmt)
                for f in pending
            ]
            schemas = ([task.reply_schema(need[f["id"]], run.filters.max_output_chars) for f in pending]
                       if fmt == "json" else None)
            # Rounds far apart: a failure asked again must not get the seed (and so the reply) it got before.
            seed = run.student.training.seed * 1_000_003 + iteration * 1009 + shard * 101 + round_ * 65_537
            outputs = teacher.complete(convs, n=1, temperature=t.temperature, top_p=t.top_p,
                                       max_tokens=t.max_tokens, seed=seed, schemas=schemas)
            fresh: list[tuple[str, dict]] = []
            for f, completions in zip(pending, outputs):
                for c in completions:
                    prompt_tokens += c.prompt_tokens
                    completion_tokens += c.completion_tokens
                    for cand in flt.candidates_from_completion(
                            c.text, f["id"], round_, t.model, prompt_hash, iteration, c.prompt_tokens,
                            c.completion_tokens, parse=lambda text, gold=f["output"]: task.parse_reply(text, fmt, gold)):
                        rows.append(cand)
                        fresh.append((f["id"], cand))
            if judge.needs_teacher_checks:
                # Only candidates that pass every other check cost check tokens; batched, one call per round.
                asked = [cand for _, cand in fresh if cand["parse_error"] is None
                         and judge.precheck(cand["input"], judge.clean(cand["output"])) is None]
                used = _teacher_checks(teacher, task, run, asked, fmt, seed + 7919)
                prompt_tokens += used[0]
                completion_tokens += used[1]
            for parent, cand in fresh:
                if cand["parse_error"] is None and judge.judge(parent, cand["input"], judge.clean(cand["output"]),
                                                               verify.load_checks(cand.get("checks"))) is None:
                    need[parent] -= 1
    finally:
        teacher.close()
    log.info("teach shard %d: %d candidates (%s replies), %d prompt + %d completion tokens", shard, len(rows), fmt,
             prompt_tokens, completion_tokens)
    return {**clock.figures(), "rows": rows, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "stopped": stopped,
            "reply_format": fmt}


def _teacher_checks(teacher: Any, task: Task, run: AugmentationRunSpec, cands: list[dict], fmt: str,
                    seed: int) -> tuple[int, int]:
    """filters.verify's teacher-side checks of ``cands``: each candidate's ``checks`` records what the teacher
    answered (the filter turns it into a verdict), and its token counts include the checking calls, so the
    rows' sums stay the shard's. Returns the (prompt, completion) tokens used."""
    from .verify import dump_checks

    if not cands:
        return 0, 0
    t, v = run.teacher, run.filters.verify
    if task.spec.kind == "gsm8k":
        # Sampled at the teacher's temperature: k greedy solutions would all be one.
        outs = teacher.complete([task.solve_messages(c["input"]) for c in cands], n=v.self_consistency,
                                temperature=t.temperature, top_p=t.top_p, max_tokens=t.max_tokens, seed=seed)
        record = [{"solutions": [teacher_answer(o.text) for o in out]} for out in outs]
    else:
        schemas = [task.label_schema()] * len(cands) if fmt == "json" else None
        outs = teacher.complete([task.label_messages(c["input"], fmt) for c in cands], n=1, temperature=0.0,
                                top_p=1.0, max_tokens=32, seed=seed, schemas=schemas)
        record = [{"label": task.parse_label(out[0].text, fmt)} for out in outs]
    used = [0, 0]
    for cand, out, checks in zip(cands, outs, record):
        cand["checks"] = dump_checks(checks)
        for o in out:
            cand["prompt_tokens"] += o.prompt_tokens
            cand["completion_tokens"] += o.completion_tokens
            used[0] += o.prompt_tokens
            used[1] += o.completion_tokens
    return used[0], used[1]
