"""Data plane at 1M rows: ours (pyarrow + numpy + rapidfuzz + the prefix-filter index) vs naive pandas.

    .venv/bin/python -m bench.dataplane [--rows 1000000] [--sample 3000] [--workers 2]

Operations, on synthetic GSM8K-like rows with planted duplicates (bench/synth.py):
- merge: D (existing training rows) + A (new teacher rows) into the DATASET schema with its lineage
  columns, counting rows whose content id repeats;
- exact dedup: keep the first row of every ``_norm``-equal question (the filter's "duplicate");
- near dedup: drop a row whose question scores ROUGE-L F1 >= 0.95 against an earlier kept row (the
  filter's "near_duplicate"), over the rows the exact dedup kept;
- lineage: walk parent ids to every row's seed ancestor and depth.

Naive: pandas concat / str.findall / drop_duplicates, a Python dict walk, and for near dedup the
filter's plain scan (every row scored against every kept row with rapidfuzz) - quadratic, so it runs on
a sample and is extrapolated by (rows / sample)^2; the table says so.

Checked, not just timed: ours and naive agree on merge counts, exact-dedup rows, lineage, and near-dedup
verdicts on the sample; every planted exact copy is dropped; every planted near copy is found (recall
on the planted pairs); every reported pair scores >= the threshold.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench import _common as C
from bench.synth import synthesize
from llm2llm.schemas import DATASET
from llm2llm_jobs.filter import _norm, _Tokens, near_duplicate_pairs, normalize_all

GOAL_SPEEDUP = 5.0
GOAL_SECONDS = 60.0


def greedy_keep(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Keep row j unless a kept row i < j is its near duplicate (the filter's order-dependent rule)."""
    keep = np.ones(n, bool)
    order = np.lexsort((i, j))
    for a, b in zip(i[order].tolist(), j[order].tolist()):
        if keep[a]:
            keep[b] = False
    return keep


# --- ours ---------------------------------------------------------------------------------------------

def ours_merge(d: pa.Table, a: pa.Table) -> tuple[pa.Table, int]:
    merged = pa.concat_tables([d, a])
    assert merged.schema.equals(DATASET), merged.schema
    return merged, merged.num_rows - pc.count_distinct(merged["id"]).as_py()


