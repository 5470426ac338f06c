"""Teacher fan-out efficiency against a local OpenAI-compatible server with a fixed latency.

    .venv/bin/python -m bench.teacher_fanout [--latency 0.2] [--server-limit 8] [--waves 10]

A small aiohttp server on 127.0.0.1 answers /v1/chat/completions after exactly ``--latency`` seconds of
(sleeping) service time, at most ``--server-limit`` requests in service at once (more wait in its
queue), with a valid GSM8K teacher completion ("1. Question: ... Answer: ... #### n", unique each
time) and token usage. It stops by itself when idle, or at a deadline.

The client is the real teach stage: ``llm2llm_jobs.fanout.run_tasks`` runs ``teach_shard`` once per
replica as a Ray task (a fresh worker process each, as in an iteration), and each replica's
``OpenAITeacher`` keeps ``max_concurrency`` requests in flight. For replicas R x concurrency C
(streams S = R*C), each config sends S * waves requests (one per failure, samplesPerFailure 1, one round).

Efficiency = measured throughput / (S / latency). It is measured on the server (requests / first
arrival to last completion: the fan-out itself) and, separately, on the stage's wall clock (run_tasks
call, including Ray dispatch and worker start-up). The goal (>= 0.9) applies up to the server's limit;
beyond it the best possible is limit / S, shown as "capped ideal".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import _common as C

GOAL = 0.9


# --- the server ---------------------------------------------------------------------------------------

def serve(port: int, latency: float, limit: int, idle_exit: float, max_seconds: float) -> None:
    from aiohttp import web

    gate = asyncio.Semaphore(limit)
    log: list[tuple[float, float, float]] = []  # (arrival, service start, done), monotonic seconds
    state = {"last": time.monotonic(), "in_service": 0, "max_in_service": 0, "n": 0}
    started = time.monotonic()

    async def chat(request: web.Request) -> web.Response:
        arrive = time.monotonic()
        body = await request.json()
        async with gate:
            begin = time.monotonic()
            state["in_service"] += 1
            state["max_in_service"] = max(state["max_in_service"], state["in_service"])
            try:
                await asyncio.sleep(latency)
            finally:
                state["in_service"] -= 1
        state["n"] += 1
        k = state["n"]
        a, b = 3 + k % 97, 5 + k % 89
        text = (f"1. Question: Robin {k} packs {a} boxes with {b} pencils each for school number {k}. "
                f"How many pencils are packed?\nAnswer: Robin packs {a} * {b} = {a * b} pencils.\n#### {a * b}")
        done = time.monotonic()
        log.append((arrive, begin, done))
        state["last"] = done
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return web.json_response({
            "id": f"chatcmpl-{k}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "teacher"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 40, "total_tokens": prompt_tokens + 40},
        })

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"log": log, "max_in_service": state["max_in_service"]})

    async def reset(_: web.Request) -> web.Response:
        log.clear()
        state["max_in_service"] = state["in_service"]
        state["last"] = time.monotonic()
        return web.json_response({"ok": True})

    async def watchdog(app: web.Application):
        async def loop() -> None:
            while True:
                await asyncio.sleep(1)
                now = time.monotonic()
                if now - state["last"] > idle_exit or now - started > max_seconds:
                    os._exit(0)  # stop by ourselves: nobody is using us any more

        task = asyncio.create_task(loop())
        yield
        task.cancel()

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/health", health), web.get("/stats", stats),
                    web.post("/admin/reset", reset)])
    app.cleanup_ctx.append(watchdog)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=1024)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


# --- the client ---------------------------------------------------------------------------------------

def _spec(endpoint: str, concurrency: int) -> dict:
    from llm2llm.spec import AugmentationRunSpec

    spec = AugmentationRunSpec.model_validate({
        "task": {"kind": "gsm8k"},
        "data": {"seed": "unused.jsonl"},
        "teacher": {"kind": "openai", "model": "teacher", "endpoint": endpoint, "maxConcurrency": concurrency,
                    "samplesPerFailure": 1, "maxRounds": 1, "maxTokens": 64, "requestTimeoutSeconds": 60},
        "filters": {"dedup": "exact", "decontaminate": False},
        "output": "unused",
    })
    return spec.model_dump(mode="json", by_alias=True)


def run_config(base: str, replicas: int, concurrency: int, waves: int, latency: float, limit: int) -> dict:
    from llm2llm.launch import API_KEY_ENV
    from llm2llm_jobs import fanout

    streams = replicas * concurrency
    n = streams * waves
    failures = [{"id": f"f{k}", "input": f"Tom has {k} apples and buys {k + 3} more. How many apples?",
                 "output": f"{k} + {k + 3} = {2 * k + 3}\n#### {2 * k + 3}", "prediction": "no idea"} for k in range(n)]
    groups = fanout.shards(failures, replicas)
    spec = _spec(base + "/v1", concurrency)
    _get(base + "/admin/reset", "POST")
    load = C.load_str()
    t0 = time.perf_counter()
    results = fanout.run_tasks("llm2llm_jobs.fanout:teach_shard", [
        dict(spec=spec, model_path=None, failures=g, existing=[], held_out=[], iteration=0, shard=k, token_budget=None,
             api_key_env=API_KEY_ENV) for k, g in enumerate(groups)])
    wall = time.perf_counter() - t0
    st = _get(base + "/stats")
    log = st["log"]
    assert len(log) == n, f"server saw {len(log)} requests, expected {n}"
    rows = sum(len(r["rows"]) for r in results)
    assert rows == n and all(r["rows"][0]["parse_error"] is None for r in results), "teacher output not parsed"
    span = max(d for _, _, d in log) - min(a for a, _, _ in log)
    ideal = streams / latency
    capped = min(streams, limit) / latency
    served = n / span
    return {
        "replicas": replicas, "concurrency": concurrency, "streams": streams, "requests": n,
        "server_span_s": round(span, 3), "throughput_rps": round(served, 2), "ideal_rps": round(ideal, 2),
        "capped_ideal_rps": round(capped, 2), "efficiency": round(served / ideal, 3),
        "efficiency_vs_capped": round(served / capped, 3), "stage_wall_s": round(wall, 2),
        "stage_efficiency": round(n / wall / ideal, 3), "max_in_service": st["max_in_service"],
        "mean_queue_ms": round(1000 * sum(b - a for a, b, _ in log) / n, 1), "load": load,
        "within_limit": streams <= limit,
    }


def run(latency: float, limit: int, waves: int, concurrencies: list[int], replica_counts: list[int]) -> dict:
    import ray

    from llm2llm.launch import API_KEY_ENV

    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    server = subprocess.Popen([C.python(), "-m", "bench.teacher_fanout", "serve", "--port", str(port), "--latency",
                               str(latency), "--server-limit", str(limit), "--idle-exit", "120"],
                              cwd=C.ROOT, stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(base + "/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("teacher server did not start:\n" + (tmp / "server.log").read_text()[-2000:])
                time.sleep(0.3)
        os.environ[API_KEY_ENV] = "bench-key"  # the workers inherit it; the server ignores it
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(2, max(replica_counts)), include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp / "ray"))
        try:
            # Warm-up: the first Ray tasks pay for the worker pool and imports.
            run_config(base, max(replica_counts), 1, 1, latency, limit)
            out = []
            for r in replica_counts:
                for c in concurrencies:
                    row = run_config(base, r, c, waves, latency, limit)
                    print(f"  R={r} C={c}: {row['throughput_rps']} req/s of {row['ideal_rps']} -> efficiency "
                          f"{row['efficiency']} (stage {row['stage_efficiency']}), load {row['load']}", flush=True)
                    out.append(row)
        finally:
            ray.shutdown()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"latency_s": latency, "server_limit": limit, "waves": waves, "configs": out}


def report(res: dict) -> str:
    rows = []
    for r in res["configs"]:
        within = r["within_limit"]
        ok = r["efficiency"] >= GOAL if within else None
        rows.append([r["replicas"], r["concurrency"], r["streams"], r["requests"], f"{r['throughput_rps']:.2f}",
                     f"{r['ideal_rps']:.1f}" + ("" if within else f" (capped {r['capped_ideal_rps']:.0f})"),
                     f"**{r['efficiency']:.3f}**" if within else f"{r['efficiency']:.3f} (vs capped {r['efficiency_vs_capped']:.3f})",
                     "met" if ok else ("MISSED" if ok is False else "n/a (over limit)"),
                     f"{r['stage_wall_s']:.2f}", f"{r['stage_efficiency']:.3f}", r["max_in_service"], r["load"]])
    within = [r for r in res["configs"] if r["within_limit"]]
    worst = min(within, key=lambda r: r["efficiency"]) if within else None
    summary = (f"Goal: efficiency >= {GOAL} up to the server's limit ({res['server_limit']} in service): "
               + ("met" if worst and worst["efficiency"] >= GOAL else "MISSED")
               + (f", lowest {worst['efficiency']:.3f} (R={worst['replicas']}, C={worst['concurrency']})." if worst else "."))
    return "\n".join([
        f"Server: fixed {res['latency_s'] * 1000:.0f} ms per request, at most {res['server_limit']} in service; "
        f"{res['waves']} waves of requests per config. Client: the real teach stage (fanout.run_tasks -> teach_shard -> "
        "OpenAITeacher), one Ray task per replica.",
        "",
        C.md_table(["replicas", "max_concurrency", "streams", "requests", "req/s", "ideal req/s", "efficiency",
                    "goal", "stage wall s", "stage efficiency", "max in service", "load at start"], rows),
        "",
        summary,
        "",
        "Efficiency is measured at the server (first arrival to last completion). 'Stage efficiency' divides by "
        "the whole run_tasks wall time instead, so it also pays for Ray dispatch and a fresh worker process "
        "per replica (imports included), a fixed cost per teach stage that short runs like these magnify.",
    ])


def plot(res: dict) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in sorted({c["replicas"] for c in res["configs"]}):
        pts = sorted((c["streams"], c["efficiency"], c["stage_efficiency"]) for c in res["configs"] if c["replicas"] == r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{r} replica(s): server-side")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", alpha=0.6, label=f"{r} replica(s): stage wall")
    xs = sorted({c["streams"] for c in res["configs"]})
    ax.plot(xs, [min(1.0, res["server_limit"] / x) for x in xs], ":", color="gray", label="best possible (server limit)")
    ax.axhline(GOAL, color="red", lw=0.8, label=f"goal {GOAL}")
    ax.axvline(res["server_limit"], color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("streams = replicas x max_concurrency")
    ax.set_ylabel("efficiency")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Teacher fan-out, {res['latency_s'] * 1000:.0f} ms/request, server limit {res['server_limit']}",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    C.save_plot(fig, "teacher_fanout")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.teacher_fanout", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="run only the fixed-latency server (used by the bench itself)")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--latency", type=float, default=0.2)
    s.add_argument("--server-limit", type=int, default=8)
    s.add_argument("--idle-exit", type=float, default=120)
    s.add_argument("--max-seconds", type=float, default=3600)
    p.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    p.add_argument("--server-limit", type=int, default=8, help="requests the server serves at once")
    p.add_argument("--waves", type=int, default=10, help="requests per stream and config")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port, args.latency, args.server_limit, args.idle_exit, args.max_seconds)
        return 0
    print(f"load {C.load_str()}", flush=True)
    res = run(args.latency, args.server_limit, args.waves, args.concurrency, args.replicas)
    C.save("teacher_fanout", res, report(res))
    plot(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
