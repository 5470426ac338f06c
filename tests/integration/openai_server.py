"""OpenAI-compatible servers for the teacher tests, run as real processes on 127.0.0.1.

- ``vllm_server``: vLLM's own OpenAI API server on the real SmolLM2 (no fault injection).
- This file's FastAPI app (``OPENAI_SERVER_API_KEY=K python openai_server.py --model DIR --port P``): real SmolLM2
  chat completions through transformers (chat template, sampling, usage counts), plus what the tests
  need to observe the client: ``GET /stats`` (requests, faults, max requests in flight) and
  ``POST /admin/faults`` (answer the next ``count`` chat requests with ``status``, ``-1`` = always,
  optionally with a Retry-After header), ``{"refuse_response_format": true}`` (400 to any request with a
  ``response_format``; otherwise the server ignores that field, as many do), ``{"hold": [TEXT, ...]}`` (keep every chat request whose last message
  contains one of the TEXTs in flight, unanswered, until the hold is lifted with ``{"hold": null}``). ``/stats`` also
  lists each admitted request's last message (``prompts``) and counts the requests held now (``held``).
  Admin endpoints need no key: test use only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

# Module level: FastAPI resolves the handlers' (string) annotations in this module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, log_path: Path, *, timeout_s: float = 240,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``cmd``, wait until GET /health answers, yield the base URL (…/v1), then stop it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server not up in {timeout_s}s:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def vllm_server(model: str, api_key: str, log_path: Path, *,
                served_name: str = "teacher") -> contextlib.AbstractContextManager[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager", "--seed", "0", "--disable-uvicorn-access-log",
           # As docs/teacher.md advises for a teacher server: JSON replies without free whitespace.
           "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    return server_process(cmd, port, log_path, env={"VLLM_API_KEY": api_key})


def fastapi_server(model: str, api_key: str, log_path: Path) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", model, "--port", str(port)]
    return server_process(cmd, port, log_path, env={"OPENAI_SERVER_API_KEY": api_key})


# --- the FastAPI app -----------------------------------------------------------------------------

def build_app(model_path: str, api_key: str) -> FastAPI:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    gen_lock = threading.Lock()  # one generate at a time; requests still overlap while they wait
    stats = {"unauthorized": 0, "requests": 0, "faults": 0, "completed": 0, "in_flight": 0, "max_in_flight": 0,
             "held": 0, "prompts": []}
    faults = {"status": 0, "count": 0, "retry_after": None, "hold": None, "refuse_response_format": False}
    app = FastAPI()

    def error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

    def generate(messages: list[dict], n: int, temperature: float, top_p: float, max_tokens: int, seed):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        sample = temperature > 0
        args = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
        with gen_lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**enc, max_new_tokens=max_tokens, num_return_sequences=n if sample else 1,
                                 pad_token_id=tok.pad_token_id, **args)
        prompt_len = enc["input_ids"].shape[1]
        choices, used_total = [], 0
        for i, ids in enumerate(out[:, prompt_len:].tolist() * (1 if sample else n)):
            used = next((k + 1 for k, t in enumerate(ids) if t == tok.eos_token_id), len(ids))
            finish = "stop" if used < len(ids) or ids[-1] == tok.eos_token_id else "length"
            content = tok.decode(ids[:used], skip_special_tokens=True)
            choices.append({"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": finish})
            used_total += used
        return choices, prompt_len, used_total

    def held(text: str) -> bool:
        return any(h in text for h in faults["hold"] or [])

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/stats")
    async def get_stats():
        return stats

    @app.post("/admin/faults")
    async def set_faults(req: Request):
        faults.update(await req.json())
        return faults

    @app.post("/admin/reset")
    async def reset():
        stats.update(unauthorized=0, requests=0, faults=0, completed=0, max_in_flight=stats["in_flight"], prompts=[])
        faults.update(status=0, count=0, retry_after=None, hold=None, refuse_response_format=False)
        return stats

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "teacher", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        if req.headers.get("authorization") != f"Bearer {api_key}":
            stats["unauthorized"] += 1
            return error(401, "Incorrect API key provided.", "invalid_api_key")
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            if faults["count"] != 0:
                faults["count"] -= 1 if faults["count"] > 0 else 0
                stats["faults"] += 1
                await asyncio.sleep(0.05)  # a little service time, so concurrent faults overlap as well
                headers = {"retry-after": str(faults["retry_after"])} if faults["retry_after"] is not None else None
                return error(faults["status"], f"injected fault {faults['status']}", "injected", headers)
            body = await req.json()
            if body.get("response_format") and faults.get("refuse_response_format"):
                # What many OpenAI-compatible servers answer to a JSON-schema response_format.
                return error(400, "response_format is not supported by this server", "unsupported_parameter")
            last = body["messages"][-1]["content"]
            stats["prompts"].append(last)
            if held(last):
                # Held in flight, so a test can act (kill the client, say) while this request is open.
                stats["held"] += 1
                try:
                    while held(last):
                        await asyncio.sleep(0.05)
                finally:
                    stats["held"] -= 1
            choices, prompt_tokens, completion_tokens = await asyncio.to_thread(
                generate, body["messages"], int(body.get("n") or 1), float(body.get("temperature", 1.0)),
                float(body.get("top_p", 1.0)), int(body.get("max_tokens") or body.get("max_completion_tokens") or 64),
                body.get("seed"))
            stats["completed"] += 1
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "teacher"), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }
        finally:
            stats["in_flight"] -= 1

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The key comes by environment, not argv (which any local user can read).
    app = build_app(args.model, os.environ["OPENAI_SERVER_API_KEY"])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
