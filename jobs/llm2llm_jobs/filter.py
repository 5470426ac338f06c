"""Score and filter: judging student answers, and deciding which teacher candidates join the data.

The filter is deterministic: given the same candidates in the same order it keeps the same rows, so
the filter stage can be recomputed from the teach stage's output after a crash.
"""

from __future__ import annotations

import math
import operator
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rapidfuzz import process
from rapidfuzz.distance import Indel

from llm2llm.schemas import DATASET, REJECTED, SCORED, row_id, table
from llm2llm.spec import FiltersSpec
from llm2llm.tasks import Task, parse_teacher_output

from . import verify

_WORD = re.compile(r"\w+", re.UNICODE)
_GSM8K_TAIL = re.compile(r"(####\s*-?[0-9.,]+)[\s\S]*$")


def score(task: Task, predictions: pa.Table) -> tuple[pa.Table, dict]:
    """Add extracted answers and verdicts; return the table and accuracy per split."""
    rows = predictions.to_pylist()
    for r in rows:
        r["predicted_answer"] = task.extract(r["prediction"])
        r["gold_answer"] = task.extract(r["output"])
        r["correct"] = r["predicted_answer"] is not None and r["predicted_answer"] == r["gold_answer"]
    metrics: dict = {}
    for split in ("seed", "test"):
        part = [r for r in rows if r["split"] == split]
        if part:
            metrics[f"{split}_accuracy"] = sum(r["correct"] for r in part) / len(part)
            metrics[f"{split}_failures"] = sum(not r["correct"] for r in part)
    return table(rows, SCORED), metrics


