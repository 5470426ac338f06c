"""The near-duplicate index behind bench/dataplane.py and CandidateFilter: small-scale correctness.

Planted duplicates are found, and nothing is reported that the exact ROUGE-L score (rapidfuzz Indel on
the filter's word encoding) does not put at or above the threshold: the index returns exactly what an
all-pairs scan returns.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from rapidfuzz import process
from rapidfuzz.distance import Indel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for bench/

import llm2llm_jobs.filter as flt  # noqa: E402
from bench.dataplane import greedy_keep, naive_near  # noqa: E402
from bench.synth import synthesize  # noqa: E402
from llm2llm.spec import FiltersSpec, TaskSpec  # noqa: E402
from llm2llm.tasks import Task  # noqa: E402
from llm2llm_jobs.filter import (  # noqa: E402
    CandidateFilter,
    NearDuplicateIndex,
    _norm,
    _Tokens,
    near_duplicate_pairs,
    normalize_all,
)


def all_pairs(texts: list[str], threshold: float) -> dict[tuple[int, int], float]:
    """The definition: every pair scored, as the filter's plain scan scores it."""
    tok = _Tokens()
    enc = [tok.encode(t) for t in texts]
    scores = process.cdist(enc, enc, scorer=Indel.normalized_similarity, score_cutoff=threshold, dtype=np.float64,
                           workers=2)
    out = {}
    for i, j in zip(*np.nonzero(np.triu(scores >= threshold, k=1))):
        if enc[i] and enc[j]:
            out[(int(i), int(j))] = float(scores[i, j])
    return out


@pytest.mark.parametrize("templates", ["builtin", "auto"])
def test_planted_duplicates_are_found_and_nothing_else(templates):
    syn = synthesize(1200, seed=7, exact_rate=0.05, near_rate=0.05, templates=templates)
    texts = syn.table["input"].to_pylist()
    want = all_pairs(texts, 0.95)
    i, j, s = near_duplicate_pairs(texts, 0.95)
    got = {(int(a), int(b)): float(c) for a, b, c in zip(i, j, s)}
    assert len(syn.near) > 20 and len(syn.exact) > 20
    for a, b in syn.near.tolist() + syn.exact.tolist():  # every planted copy is found (exact copies score 1.0)
        assert (a, b) in got
    assert got == want  # no false positives, no misses, same scores
    assert all(score >= 0.95 for score in got.values())


@pytest.mark.parametrize("threshold", [1.0, 0.95, 0.9, 0.8, 0.6, 0.3])
def test_any_threshold_and_blocking_gives_the_all_pairs_answer(threshold):
    rng = random.Random(threshold)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "of", "x", "Tom", "5", "12", "é", "naïve", "ß", "½"]
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) for _ in range(80)]
    texts = list(base)
    for _ in range(80):  # edited copies, some with changed case / punctuation
        w = rng.choice(base).split()
        op = rng.random()
        if w and op < 0.4:
            w[rng.randrange(len(w))] = rng.choice(words)
        elif op < 0.7:
            w.insert(rng.randint(0, len(w)), rng.choice(words))
        elif w:
            del w[rng.randrange(len(w))]
        texts.append(" ".join(w).upper() + "?" if rng.random() < 0.3 else " ".join(w))
    rng.shuffle(texts)
    want = all_pairs(texts, threshold)
    for q, shared in ((1, 1), (2, 1), (3, 3), (2, 4)):
        i, j, s = near_duplicate_pairs(texts, threshold, q=q, shared=shared)
        assert {(int(a), int(b)): float(c) for a, b, c in zip(i, j, s)} == want, (q, shared)


def test_boundary_score_counts_as_a_duplicate_in_every_path():
    # 20 words, one substituted: ROUGE-L F1 = 1 - 2/40 = 0.95 exactly, the default threshold.
    a = "Tom has three boxes with four apples in each box and he gives two of them to his friend Ann"
    b = a.replace("friend", "sister")
    assert len(a.split()) == 20
    tok = _Tokens()
    score = Indel.normalized_similarity(tok.encode(a), tok.encode(b))
    assert score == pytest.approx(0.95) and score >= 0.95
    i, j, s = near_duplicate_pairs([a, b], 0.95)
    assert (i.tolist(), j.tolist(), s.tolist()) == ([0], [1], [score])
    assert process.extractOne(tok.encode(b), [tok.encode(a)], scorer=Indel.normalized_similarity,
                              score_cutoff=0.95) is not None
    index = NearDuplicateIndex(0.95, [tok.encode(a)])
    assert index.contains(tok.encode(b)) and index.matches(tok.encode(b))[0][0] == 0


def test_index_matches_the_scan_incrementally():
    syn = synthesize(1500, seed=11, exact_rate=0.03, near_rate=0.05, templates="builtin")
    tok = _Tokens()
    enc = [tok.encode(t) for t in syn.table["input"].to_pylist()]
    index = NearDuplicateIndex(0.95, enc[:300])
    for k in range(300, len(enc)):
        scan = process.extractOne(enc[k], enc[:k], scorer=Indel.normalized_similarity, score_cutoff=0.95)
        assert index.contains(enc[k]) == (scan is not None)
        index.add(enc[k])


def test_candidate_filter_uses_the_index_with_the_same_verdicts(monkeypatch):
    syn = synthesize(2500, seed=5, exact_rate=0.03, near_rate=0.06, templates="builtin")
    qs = syn.table["input"].to_pylist()
    existing, candidates, held_out = qs[:1000], qs[1000:2300], qs[2300:]

    def verdicts(min_pool: int) -> list:
        monkeypatch.setattr(flt, "INDEX_MIN_POOL", min_pool)
        cf = CandidateFilter(Task(TaskSpec(kind="gsm8k")), FiltersSpec(), 1, existing=existing, held_out=held_out)
        out = [cf.judge(f"p{k}", q, "1 + 1 = 2\n#### 2") for k, q in enumerate(candidates)]
        assert bool(cf._indexes) == (min_pool < 10**9)
        return out

    scan, indexed = verdicts(10**9), verdicts(100)
    assert indexed == scan
    assert scan.count("near_duplicate") > 20 and scan.count("contaminated") > 0


def test_greedy_dedup_agrees_with_the_plain_scan():
    syn = synthesize(800, seed=3, exact_rate=0.0, near_rate=0.1, templates="builtin")
    texts = syn.table["input"].to_pylist()
    i, j, _ = near_duplicate_pairs(texts, 0.95)
    keep = greedy_keep(len(texts), i, j)
    assert np.array_equal(keep, naive_near(texts, 0.95))
    assert not keep[syn.near[:, 1]].any()  # no planted copy survives (its original is kept)


def test_normalize_all_is_the_filter_norm():
    texts = ["  Hello, WORLD!! foo_bar ", "x", "", " ", "a  b", "Naïve café über", "Émile 3.5 ß", "\u0130stanbul",
             "Janet\u2019s ducks \u201clay\u201d 16 eggs \u2014 per day", "3\u00b2 = 9", "tab\tand\nnewline"]
    assert normalize_all(texts).to_pylist() == [_norm(t) for t in texts]
