"""Teacher backends behind one small interface: an in-process vLLM engine, HF generate, or any
OpenAI-compatible chat endpoint.

``complete`` takes chat conversations and returns ``n`` sampled completions per conversation, each with
its token usage (for lineage and the teacher-token budget). With ``schemas`` (one JSON schema per
conversation) the reply is constrained to the schema where the backend can do it: vLLM through structured
outputs, an OpenAI-compatible endpoint through ``response_format``. ``reply_format`` says which format a
backend will actually give, so the caller can prompt and parse accordingly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Protocol

from llm2llm import endpoints
from llm2llm.spec import TeacherSpec

from .infer import free_memory, has_cuda, load_hf, release_vllm, teacher_dtype

log = logging.getLogger(__name__)
# The one request that asks an OpenAI-compatible endpoint whether it honours a JSON-schema response_format
# (once per teach shard, in the first iteration that teaches; later iterations reuse the recorded answer).
PROBE_MESSAGE = 'Reply with {"items": []}'


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


def sample_seed(seed: int, conversation: int, sample: int, n: int) -> int:
    """The sampling seed of sample ``sample`` of conversation ``conversation`` in a call seeded ``seed``:
    distinct for every (conversation, sample) of the call."""
    return seed + conversation * n + sample


class TeacherUnavailable(RuntimeError):
    """The teacher could not answer after bounded retries (or at all); carries the last error."""


class TeacherAuthError(TeacherUnavailable):
    """The endpoint rejected the API key (401/403). Not retried: another try cannot fix it."""


class Teacher(Protocol):
    def reply_format(self, wanted: str) -> str:
        """"json" when ``wanted`` is "json" and this backend can constrain replies to a schema, else "text"."""
        ...

    def complete(self, conversations: list[list[dict]], *, n: int, temperature: float, top_p: float,
                 max_tokens: int, seed: int, schemas: list[dict] | None = None) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def vllm_engine_args(max_model_len: int) -> dict:
    """The teacher engine's vLLM settings (an in-process VllmTeacher and the run's warm engines alike)."""
    # On CPU, no chunked prefill: vLLM rewinds a seeded request's generator when it drops a token sampled
    # during a partial prefill, and a CPU torch.Generator has no offset ("CPU Generator does not use
    # offset"). Long teacher prompts (GSM8K's one-shot, ~500 tokens, 74 of them) hit it; short ones do not.
    extra = {} if has_cuda() else {"enable_chunked_prefill": False, "max_num_batched_tokens": max_model_len}
    # No free whitespace in JSON replies: a small model constrained to JSON otherwise spends its tokens on
    # newlines. vLLM reads this per engine only (a per-request disable_any_whitespace is ignored).
    structured = {"backend": "xgrammar", "disable_any_whitespace": True}
    return {"max_model_len": max_model_len, "structured_outputs_config": structured, **extra}


def sampling_params(conversations: int, *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int,
                    schemas: list[dict] | None = None) -> list[dict]:
    """One plain dict of sampling parameters per conversation (``vllm_sampling_params`` makes vLLM's own).
    Each conversation its own seed (sample_seed), and vLLM gives each of its n samples its own (seed + index):
    one seed for all would draw the same random numbers for every failure, and near-identical prompts would
    get identical replies."""
    per = schemas if schemas is not None else [None] * conversations
    return [{"n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
             "seed": sample_seed(seed, j, 0, n), "schema": schema} for j, schema in enumerate(per)]


def vllm_sampling_params(*, schema: dict | None = None, **params):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None if schema is None else StructuredOutputsParams(json=schema)
    return SamplingParams(structured_outputs=structured, **params)


def _completions(outs) -> list[list[Completion]]:
    return [[Completion(text, prompt, completion) for text, prompt, completion in out] for out in outs]


class VllmTeacher:
    """One in-process vLLM engine; all conversations go to ``LLM.chat`` in a single batched call."""

    def __init__(self, model_path: str, *, tensor_parallel: int = 1, max_model_len: int = 4096,
                 dtype: str | None = None):
        from vllm import LLM

        self._llm = LLM(model=model_path, dtype=dtype or teacher_dtype(), seed=0, tensor_parallel_size=tensor_parallel,
                        enforce_eager=not has_cuda(), **vllm_engine_args(max_model_len))

    def reply_format(self, wanted: str) -> str:
        return wanted

    def complete(self, conversations, *, n, temperature, top_p, max_tokens, seed, schemas=None):
        params = sampling_params(len(conversations), n=n, temperature=temperature, top_p=top_p,
                                 max_tokens=max_tokens, seed=seed, schemas=schemas)
        outs = self._llm.chat(conversations, [vllm_sampling_params(**p) for p in params], use_tqdm=False)
        return _completions([[(c.text, len(out.prompt_token_ids or []), len(c.token_ids)) for c in out.outputs]
                             for out in outs])

    def close(self) -> None:
        if self._llm is not None:
            release_vllm(self._llm)
            self._llm = None
            free_memory()


class EngineTeacher:
    """The run's warm vLLM engine (llm2llm_jobs.engines, a Ray actor) as the teacher: the same prompts, sampling
    and structured replies as VllmTeacher, without building an engine. ``close`` leaves it running."""

    def __init__(self, engine):
        self._engine = engine

    def reply_format(self, wanted: str) -> str:
        return wanted

    def complete(self, conversations, *, n, temperature, top_p, max_tokens, seed, schemas=None):
        import ray

        params = sampling_params(len(conversations), n=n, temperature=temperature, top_p=top_p,
                                 max_tokens=max_tokens, seed=seed, schemas=schemas)
        return _completions(ray.get(self._engine.chat.remote(conversations, params)))

    def close(self) -> None:
        pass


class HfTeacher:
    """Transformers ``generate`` with the model's chat template; batches of conversations, n samples each."""

    def __init__(self, model_path: str, *, batch_size: int = 8, dtype: str | None = None):
        self._tok, self._model = load_hf(model_path, None, dtype or teacher_dtype())
        self._batch_size = batch_size

    def reply_format(self, wanted: str) -> str:
        return "text"  # generate() has no schema constraint here: the text format and its parser

    def complete(self, conversations, *, n, temperature, top_p, max_tokens, seed, schemas=None):
        import torch

        if schemas is not None:
            raise ValueError("HfTeacher cannot constrain replies to a schema (reply_format is text)")

        tok, model, eos = self._tok, self._model, self._eos()
        torch.manual_seed(seed)
        sample = temperature > 0
        results: list[list[Completion]] = []
        for start in range(0, len(conversations), self._batch_size):
            texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in conversations[start : start + self._batch_size]]
            # The template already holds the special tokens; adding them again would double the BOS.
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            reps = n if sample else 1  # greedy samples are all the same: compute one, repeat it
            args = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_tokens, num_return_sequences=reps,
                                     pad_token_id=tok.pad_token_id, **args)
            new = out[:, enc["input_ids"].shape[1] :]
            prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
            for j, prompt_len in enumerate(prompt_lens):
                samples = []
                for ids in new[j * reps : (j + 1) * reps]:
                    ids = ids.tolist()
                    used = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
                    samples.append(Completion(tok.decode(ids[:used], skip_special_tokens=True), prompt_len, used))
                results.append(samples * (n // reps))
        return results

    def _eos(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) | {self._tok.eos_token_id}

    def close(self) -> None:
        self._model = None
        free_memory()


class OpenAITeacher:
    """An OpenAI-compatible chat endpoint with at most ``max_concurrency`` requests in flight.

    Retries (429, 408/409, 5xx, connection errors and timeouts, honouring Retry-After) are the openai
    client's own: exponential backoff from 0.5 s to 8 s, at most ``max_retries`` times per request. After
    that the request fails and so does the whole call, with ``TeacherUnavailable``: never an endless loop.
    One request per sample (n=1, seed+i): exact usage per sample, and servers without ``n`` support work.
    """

    def __init__(self, endpoint: str, model: str, api_key: str | None, *, key_pins: str | None = None,
                 max_concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 5):
        self.endpoint, self.model = endpoint, model
        why = endpoints.check(endpoint, key_pins) if api_key else None
        if why is not None:
            # Every request (the probe too) goes through _client(): a refused key is never sent, and the
            # requests go without one (an endpoint that needs it answers 401: TeacherAuthError, not retried).
            log.warning("teacher API key not sent to %s: %s", endpoint, why)
            api_key = None
        self._api_key = api_key  # from the caller only (a Secret-backed env var); never logged
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self._formats: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"OpenAITeacher(endpoint={self.endpoint!r}, model={self.model!r})"

    def reply_format(self, wanted: str) -> str:
        """Asks the endpoint once (one request of a few tokens) whether it honours a JSON-schema
        ``response_format``: many OpenAI-compatible servers refuse it (400/422) or ignore it. Remembered."""
        if wanted != "json":
            return "text"
        if wanted not in self._formats:
            self._formats[wanted] = asyncio.run(self._probe())
        return self._formats[wanted]

    async def _probe(self) -> str:
        import openai

        schema = {"type": "object", "properties": {"items": {"type": "array", "maxItems": 0}},
                  "required": ["items"], "additionalProperties": False}
        async with self._client() as client:
            try:
                r = await client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": PROBE_MESSAGE}],
                    max_tokens=16, temperature=0, response_format=_response_format(schema))
            except (openai.BadRequestError, openai.UnprocessableEntityError, openai.NotFoundError) as err:
                log.info("teacher endpoint %s refuses JSON-schema replies (%s): text format", self.endpoint,
                         type(err).__name__)
                return "text"
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise TeacherAuthError(f"teacher endpoint {self.endpoint} rejected the API key: {err}") from err
            except openai.APIError as err:
                raise TeacherUnavailable(f"teacher endpoint {self.endpoint} failed: {type(err).__name__}: {err}") from err
        try:
            ok = json.loads(r.choices[0].message.content or "") == {"items": []}
        except ValueError:
            ok = False
        if not ok:
            log.info("teacher endpoint %s ignores JSON-schema response_format: text format", self.endpoint)
        return "json" if ok else "text"

    def _client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.endpoint, api_key=self._api_key or "EMPTY",
                                  max_retries=self.max_retries, timeout=self.timeout_s)

    def complete(self, conversations, *, n, temperature, top_p, max_tokens, seed, schemas=None):
        # A fresh client per call: an async client is bound to the event loop that asyncio.run creates.
        return asyncio.run(self._complete(conversations, n, temperature, top_p, max_tokens, seed, schemas))

    async def _complete(self, conversations, n, temperature, top_p, max_tokens, seed, schemas):
        import openai

        client = self._client()
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(messages: list[dict], sample_seed: int, schema: dict | None) -> Completion:
            extra = {} if schema is None else {"response_format": _response_format(schema)}
            async with gate:
                r = await client.chat.completions.create(model=self.model, messages=messages, n=1,
                                                         temperature=temperature, top_p=top_p,
                                                         max_tokens=max_tokens, seed=sample_seed, **extra)
            usage = r.usage
            return Completion(r.choices[0].message.content or "", usage.prompt_tokens if usage else 0,
                              usage.completion_tokens if usage else 0)

        per = schemas if schemas is not None else [None] * len(conversations)
        tasks = [asyncio.ensure_future(one(c, sample_seed(seed, j, i, n), sch))
                 for j, (c, sch) in enumerate(zip(conversations, per)) for i in range(n)]
        try:
            flat = await asyncio.gather(*tasks)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise TeacherAuthError(f"teacher endpoint {self.endpoint} rejected the API key: {err}") from err
        except openai.APIError as err:
            raise TeacherUnavailable(
                f"teacher endpoint {self.endpoint} failed after up to {self.max_retries} retries: "
                f"{type(err).__name__}: {err}") from err
        finally:
            for t in tasks:  # on failure, stop the requests still queued or in flight
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
        return [flat[k * n : (k + 1) * n] for k in range(len(conversations))]

    def close(self) -> None:
        pass


def _response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "teacher_reply", "schema": schema, "strict": True}}


def make_teacher(spec: TeacherSpec, model_path: str | None, api_key: str | None, *,
                 key_pins: str | None = None, engine=None) -> Teacher:
    """The teacher ``spec`` asks for. ``model_path`` is the local folder for vllm/hf (resolved from
    ``spec.model`` when None); ``api_key`` is for openai only, sent only to an endpoint ``key_pins`` allows;
    ``engine``: the run's warm engine for a vllm teacher (llm2llm_jobs.engines), used instead of a new one."""
    if engine is not None and spec.kind == "vllm":
        return EngineTeacher(engine)
    if spec.kind == "openai":
        if not spec.endpoint:
            raise ValueError("teacher.endpoint is required when teacher.kind is openai")
        return OpenAITeacher(spec.endpoint, spec.model, api_key, key_pins=key_pins,
                             max_concurrency=spec.max_concurrency, timeout_s=spec.request_timeout_seconds)
    if model_path is None:
        from .models import resolve_model

        model_path = resolve_model(spec.model)
    if spec.kind == "vllm":
        return VllmTeacher(model_path, tensor_parallel=spec.tensor_parallel)
    return HfTeacher(model_path)