class _Tokens:
    """Maps words to single characters, so rapidfuzz's Indel similarity on the encoded strings is
    ROUGE-L F1 over words (2*LCS / (len a + len b)), computed in C++."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}

    def encode(self, text: str) -> str:
        out = []
        for w in _WORD.findall(text.lower()):
            c = self._ids.get(w)
            if c is None:
                # Skip the surrogate block: those code points are not valid in str operations.
                n = len(self._ids) + 0x100
                c = chr(n if n < 0xD800 else n + 0x800)
                self._ids[w] = c
            out.append(c)
        return "".join(out)


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


# --- near-duplicate search ---------------------------------------------------------------------------
#
# ROUGE-L F1 over words is 2*LCS / (la + lb). Two facts limit which pairs can reach a threshold t:
#   length:  2*min(la, lb) / (la + lb) >= t, so lb lies in [la*t/(2-t), la*(2-t)/t];
#   overlap: the bags of words share at least LCS >= t*(la+lb)/2 >= t*la/(2-t) words, and the bags of
#            word q-grams all but a bounded number of A's q-grams (``_lost_grams``).
# Prefix filtering (Chaudhuri et al. 2006; Xiao et al. 2008) turns an overlap bound alpha into an exact
# blocking key: sort every bag by one global order (rarest first) and keep its first size - alpha + 1
# entries; two bags sharing >= alpha entries share an entry of their prefixes. Every pair at or above the
# threshold is therefore a candidate (no misses, whatever the data), and each candidate is scored with
# the same Indel similarity the plain scan uses, so verified results are identical to a full scan; only
# far fewer pairs are scored. Hashing entries into buckets only merges entries, which keeps the bounds.
# Generalised (``shared`` = k): prefixes k - 1 entries longer share at least k entries, since the k
# smallest shared entries all fall inside both; demanding k of them cuts candidates further.

_EPS = 1e-9


def _min_overlap(length: int, threshold: float) -> int:
    """Fewest words shared with any text whose ROUGE-L F1 with a ``length``-word text is >= threshold."""
    return max(1, math.ceil(threshold * length / (2 - threshold) - _EPS))


def _lost_grams(lengths: np.ndarray, threshold: float, q: int) -> np.ndarray:
    """Most q-grams (words for q=1) of a text that a partner scoring >= threshold can lack.

    With a words of A and b words of B outside their LCS, A loses at most q*a + (q-1)*b of its q-grams
    (a deleted word breaks the q-grams holding it, an insertion point the q-1 spanning it), and the
    score bound a*(2-t) + b*t <= 2*(1-t)*la holds; the maximum is at a corner of that region."""
    t = threshold
    corner_a = 2 * (1 - t) * lengths / (2 - t)
    corner_b = 2 * (1 - t) * lengths / t
    return np.floor(np.maximum(q * corner_a, (q - 1) * corner_b) + _EPS).astype(np.int64)


def _length_window(length: int, threshold: float) -> tuple[float, float]:
    return length * threshold / (2 - threshold) - _EPS, length * (2 - threshold) / threshold + _EPS


class NearDuplicateIndex:
    """Exact answers to "which stored texts have ROUGE-L F1 >= threshold with this one?" without a scan.

    Works on word-encoded strings (one character per word, as ``_Tokens`` makes them), so scores are the
    ones ``Indel.normalized_similarity`` gives on the same strings. The word order used for prefixes is
    fixed at construction (rarest first among ``items``); words first seen later rank as rarer than all
    of those, so a stored entry's prefix never changes. Append-only.
    """

    def __init__(self, threshold: float, items: Iterable[str] = ()):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        items = list(items)
        counts: Counter[str] = Counter()
        for s in items:
            counts.update(s)
        self._rank = {c: k for k, c in enumerate(sorted(counts, key=lambda c: (counts[c], c)))}
        self._items: list[str] = []
        self._postings: dict[str, list[int]] = {}
        for s in items:
            self.add(s)

    def __len__(self) -> int:
        return len(self._items)

    def _rank_of(self, c: str) -> int:
        r = self._rank.get(c)
        if r is None:  # unseen: rarer than every known word, and than every word seen before it
            r = self._rank[c] = -1 - len(self._rank)
        return r

    def _prefix(self, text: str) -> set[str]:
        keep = len(text) - _min_overlap(len(text), self.threshold) + 1
        return set(sorted(text, key=self._rank_of)[:keep])

    def add(self, text: str) -> int:
        """Store a word-encoded text; returns its position."""
        k = len(self._items)
        self._items.append(text)
        if text:
            for c in self._prefix(text):
                self._postings.setdefault(c, []).append(k)
        return k

    def _candidates(self, text: str) -> set[int]:
        lo, hi = _length_window(len(text), self.threshold)
        found: set[int] = set()
        for c in self._prefix(text):
            found.update(k for k in self._postings.get(c, ()) if lo <= len(self._items[k]) <= hi)
        return found

    def matches(self, text: str) -> list[tuple[int, float]]:
        """(position, score) of every stored text scoring >= threshold, by position. Empty text: none."""
        if not text:
            return []
        out = []
        for k in sorted(self._candidates(text)):
            score = Indel.normalized_similarity(text, self._items[k], score_cutoff=self.threshold)
            if score >= self.threshold:
                out.append((k, score))
        return out

    def contains(self, text: str) -> bool:
        """Whether any stored text scores >= threshold (what ``process.extractOne`` with the cutoff finds)."""
        if not text:
            return False
        t = self.threshold
        return any(Indel.normalized_similarity(text, self._items[k], score_cutoff=t) >= t
                   for k in self._candidates(text))


# Byte map for ASCII text: letters lower-cased, digits and '_' kept, everything else a space; splitting
# on spaces then gives exactly ``_WORD.findall(text.lower())`` (on ASCII, \w is [A-Za-z0-9_]).
_ASCII_WORD_BYTES = np.full(256, ord(" "), np.uint8)
for _c in b"abcdefghijklmnopqrstuvwxyz0123456789_":
    _ASCII_WORD_BYTES[_c] = _c
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
    _ASCII_WORD_BYTES[_c] = _c + 32


_NON_ASCII_WORD_CHAR = r"[^\x00-\x7F\P{L}]|[^\x00-\x7F\P{N}]"  # RE2: a non-ASCII letter or number


def _as_large_strings(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.large_string())
    return pc.fill_null(arr.cast(pa.large_string()), "")


def _ascii_lists(arr: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(word lists, rows without words, rows left to the regex) of a large_string array. Rows are split by
    Arrow over the byte map; rows without words and rows left to the regex get one empty word."""
    n = len(arr)
    offs = np.frombuffer(arr.buffers()[1], np.int64, n + 1, arr.offset * 8)
    data = arr.buffers()[2]
    size = int(offs[-1] - offs[0])
    raw = np.frombuffer(data, np.uint8, size, int(offs[0])) if data is not None and size else np.zeros(0, np.uint8)
    mapped = _ASCII_WORD_BYTES[raw]  # bytes of non-ASCII characters become spaces
    # Rows whose non-ASCII characters are all punctuation or symbols (curly quotes, dashes...) split
    # the same way; rows with non-ASCII letters or digits go through the regex.
    non_ascii = np.flatnonzero(~pc.string_is_ascii(arr).to_numpy(zero_copy_only=False))
    has_word = pc.match_substring_regex(arr.take(pa.array(non_ascii, pa.int64())), _NON_ASCII_WORD_CHAR)
    other = non_ascii[has_word.to_numpy(zero_copy_only=False).astype(bool)]
    for i in other:  # the regex handles these
        mapped[offs[i] - offs[0]:offs[i + 1] - offs[0]] = ord(" ")
    spaced = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offs - offs[0]), pa.py_buffer(mapped))
    spaced = pc.ascii_trim_whitespace(spaced)
    empty = pc.equal(pc.binary_length(spaced), 0).to_numpy(zero_copy_only=False)
    return pc.ascii_split_whitespace(spaced), empty, other