def ours_exact(inputs: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    norm = normalize_all(inputs)
    # Arrow numbers dictionary entries in order of first appearance: a row is the first of its key when
    # its code is above every code before it.
    codes = pc.dictionary_encode(norm).indices.to_numpy()
    keep = np.ones(len(codes), bool)
    if len(codes) > 1:
        keep[1:] = codes[1:] > np.maximum.accumulate(codes)[:-1]
    return keep, norm


def ours_near(norm_kept: pa.Array, threshold: float, workers: int, stats: dict) -> tuple[np.ndarray, tuple]:
    i, j, s = near_duplicate_pairs(norm_kept, threshold, workers=workers, stats=stats)
    return greedy_keep(len(norm_kept), i, j), (i, j, s)


def ours_lineage(ids: pa.ChunkedArray, parents: pa.ChunkedArray, max_depth: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
    """(root row, depth) of every row, and how many rows name a parent that is not there."""
    pidx = pc.index_in(parents, value_set=ids.combine_chunks())
    orphans = int(pc.sum(pc.and_(pc.is_valid(parents), pc.is_null(pidx))).as_py() or 0)
    up = pidx.to_numpy(zero_copy_only=False)
    up = np.where(np.isnan(up), -1, up).astype(np.int64) if up.dtype.kind == "f" else up.astype(np.int64)
    n = len(up)
    root, depth, cur = np.arange(n), np.zeros(n, np.int64), up.copy()
    for _ in range(max_depth):
        live = cur >= 0
        if not live.any():
            break
        root[live] = cur[live]
        depth[live] += 1
        cur[live] = up[cur[live]]
    else:
        raise RuntimeError("parent chains deeper than max_depth (a cycle?)")
    return root, depth, orphans


# --- naive (pandas) -----------------------------------------------------------------------------------

def naive_merge(d, a):
    import pandas as pd

    merged = pd.concat([d, a], ignore_index=True)
    return merged, int(merged["id"].duplicated().sum())


def naive_exact(merged) -> tuple[np.ndarray, object]:
    norm = merged["input"].str.lower().str.findall(r"\w+").str.join(" ")
    return (~norm.duplicated()).to_numpy(), norm


def naive_near(texts: list[str], threshold: float) -> np.ndarray:
    """The filter's plain scan: every row against every kept row so far (rapidfuzz extractOne)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    tok, pool, keep = _Tokens(), [], []
    for text in texts:
        enc = tok.encode(text)
        hit = bool(enc) and bool(pool) and process.extractOne(
            enc, pool, scorer=Indel.normalized_similarity, score_cutoff=threshold) is not None
        keep.append(not hit)
        if not hit:
            pool.append(enc)
    return np.array(keep, bool)


def naive_lineage(merged) -> tuple[np.ndarray, np.ndarray]:
    index = {v: k for k, v in enumerate(merged["id"].tolist()[::-1])}  # first occurrence wins
    n = len(merged)
    index = {v: n - 1 - k for v, k in index.items()}
    parents = merged["parent_id"].tolist()
    root, depth = np.empty(n, np.int64), np.empty(n, np.int64)
    for r in range(n):
        cur, dep = r, 0
        while True:
            p = parents[cur]
            if p is None or p != p or p not in index:  # None / NaN / missing
                break
            cur, dep = index[p], dep + 1
        root[r], depth[r] = cur, dep
    return root, depth


# --- the bench ----------------------------------------------------------------------------------------

def run(rows: int, sample: int, threshold: float, workers: int, seed: int) -> dict:
    print(f"load {C.load_str()}: generating {rows:,} rows ...", flush=True)
    t0 = time.perf_counter()
    syn = synthesize(rows, seed=seed, threshold=threshold)
    gen_s = time.perf_counter() - t0
    d, a = syn.table.slice(0, syn.split), syn.table.slice(syn.split)
    print(f"  {gen_s:.0f}s; D={d.num_rows:,} A={a.num_rows:,}, planted exact {len(syn.exact):,}, near {len(syn.near):,}",
          flush=True)
    res: dict = {"rows": rows, "threshold": threshold, "workers": workers, "generate_seconds": round(gen_s, 1)}
    ours: dict[str, float] = {}
    loads: dict[str, str] = {}

    # ours
    print(f"load {C.load_str()}: ours ...", flush=True)
    with C.Timer() as tm:
        merged, dup_ids = ours_merge(d, a)
    ours["merge"], loads["ours"] = tm.seconds, C.load_str()
    with C.Timer() as tm:
        exact_keep, norm = ours_exact(merged["input"])
    ours["exact dedup"] = tm.seconds
    kept_idx = np.flatnonzero(exact_keep)
    near_stats: dict = {}
    with C.Timer() as tm:
        near_keep_local, (pi, pj, ps) = ours_near(norm.take(pa.array(kept_idx)), threshold, workers, near_stats)
    ours["near dedup"] = tm.seconds
    with C.Timer() as tm:
        root, depth, orphans = ours_lineage(merged["id"], merged["parent_id"])
    ours["lineage"] = tm.seconds
    ours_total = sum(ours.values())
    loads["ours_end"] = C.load_str()
    print(f"  ours: {ours_total:.1f}s {ours} near {near_stats}", flush=True)

    # checks on ours
    n = merged.num_rows
    assert not exact_keep[syn.exact[:, 1]].any(), "a planted exact copy survived the exact dedup"
    pos = np.full(n, -1)
    pos[kept_idx] = np.arange(len(kept_idx))
    both = (pos[syn.near[:, 0]] >= 0) & (pos[syn.near[:, 1]] >= 0)
    planted = {(int(pos[x]), int(pos[y])) for x, y in syn.near[both]}
    found = set(zip(pi.tolist(), pj.tolist()))
    recall = len(planted & found) / max(len(planted), 1)
    assert recall == 1.0, f"near-dup recall on planted pairs {recall:.4f} < 1"
    assert (ps >= threshold).all()
    check = np.unique(np.r_[np.flatnonzero(~pc.string_is_ascii(merged["input"]).to_numpy(zero_copy_only=False)),
                            np.random.default_rng(seed).choice(n, min(n, 20_000), replace=False)])
    inputs = merged["input"]
    assert all(norm[int(k)].as_py() == _norm(inputs[int(k)].as_py()) for k in check), "normalize_all != _norm"
    near_dropped = int((~near_keep_local).sum())
    res["checks"] = {"planted_exact": int(len(syn.exact)), "planted_exact_dropped": True,
                     "planted_near_pairs_checked": len(planted), "planted_near_recall": recall,
                     "near_pairs_found": int(len(pi)), "near_pairs_beyond_planted": int(len(found - planted)),
                     "exact_dropped": int(n - exact_keep.sum()), "near_dropped": near_dropped,
                     "duplicate_ids": int(dup_ids), "orphans": orphans,
                     "normalize_checked_rows": int(len(check)), "max_depth": int(depth.max())}

    # naive
    print(f"load {C.load_str()}: naive pandas ...", flush=True)
    dp, ap = d.to_pandas(), a.to_pandas()
    naive: dict[str, float] = {}
    loads["naive"] = C.load_str()
    with C.Timer() as tm:
        mp, dup_ids_p = naive_merge(dp, ap)
    naive["merge"] = tm.seconds
    with C.Timer() as tm:
        exact_keep_p, _ = naive_exact(mp)
    naive["exact dedup"] = tm.seconds
    with C.Timer() as tm:
        root_p, depth_p = naive_lineage(mp)
    naive["lineage"] = tm.seconds
    # near: the scan on a sample of the exact-kept rows (planted pairs included so it has work to do)
    rng = np.random.default_rng(seed + 1)
    pairs_local = np.array(sorted(planted), np.int64).reshape(-1, 2)
    take_pairs = pairs_local[rng.choice(len(pairs_local), min(len(pairs_local), sample // 4), replace=False)]
    pool = np.setdiff1d(np.arange(len(kept_idx)), take_pairs.ravel())
    extra = rng.choice(pool, max(0, sample - 2 * len(take_pairs)), replace=False)
    sample_rows = np.unique(np.r_[take_pairs.ravel(), extra])
    sample_texts = [inputs[int(kept_idx[k])].as_py() for k in sample_rows]
    with C.Timer() as tm:
        naive_keep_sample = naive_near(sample_texts, threshold)
    sample_s = tm.seconds
    scale = (len(kept_idx) / len(sample_rows)) ** 2
    naive["near dedup"] = sample_s * scale
    si, sj, _ = near_duplicate_pairs(sample_texts, threshold)
    ours_keep_sample = greedy_keep(len(sample_texts), si, sj)
    loads["naive_end"] = C.load_str()

    assert dup_ids_p == dup_ids
    assert np.array_equal(exact_keep_p, exact_keep), "exact dedup differs from pandas"
    assert np.array_equal(depth_p, depth) and np.array_equal(root_p, root), "lineage differs"
    assert np.array_equal(naive_keep_sample, ours_keep_sample), "near dedup differs from the plain scan on the sample"
    res["checks"].update(naive_agrees=True, sample_rows=int(len(sample_rows)),
                         sample_near_dropped=int((~naive_keep_sample).sum()))

    naive_total = sum(naive.values())
    res.update(ours_seconds={k: round(v, 3) for k, v in ours.items()}, ours_total_seconds=round(ours_total, 2),
               naive_seconds={k: round(v, 3) for k, v in naive.items()}, naive_total_seconds=round(naive_total, 1),
               naive_near_sample_seconds=round(sample_s, 3), naive_near_extrapolation=f"x{scale:,.0f} = (rows/sample)^2",
               speedup_total=round(naive_total / ours_total, 1), near_index_stats=near_stats, loads=loads,
               goals={"speedup": GOAL_SPEEDUP, "ours_seconds": GOAL_SECONDS},
               met={"speedup": naive_total / ours_total >= GOAL_SPEEDUP, "ours_seconds": ours_total < GOAL_SECONDS})
    return res


def report(res: dict) -> str:
    ours, naive = res["ours_seconds"], res["naive_seconds"]
    rows = []
    for op in ("merge", "exact dedup", "near dedup", "lineage"):
        note = ""
        if op == "near dedup":
            note = (f"naive: {res['naive_near_sample_seconds']:.2f}s on a {res['checks']['sample_rows']:,}-row sample, "
                    f"extrapolated {res['naive_near_extrapolation']}")
        rows.append([op, f"{ours[op]:.2f}", f"{naive[op]:,.2f}", f"{naive[op] / max(ours[op], 1e-9):,.1f}x", note])
    rows.append(["**total**", f"**{res['ours_total_seconds']:.1f}**", f"**{res['naive_total_seconds']:,.0f}**",
                 f"**{res['speedup_total']:,.1f}x**", ""])
    ck, st = res["checks"], res["near_index_stats"]
    goal = (f"Goals: ours < {GOAL_SECONDS:.0f}s at {res['rows']:,} rows on this machine: "
            f"{'met' if res['met']['ours_seconds'] else 'MISSED'} ({res['ours_total_seconds']:.1f}s); "
            f">= {GOAL_SPEEDUP:.0f}x vs naive: {'met' if res['met']['speedup'] else 'MISSED'} ({res['speedup_total']:,.1f}x, "
            "dominated by the extrapolated quadratic near-dup scan; without it "
            f"{sum(res['naive_seconds'][k] for k in ('merge', 'exact dedup', 'lineage')) / sum(ours[k] for k in ('merge', 'exact dedup', 'lineage')):.1f}x).")
    lines = [
        f"Rows: {res['rows']:,} synthetic GSM8K-like (D {'+'} A), ROUGE-L threshold {res['threshold']}, "
        f"{res['workers']} scoring threads. Load (1/5/15 min) during ours: {res['loads']['ours']} -> "
        f"{res['loads']['ours_end']}; during naive: {res['loads']['naive']} -> {res['loads']['naive_end']}.",
        "",
        C.md_table(["operation", "ours s", "naive pandas s", "speedup", "note"], rows),
        "",
        goal,
        "",
        f"Near-dup index: {st['words']:,} words, {st['candidates']:,} candidate pairs from q-gram prefix blocking, "
        f"{st['scored']:,} left after the bag-of-words bound, {st['pairs']:,} verified pairs (ROUGE-L >= "
        f"{res['threshold']}); seconds {st['seconds']}.",
        f"Checks: planted exact copies {ck['planted_exact']:,} all dropped; planted near pairs {ck['planted_near_pairs_checked']:,}, "
        f"recall {ck['planted_near_recall']:.3f}; {ck['near_pairs_beyond_planted']:,} further verified pairs (variants of one "
        f"template that are genuinely >= threshold); exact dropped {ck['exact_dropped']:,}, near dropped {ck['near_dropped']:,}; "
        f"ours == pandas on merge ({ck['duplicate_ids']:,} repeated ids), exact dedup and lineage (max depth {ck['max_depth']}); "
        f"ours == the plain scan on the {ck['sample_rows']:,}-row sample ({ck['sample_near_dropped']} near dups).",
    ]
    return "\n".join(lines)


def plot(res: dict) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    ops = ["merge", "exact dedup", "near dedup", "lineage"]
    y = np.arange(len(ops))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.barh(y - 0.2, [res["ours_seconds"][o] for o in ops], 0.4, label="ours (pyarrow + prefix-filter index)")
    ax.barh(y + 0.2, [res["naive_seconds"][o] for o in ops], 0.4, label="naive pandas (near: extrapolated)")
    ax.set_yticks(y, ops)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log)")
    ax.invert_yaxis()
    ax.set_title(f"Data plane, {res['rows']:,} rows: ours {res['ours_total_seconds']:.1f}s vs naive "
                 f"{res['naive_total_seconds']:,.0f}s", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    C.save_plot(fig, "dataplane")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dataplane", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--sample", type=int, default=3000, help="rows for the naive quadratic near-dup scan")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--workers", type=int, default=2, help="threads scoring near-dup candidates")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    res = run(args.rows, args.sample, args.threshold, args.workers, args.seed)
    C.save("dataplane", res, report(res))
    plot(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
