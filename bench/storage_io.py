"""Parquet I/O of a 1M-row iteration on an object store next to a local folder, through RunStorage.

    .venv/bin/python -m bench.storage_io [--rows 1000000] [--repeats 3]

The stage tables an iteration writes and reads, at ``--rows`` rows each: the training set (DATASET, what
prepare/merge write and train reads), the predictions (PREDICTIONS: infer writes, score reads) and the scored
rows (SCORED: score writes, teach/filter read), synthetic GSM8K-like rows (bench/synth.py, no planted copies).
Each is written with ``RunStorage.write_table`` (zstd Parquet, one atomic PUT or rename) and read back with
``RunStorage.read_table`` into (a) a local folder on this machine's disk and (b) a real S3-compatible server,
versitygw (tests/s3server.py) on 127.0.0.1, over s3fs with the standard AWS_* variables, its data on the same
disk. Every read is checked equal to what was written. Repeats alternate local and S3; the table gives the median
and the range. The server runs on the same two cores as the client (its MD5 ETags and copies included), and the
network is loopback: a remote store adds its network time, which this does not measure.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import _common as C
from bench.synth import synthesize
from llm2llm.schemas import DATASET, PREDICTIONS, SCORED
from llm2llm.storage import RunStorage


def stage_tables(rows: int, seed: int = 0) -> dict[str, tuple[pa.Table, pa.Schema]]:
    """The three stage tables at ``rows`` rows: a training set, its predictions, their scores."""
    data = synthesize(rows, seed=seed, exact_rate=0.0, near_rate=0.0).table
    rng = np.random.default_rng(seed)
    right = rng.random(rows) < 0.6
    gold = pc.replace_substring_regex(data["output"], pattern=r"(?s)^.*#### *", replacement="")
    # A student's reply: the gold answer line for 60% of rows, a wrong number for the rest.
    wrong = pa.array((rng.integers(0, 1000, rows)).astype(str))
    predicted = pc.if_else(pa.array(right), gold, wrong)
    prediction = pc.binary_join_element_wise("The answer is ", predicted, ".", "")
    split = pa.array(np.where(rng.random(rows) < 0.8, "seed", "test"))
    preds = pa.table({"id": data["id"], "split": split, "input": data["input"], "output": data["output"],
                      "prediction": prediction, "iteration": pa.array(np.zeros(rows, np.int32)),
                      "backend": pa.array(["vllm"] * rows)}, schema=PREDICTIONS)
    scored = pa.table({**{f.name: preds[f.name] for f in PREDICTIONS}, "predicted_answer": predicted,
                       "gold_answer": gold, "correct": pa.array(right)}, schema=SCORED)
    return {"train.parquet (DATASET)": (data, DATASET), "predictions.parquet (PREDICTIONS)": (preds, PREDICTIONS),
            "scored.parquet (SCORED)": (scored, SCORED)}


def one_pass(store: RunStorage, tables: dict[str, tuple[pa.Table, pa.Schema]], rep: int) -> dict[str, dict]:
    """Write and read each table as the stages do, timing the parts: Parquet encoding, the store write
    (write_bytes: a PUT, or a temp file + fsync + rename), the whole read (read_table: open + decode), and the
    bare transfer of the file's bytes (cat_file)."""
    out = {}
    for name, (t, schema) in tables.items():
        path = store.path(f"rep-{rep}", name.split()[0])
        with C.Timer() as enc:
            buf = io.BytesIO()
            pq.write_table(t, buf, compression="zstd")  # what write_table does before write_bytes
            data = buf.getvalue()
        with C.Timer() as put:
            store.write_bytes(path, data)
        with C.Timer() as r:
            back = store.read_table(path, schema)
        if not back.equals(t):
            raise AssertionError(f"{name}: read back differs from what was written ({store.uri()})")
        with C.Timer() as get:
            if store.fs.cat_file(path) != data:
                raise AssertionError(f"{name}: stored bytes differ ({store.uri()})")
        out[name] = {"encode_s": enc.seconds, "put_s": put.seconds, "write_s": enc.seconds + put.seconds,
                     "read_s": r.seconds, "get_s": get.seconds, "bytes": len(data)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from tests.s3server import S3Server

    print(f"load {C.load_str()}: generating the stage tables at {args.rows:,} rows ...", flush=True)
    with C.Timer() as gen:
        tables = stage_tables(args.rows)
    with tempfile.TemporaryDirectory(prefix="llm2llm-storage-io-") as tmp:
        server = S3Server(Path(tmp) / "s3")
        with C.Timer() as up:
            ep = server.start()
        try:
            os.environ.update(ep.env())
            stores = {"local": RunStorage(str(Path(tmp) / "local"), "bench"),
                      "s3": RunStorage(f"s3://{ep.bucket}/runs", "bench")}
            runs: dict[str, list[dict]] = {"local": [], "s3": []}
            loads: list[str] = [C.load_str()]
            for rep in range(args.repeats):
                for kind in ("local", "s3") if rep % 2 == 0 else ("s3", "local"):
                    print(f"load {C.load_str()}: repeat {rep + 1}/{args.repeats}, {kind} ...", flush=True)
                    runs[kind].append(one_pass(stores[kind], tables, rep))
                    loads.append(C.load_str())
            for store in stores.values():
                store.delete_all()
        finally:
            server.stop()

    def med(kind: str, name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in runs[kind])

    def rng(kind: str, name: str, key: str) -> str:
        xs = [r[name][key] for r in runs[kind]]
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    keys = ("encode_s", "put_s", "write_s", "read_s", "get_s")
    rows, figures = [], {}
    totals = {k: dict.fromkeys(keys, 0.0) for k in ("local", "s3")}
    for name in tables:
        size = runs["local"][0][name]["bytes"]
        figures[name] = {"bytes": size, **{k: {key: [r[name][key] for r in runs[k]] for key in keys}
                                          for k in ("local", "s3")}}
        for k in totals:
            for key in keys:
                totals[k][key] += med(k, name, key)
        rows.append([name, f"{size / 2**20:,.1f}", rng("local", name, "write_s"), rng("s3", name, "write_s"),
                     f"{med('local', name, 'put_s'):.2f} / {med('s3', name, 'put_s'):.2f}",
                     rng("local", name, "read_s"), rng("s3", name, "read_s"),
                     f"{med('local', name, 'get_s'):.2f} / {med('s3', name, 'get_s'):.2f}",
                     f"{size / 2**20 / med('s3', name, 'put_s'):,.0f} / {size / 2**20 / med('s3', name, 'get_s'):,.0f}"])
    lt, st = totals["local"], totals["s3"]
    rows.append(["**all three**", "", f"**{lt['write_s']:.2f}**", f"**{st['write_s']:.2f}**",
                 f"{lt['put_s']:.2f} / {st['put_s']:.2f}", f"**{lt['read_s']:.2f}**", f"**{st['read_s']:.2f}**",
                 f"{lt['get_s']:.2f} / {st['get_s']:.2f}", ""])
    table = C.md_table(["table", "MiB (zstd)", "write local s", "write S3 s", "of it the store write, local / S3 s",
                        "read local s", "read S3 s", "bare transfer of the bytes, local / S3 s",
                        "S3 MiB/s PUT / GET"], rows)
    extra = st["write_s"] + st["read_s"] - lt["write_s"] - lt["read_s"]
    md = (f"Rows: {args.rows:,} per table (synthetic GSM8K-like, bench/synth.py), {args.repeats} repeats alternating "
          f"local and S3; median (min-max) seconds. Write = Parquet encoding (zstd, "
          f"{lt['encode_s'] + st['encode_s']:.1f} s for the three tables, both sides together) + the store write "
          f"(`write_bytes`: one PUT, a multipart upload from 100 MiB; locally a temp file, fsync, rename). Read = "
          f"`read_table` (open + decode). Tables generated in {gen.seconds:.1f} s; the S3 server (versitygw, "
          f"tests/s3server.py, on 127.0.0.1, data on the same disk) up in {up.seconds:.1f} s. Load (1/5/15 min) "
          f"before and after each pass: {' -> '.join(loads)}.\n\n{table}\n\n"
          f"Writing and reading the three tables once: {st['write_s'] + st['read_s']:.1f} s on the object store, "
          f"{lt['write_s'] + lt['read_s']:.1f} s in a local folder ({extra:+.1f} s per iteration at this size). The "
          f"store's own part is the PUT/GET columns; the rest is Parquet encoding and decoding, the same on both "
          f"sides. Not measured: a remote store's network (this is loopback, and the server shares the client's "
          f"two cores).\n")
    C.save("storage_io", {"rows": args.rows, "repeats": args.repeats, "figures": figures,
                          "totals_median_s": totals, "loads": loads, "generate_s": gen.seconds,
                          "server_start_s": up.seconds}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