def normalize_all(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """``_norm`` of every text (its lower-cased words joined by single spaces), vectorised."""
    arr = _as_large_strings(texts)
    lists, _, other = _ascii_lists(arr)
    norm = pc.binary_join(lists, pa.scalar(" ", pa.large_string()))
    if len(other):
        mask = np.zeros(len(arr), bool)
        mask[other] = True
        norm = pc.replace_with_mask(norm, pa.array(mask), pa.array([_norm(arr[int(i)].as_py()) for i in other],
                                                                   pa.large_string()))
    return norm


def word_ids(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The words of every text (as ``_Tokens`` splits them) as integer ids: text i is
    ``ids[offsets[i]:offsets[i+1]]``; equal words get equal ids."""
    arr = _as_large_strings(texts)
    n = len(arr)
    lists, empty, other = _ascii_lists(arr)
    raw = lists.offsets.to_numpy().astype(np.int64)
    raw -= raw[0]
    encoded = pc.dictionary_encode(lists.flatten())
    ids = encoded.indices.to_numpy().astype(np.int64)
    lengths = np.diff(raw)
    if empty.any():  # their single empty word
        keep = np.ones(len(ids), bool)
        keep[raw[:-1][empty]] = False
        ids = ids[keep]
        lengths[empty] = 0
    if len(other):  # splice in the regex's words for the non-ASCII rows
        vocab = {w: k for k, w in enumerate(encoded.dictionary.to_pylist())}
        words = [_WORD.findall(arr[int(i)].as_py().lower()) for i in other]
        extra = np.array([vocab.setdefault(w, len(vocab)) for ws in words for w in ws], np.int64)
        old_off = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=old_off[1:])
        sizes = [len(ws) for ws in words]
        lengths[other] = sizes
        cuts = old_off[other].tolist()  # those rows have no words in ids: splice theirs in at their place
        pieces, prev, k = [], 0, 0
        for cut, size in zip(cuts, sizes):
            pieces += [ids[prev:cut], extra[k:k + size]]
            prev, k = cut, k + size
        pieces.append(ids[prev:])
        ids = np.concatenate(pieces)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ids, offsets


_BUCKET_BITS = 25
_DF_BITS = 15


def _bucket(x: np.ndarray) -> np.ndarray:
    h = x.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    return (h >> np.uint64(64 - _BUCKET_BITS)).astype(np.int64)


def _unique(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort-based: numpy's hash-based unique is much slower on large int64s)."""
    x = np.sort(x)
    keep = np.ones(len(x), bool)
    keep[1:] = x[1:] != x[:-1]
    return x[keep]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[k], starts[k] + counts[k])."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(total, dtype=np.int64)


def _prefix_pairs(buckets: np.ndarray, counts: np.ndarray, prefix: np.ndarray, lengths: np.ndarray,
                  threshold: float, min_shared: int = 1, chunk: int = 16_000_000, rare_cut: int = 8) -> np.ndarray:
    """Candidate pairs (as lo * n + hi keys) of rows sharing >= ``min_shared`` entries of their prefixes and
    within each other's length window. ``buckets`` holds every row's entries, row after row (``counts``
    per row); a row's first ``prefix`` entries in the global order are its prefix (0: takes no part)."""
    n = len(counts)
    if n >= 1 << 27:
        raise ValueError("at most 2**27 texts per call")
    bits = min(_BUCKET_BITS, max(12, len(buckets).bit_length()))  # fewer buckets for small inputs
    buckets = buckets >> (_BUCKET_BITS - bits)
    row_shift = bits + _DF_BITS
    # Global order: rarest bucket first (document frequency, capped), ties by bucket: a total order.
    df = np.bincount(buckets, minlength=1 << bits)
    freq = np.minimum(df[buckets], (1 << _DF_BITS) - 1)
    del df
    take = np.minimum(prefix, counts)
    # Entries at or below a frequency cut come before all others in every row's order, so a row with
    # enough of them finds its whole prefix among them: sort only those, plus every entry of the rows
    # that have too few.
    rare = freq <= rare_cut
    below = np.zeros(len(rare) + 1, np.int64)
    np.cumsum(rare, out=below[1:])
    ends = np.cumsum(counts)
    nrare = below[ends] - below[ends - counts]
    short = nrare < take
    del below
    pos = np.flatnonzero(rare | np.repeat(short, counts))
    del rare
    per_row = np.where(short, counts, nrare)
    key = (np.repeat(np.arange(n, dtype=np.int64), per_row) << row_shift) | (freq[pos] << bits) | buckets[pos]
    del pos, freq
    key.sort()
    starts = np.zeros(n, np.int64)
    np.cumsum(per_row[:-1], out=starts[1:])
    pk = key[_ranges(starts, take)]
    del key
    # A bucket seen once in all the data pairs with nothing: drop it before pairing.
    pbucket = pk & ((1 << bits) - 1)
    seen = np.bincount(pbucket, minlength=1 << bits) if len(pk) else np.zeros(1 << bits, np.int64)
    pk = pk[seen[pbucket] > 1]
    del seen
    prow = pk >> row_shift
    pbucket = pk & ((1 << bits) - 1)
    del pk
    if min_shared == 1:  # a bucket twice in one prefix adds nothing; with counting it must stay (see below)
        dup = np.zeros(len(prow), bool)
        dup[1:] = (prow[1:] == prow[:-1]) & (pbucket[1:] == pbucket[:-1])
        prow, pbucket = prow[~dup], pbucket[~dup]
    # Rows sharing a bucket, ordered by length: each pairs with the next ones up to its longest partner.
    # One sort of (bucket | length | row); lengths are capped, which only widens the windows.
    cap = (1 << 12) - 1
    g = (pbucket.astype(np.uint64) << np.uint64(39)) | (np.minimum(lengths[prow], cap).astype(np.uint64) << np.uint64(27)) \
        | prow.astype(np.uint64)
    del prow, pbucket
    g.sort()
    srow = (g & np.uint64((1 << 27) - 1)).astype(np.int64)
    gkey = g >> np.uint64(27)  # bucket | length
    del g
    longest = np.minimum(np.floor(lengths[srow] * (2 - threshold) / threshold + _EPS).astype(np.int64), cap)
    hi = np.searchsorted(gkey, (gkey >> np.uint64(12) << np.uint64(12)) | longest.astype(np.uint64), side="right")
    del gkey, longest
    partners = hi - np.arange(len(hi)) - 1
    del hi
    parts = []
    k, m = 0, len(partners)
    cum = np.cumsum(partners)
    while k < m:  # bounded memory: about ``chunk`` pairs at a time
        base = cum[k - 1] if k else 0
        end = max(int(np.searchsorted(cum, base + chunk, side="right")), k + 1)
        cnt = partners[k:end]
        first = np.repeat(np.arange(k, end, dtype=np.int64), cnt)
        second = first + 1 + _ranges(np.zeros(end - k, np.int64), cnt)
        a, b = srow[first], srow[second]
        del first, second
        pair = np.minimum(a, b) * n + np.maximum(a, b)
        if min_shared == 1:
            parts.append(_unique(pair))
        else:
            # Entries are counted with multiplicity (c_a * c_b >= min(c_a, c_b) shared), never too low.
            pair = np.sort(pair[a != b])
            starts_ = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(pair) else np.zeros(0, np.int64)
            runs = np.diff(np.r_[starts_, len(pair)])
            parts.append((pair[starts_] << 8) | np.minimum(runs, 255))  # key | count (pair keys < 2**54)
        k = end
    if not parts:
        return np.zeros(0, np.int64)
    merged = np.concatenate(parts)
    if min_shared == 1:
        return _unique(merged)
    merged.sort()
    pair, count = merged >> 8, merged & 255
    starts_ = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    total = np.add.reduceat(count, starts_)
    return pair[starts_][total >= min_shared]


_BAG_BUCKETS = 64


def _bag_counts(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row of ``rows``: how many of its words fall in each of _BAG_BUCKETS hash buckets (uint8)."""
    out = np.zeros((len(rows), _BAG_BUCKETS), np.uint8)
    step = 200_000
    for b in range(0, len(rows), step):
        part = rows[b:b + step]
        lengths = offsets[part + 1] - offsets[part]
        words = ids[_ranges(offsets[part], lengths)]
        slot = np.repeat(np.arange(len(part), dtype=np.int64) * _BAG_BUCKETS, lengths) + _bucket(words) % _BAG_BUCKETS
        counts = np.bincount(slot, minlength=len(part) * _BAG_BUCKETS).reshape(len(part), _BAG_BUCKETS)
        out[b:b + step] = np.minimum(counts, 255)
    return out


def _bag_filter(bags: np.ndarray, ia: np.ndarray, ja: np.ndarray, la: np.ndarray, lb: np.ndarray,
                threshold: float) -> np.ndarray:
    """Which pairs may still score >= threshold. ROUGE-L F1 <= 2*|bag A & bag B| / (la + lb), and summing
    min(count) per bucket over-counts that intersection (buckets only merge words): an exact rejection."""
    keep = np.zeros(len(ia), bool)
    step = 1_000_000
    for b in range(0, len(ia), step):
        shared = np.minimum(bags[ia[b:b + step]], bags[ja[b:b + step]]).sum(axis=1, dtype=np.int64)
        keep[b:b + step] = 2 * shared >= threshold * (la[b:b + step] + lb[b:b + step]) - 1e-6
    return keep


def _encoded(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> list[str]:
    """Word-encoded strings (one character per word id, as ``_Tokens`` builds them) of ``rows``."""
    lengths = offsets[rows + 1] - offsets[rows]
    cps = ids[_ranges(offsets[rows], lengths)] + 0x100
    cps[cps >= 0xD800] += 0x800  # skip the surrogate block
    if len(cps) and cps.max() > 0x10FFFF:
        raise ValueError("vocabulary too large to encode one word per character")
    big = cps.astype("<u4").tobytes().decode("utf-32-le")
    ends = np.cumsum(lengths)
    return [big[e - n:e] for e, n in zip(ends.tolist(), lengths.tolist())]


def near_duplicate_pairs(texts: Sequence[str] | pa.Array | pa.ChunkedArray, threshold: float = 0.95, *,
                         workers: int = 1, q: int = 3, shared: int = 3,
                         stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of texts whose ROUGE-L F1 over words is >= threshold, as the filter scores it.

    Returns ``(i, j, score)`` arrays with i < j, sorted by (i, j): the pairs an all-pairs scan with
    ``Indel.normalized_similarity`` on ``_Tokens`` encodings finds, with the same scores, after scoring
    only the candidates that prefix filtering (see above) lets through. Texts without words pair with
    nothing, as in ``CandidateFilter``. ``workers``: threads that score candidates (-1: all cores).
    ``q``: length of the word q-grams used as blocking keys (1: single words), and ``shared``: how many
    entries of their (correspondingly longer) prefixes a candidate pair must share. Any q and shared give
    the same result, only the number of candidates differs (q=3, shared=3 is best on GSM8K-like text).
    ``stats``, when given, receives counts and seconds per phase.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    t0 = time.perf_counter()
    ids, offsets = word_ids(texts)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    t = threshold
    t1 = time.perf_counter()
    keys = []
    # q-gram prefixes where the q-gram bound leaves enough shared q-grams; plain word prefixes for the
    # other rows and for every row that could pair with one of them.
    by_qgram = np.zeros(n, bool)
    if q > 1:
        grams = np.maximum(lengths - q + 1, 0)
        prefix = _lost_grams(lengths, t, q) + shared
        by_qgram = prefix <= grams
        if by_qgram.any():
            m = max(len(ids) - q + 1, 0)
            h = ids[:m].copy()  # a q-gram at every word position, then drop those crossing a row's end
            for d in range(1, q):
                h = h * np.int64(0x9E3779B1) + ids[d:d + m]
            ok = np.ones(m, bool)
            for d in range(1, q):
                ends = offsets[1:][lengths >= d] - d
                ok[ends[ends < m]] = False
            h = h[ok]
            del ok
            keys.append(_prefix_pairs(_bucket(h), grams, np.where(by_qgram, prefix, 0), lengths, t, shared))
            del h
    rest = (~by_qgram) & (lengths > 0)
    if rest.any():
        window = (lengths > 0) & (lengths <= _length_window(int(lengths[rest].max()), t)[1])
        rows = np.flatnonzero(window)
        sub_len = lengths[rows]
        local = _prefix_pairs(_bucket(ids[_ranges(offsets[rows], sub_len)]), sub_len,
                              _lost_grams(sub_len, t, 1) + 1, sub_len, t)
        m = len(rows)
        keys.append(rows[local // m] * n + rows[local % m])
    cand = _unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    t2 = time.perf_counter()
    i, j = cand // n, cand % n
    del cand
    candidates = len(i)
    if len(i):  # cheap exact rejection by bags of words before the LCS
        involved = _unique(np.concatenate([i, j]))
        ia, ja = np.searchsorted(involved, i), np.searchsorted(involved, j)
        ok = _bag_filter(_bag_counts(ids, offsets, involved), ia, ja, lengths[i], lengths[j], t)
        i, j = i[ok], j[ok]
    t3 = time.perf_counter()
    scores = np.zeros(len(i), np.float64)
    if len(i):
        involved = _unique(np.concatenate([i, j]))
        enc = _encoded(ids, offsets, involved)
        batch = 2_000_000  # candidates per scoring call
        for b in range(0, len(i), batch):
            pick_a = operator.itemgetter(*np.searchsorted(involved, i[b:b + batch]).tolist())
            pick_b = operator.itemgetter(*np.searchsorted(involved, j[b:b + batch]).tolist())
            a, c = pick_a(enc), pick_b(enc)
            if not isinstance(a, tuple):  # itemgetter of one index
                a, c = (a,), (c,)
            scores[b:b + batch] = process.cpdist(a, c, scorer=Indel.normalized_similarity, score_cutoff=t,
                                                 dtype=np.float64, workers=workers)
    hit = scores >= t
    if stats is not None:
        stats.update(texts=n, words=int(len(ids)), candidates=int(candidates), scored=int(len(i)),
                     pairs=int(hit.sum()),
                     seconds={"tokenize": round(t1 - t0, 3), "block": round(t2 - t1, 3),
                              "bag_filter": round(t3 - t2, 3), "verify": round(time.perf_counter() - t3, 3)})
    return i[hit], j[hit], scores[hit]


# Pools at least this large are searched through a NearDuplicateIndex instead of a full scan (the same
# verdicts); at low thresholds prefixes cover most of a text and the index stops paying off.
INDEX_MIN_POOL = 2000
INDEX_MIN_THRESHOLD = 0.5


@dataclass
class CandidateFilter:
    """Stateful over one teach stage: knows every row so far (all rounds) and the held-out inputs."""

    task: Task
    spec: FiltersSpec
    samples_per_failure: int
    existing: list[str]  # inputs of every training row so far
    held_out: list[str] = field(default_factory=list)
    # Ids of every training row so far. A row id is the hash of (input, output), and a training set holds each
    # id once: a candidate identical to a row already there, or to one kept before, is refused whatever dedup says.
    existing_ids: list[str] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set)
    _tok: _Tokens = field(default_factory=_Tokens)
    _seen: set[str] = field(default_factory=set)
    _known: list[str] = field(default_factory=list)
    _test_norm: set[str] = field(default_factory=set)
    _test_enc: list[str] = field(default_factory=list)
    kept_per_parent: dict[str, int] = field(default_factory=dict)
    _indexes: dict[int, tuple[list[str], NearDuplicateIndex]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for text in self.existing:
            self._remember(text)
        self._ids = set(self.existing_ids)
        self._test_norm = {_norm(t) for t in self.held_out}
        self._test_enc = [self._tok.encode(t) for t in self.held_out]

    def _remember(self, text: str) -> None:
        self._seen.add(_norm(text))
        self._known.append(self._tok.encode(text))

    def _near(self, enc: str, pool: list[str]) -> bool:
        if not pool or not enc:
            return False
        t = self.spec.near_threshold
        if len(pool) >= INDEX_MIN_POOL and t >= INDEX_MIN_THRESHOLD:
            # Same verdict as the scan below (see NearDuplicateIndex), without scoring the whole pool.
            pool_ref, index = self._indexes.get(id(pool), (None, None))
            if pool_ref is not pool or index is None:
                index = NearDuplicateIndex(t, pool)
                self._indexes[id(pool)] = (pool, index)
            for text in pool[len(index):]:  # pools only grow: add what was appended since
                index.add(text)
            return index.contains(enc)
        hit = process.extractOne(enc, pool, scorer=Indel.normalized_similarity, score_cutoff=t)
        return hit is not None

    def clean(self, output: str) -> str:
        """The training target a candidate's output becomes: what the task judges, without the chatter after it."""
        if self.task.spec.kind == "gsm8k":
            # Anything after the final answer line is the start of the next item or chatter.
            return _GSM8K_TAIL.sub(r"\1", output).strip()
        if self.task.spec.kind == "classification":
            # Only the first line is the label (Task.extract); the rest would become training target.
            return output.strip().split("\n", 1)[0].strip()
        return output.strip()

    def judge(self, parent_id: str, question: str, answer: str, checks: dict | None = None) -> str | None:
        """The reject reason, or None when the candidate is kept (and then remembered). ``checks``: what the
        teacher answered when asked to check it (filters.verify selfConsistency / relabel)."""
        reason = self.precheck(question, answer) or self._teacher_checks(answer, checks)
        if reason is not None:
            return reason
        if self.kept_per_parent.get(parent_id, 0) >= self.samples_per_failure:
            return "over_sampled"
        self.kept_per_parent[parent_id] = self.kept_per_parent.get(parent_id, 0) + 1
        self._remember(question)
        self._ids.add(row_id(question, answer))
        return None

    @property
    def needs_teacher_checks(self) -> bool:
        v, kind = self.spec.verify, self.task.spec.kind
        return (kind == "gsm8k" and v.self_consistency > 0) or (kind == "classification" and v.relabel)

    def _teacher_checks(self, answer: str, checks: dict | None) -> str | None:
        v, kind = self.spec.verify, self.task.spec.kind
        if kind == "gsm8k" and v.self_consistency > 0:
            solutions = (checks or {}).get("solutions")
            if not isinstance(solutions, list):
                return verify.UNVERIFIED
            return None if verify.majority_agrees(self.task.extract(answer), solutions) else verify.CONSISTENCY
        if kind == "classification" and v.relabel:
            if not checks or "label" not in checks:
                return verify.UNVERIFIED
            return None if checks["label"] == self.task.extract(answer) else verify.LABEL
        return None

    def precheck(self, question: str, answer: str) -> str | None:
        """Every check of ``judge`` that needs neither the teacher nor a slot for its parent; changes nothing.
        The teach stage asks the teacher to check only candidates that pass these."""
        if not question.strip() or not answer.strip():
            return "empty"
        if "\ufffd" in question + answer or any(0xD800 <= ord(c) <= 0xDFFF for c in question + answer):
            return "not_utf8"
        if len(question) + len(answer) > self.spec.max_output_chars:
            return "too_long"
        if not self.task.valid_output(answer):
            return "bad_format"
        if self.task.spec.kind == "gsm8k" and self.spec.verify.arithmetic:
            reason = verify.check_rationale(answer.split("####", 1)[0], self.task.extract(answer))
            if reason is not None:
                return reason
        norm = _norm(question)
        if self.spec.decontaminate and self.held_out:
            if norm in self._test_norm or self._near(self._tok.encode(question), self._test_enc):
                return "contaminated"
        if self.spec.dedup != "none" and norm in self._seen:
            return "duplicate"
        rid = row_id(question, answer)
        if rid in self._ids:
            return "duplicate_row"
        if self.spec.dedup == "near" and self._near(self._tok.encode(question), self._known):
            return "near_duplicate"
        return None


def filter_candidates(
    flt: CandidateFilter, generated: pa.Table, teacher_model: str, prompt_hash: str, iteration: int,
    cap: int | None = None,
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Split teach-stage candidates (GENERATED rows, in order) into kept DATASET rows and REJECTED rows.
    With ``cap`` (loop.rowsPerRound), candidates after the first ``cap`` kept ones are rejected as round_cap."""
    kept, rejected, reasons = [], [], {}
    for cand in generated.to_pylist():
        reason = cand.get("parse_error")
        if reason is None and cap is not None and len(kept) >= cap:
            reason = "round_cap"
        if reason is None:
            question, answer = cand["input"], flt.clean(cand["output"])
            reason = flt.judge(cand["parent_id"], question, answer, verify.load_checks(cand.get("checks")))
        if reason is None:
            kept.append(
                {
                    "id": row_id(question, answer),
                    "parent_id": cand["parent_id"],
                    "iteration": iteration,
                    "source": "teacher",
                    "teacher_model": teacher_model,
                    "prompt_hash": cand.get("prompt_hash") or prompt_hash,
                    "input": question,
                    "output": answer,
                }
            )
        else:
            rejected.append({**cand, "reason": reason})
            reasons[reason] = reasons.get(reason, 0) + 1
    return table(kept, DATASET), table(rejected, REJECTED), reasons


def candidates_from_completion(text: str, parent_id: str, round_: int, teacher_model: str, prompt_hash: str,
                               iteration: int, prompt_tokens: int, completion_tokens: int, *,
                               parse: Callable[[str], list[tuple[str, str]]] = parse_teacher_output) -> list[dict]:
    """GENERATED rows from one teacher completion (one row per item ``parse`` finds, or one unparseable
    row). Token counts are attributed to the first row so sums stay exact."""
    base = {"parent_id": parent_id, "iteration": iteration, "source": "teacher", "teacher_model": teacher_model,
            "prompt_hash": prompt_hash, "raw": text, "round": round_, "checks": None}
    if not text.strip():
        pairs, error = [], "empty"
    elif "\ufffd" in text:
        pairs, error = [], "not_utf8"
    else:
        pairs = parse(text)
        error = None if pairs else "unparseable"
    if not pairs:
        return [{**base, "id": row_id(parent_id, text + str(round_)), "input": None, "output": None,
                 "parse_error": error, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}]
    rows = []
    for n, (q, a) in enumerate(pairs):
        rows.append({**base, "id": row_id(q, a), "input": q, "output": a, "parse_error": None,
                     "prompt_tokens": prompt_tokens if n == 0 else 0,
                     "completion_tokens": completion_tokens if n == 0 else 0})
    return rows
