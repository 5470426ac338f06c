"""Where a training row came from: ``llm2llm lineage RUN_DIR ROW_ID``.

Walks a row back through the run folder with pyarrow only: the teacher row (``iter-<i>/filter/kept.parquet``,
or a rejected candidate in ``filter/rejected.parquet``), its parent (a seed row, ``data/seed.parquet``), the
student's wrong prediction for that parent in that iteration (``iter-<i>/score/scored.parquet``), and the
chain of iterations the row went through (generated, kept, merged, trained on).
"""

from __future__ import annotations

import posixpath
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .schemas import DATASET, REJECTED, SCORED
from .storage import RunStorage, StorageError

_ITER_DIR = re.compile(r"^iter-(\d+)$")


class LineageError(LookupError):
    """The row cannot be found (or the folder is not a run)."""


def open_run(uri: str) -> RunStorage:
    """A run folder given as one path or URI (``runs/demo``, ``s3://bucket/out/demo``)."""
    uri = uri.rstrip("/")
    if not uri:
        raise StorageError("empty run folder")
    if "://" in uri and uri.split("://", 1)[1].count("/") == 0:
        raise StorageError(f"{uri}: a run folder is <output>/<run>, not a bucket root")
    parent, _, name = uri.rpartition("/")
    if "://" in uri and parent.endswith(":/"):  # e.g. file:///run -> parent 'file://'
        parent += "/"
    return RunStorage(parent or ".", name)


def is_run(store: RunStorage) -> bool:
    return any(store.exists(store.path(p)) for p in ("run.json", "status.json", "data/seed.parquet", "iter-0"))


def iteration_indices(store: RunStorage) -> list[int]:
    """Every ``iter-<i>`` folder present (committed or not), in order."""
    try:
        entries = store.fs.ls(store.root, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        m = _ITER_DIR.match(posixpath.basename(str(entry).rstrip("/")))
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def read_optional(store: RunStorage, rel: str, schema: pa.Schema | None = None) -> pa.Table | None:
    """A Parquet file of the run, or None when it does not exist (a stage that did not run)."""
    try:
        return store.read_table(store.path(rel), schema)
    except FileNotFoundError:
        return None


def _find(table: pa.Table | None, row_id: str) -> dict[str, Any] | None:
    if table is None or table.num_rows == 0:
        return None
    hit = table.filter(pc.equal(table["id"], row_id))
    return hit.to_pylist()[0] if hit.num_rows else None


@dataclass
class Found:
    """One row and where it lives."""

    row: dict[str, Any]
    file: str  # relative to the run folder
    kind: str  # seed | test | kept | rejected
    iteration: int | None = None


@dataclass
class Step:
    """One link of the chain: what happened to the row (or its parent) in one iteration."""

    iteration: int | None
    text: str


@dataclass
class Lineage:
    run: str
    row: Found
    ancestors: list[Found] = field(default_factory=list)  # parent, grandparent, ... up to a seed row
    prediction: dict[str, Any] | None = None  # the student's scored prediction for the parent
    chain: list[Step] = field(default_factory=list)

    @property
    def seed(self) -> Found | None:
        found = [self.row, *self.ancestors]
        return next((f for f in reversed(found) if f.kind == "seed"), None)

    def to_dict(self) -> dict[str, Any]:
        def f(x: Found) -> dict[str, Any]:
            return {"kind": x.kind, "file": x.file, "iteration": x.iteration, "row": x.row}

        return {
            "run": self.run,
            "row": f(self.row),
            "ancestors": [f(a) for a in self.ancestors],
            "prediction": self.prediction,
            "chain": [{"iteration": s.iteration, "text": s.text} for s in self.chain],
        }


class RunIndex:
    """Lazily loaded tables of one run folder (each file read at most once)."""

    def __init__(self, store: RunStorage):
        self.store = store
        self.iters = iteration_indices(store)
        self._cache: dict[str, pa.Table | None] = {}

    def table(self, rel: str, schema: pa.Schema | None = None) -> pa.Table | None:
        if rel not in self._cache:
            self._cache[rel] = read_optional(self.store, rel, schema)
        return self._cache[rel]

    def locate(self, row_id: str) -> Found | None:
        """Kept teacher rows first (they are what trains), then seed and test, then rejected candidates."""
        for i in self.iters:
            row = _find(self.table(f"iter-{i}/filter/kept.parquet", DATASET), row_id)
            if row is not None:
                return Found(row, f"iter-{i}/filter/kept.parquet", "kept", i)
        for split in ("seed", "test"):
            row = _find(self.table(f"data/{split}.parquet", DATASET), row_id)
            if row is not None:
                return Found(row, f"data/{split}.parquet", split, None)
        for i in self.iters:
            row = _find(self.table(f"iter-{i}/filter/rejected.parquet", REJECTED), row_id)
            if row is not None:
                return Found(row, f"iter-{i}/filter/rejected.parquet", "rejected", i)
        return None

    def ids_with_prefix(self, prefix: str, limit: int = 10) -> list[str]:
        out: set[str] = set()
        files = ["data/seed.parquet", "data/test.parquet"]
        files += [f"iter-{i}/filter/{name}.parquet" for i in self.iters for name in ("kept", "rejected")]
        for rel in files:
            t = self.table(rel)
            if t is None or t.num_rows == 0:
                continue
            hits = t.filter(pc.starts_with(t["id"], prefix))["id"].to_pylist()
            out.update(hits)
            if len(out) > limit:
                break
        return sorted(out)

    def prediction(self, iteration: int, row_id: str) -> dict[str, Any] | None:
        t = self.table(f"iter-{iteration}/score/scored.parquet", SCORED)
        if t is None or t.num_rows == 0:
            return None
        hit = t.filter(pc.and_(pc.equal(t["id"], row_id), pc.equal(t["split"], "seed")))
        return hit.to_pylist()[0] if hit.num_rows else None

    def in_merge(self, iteration: int, row_id: str) -> bool:
        t = self.table(f"iter-{iteration}/merge/train.parquet", DATASET)
        return t is not None and t.num_rows > 0 and pc.any(pc.equal(t["id"], row_id)).as_py()


def lineage(store: RunStorage, row_id: str) -> Lineage:
    """The lineage of one row id (an exact id, or a unique prefix of at least 6 characters)."""
    idx = RunIndex(store)
    found = idx.locate(row_id)
    if found is None and len(row_id) >= 6:
        matches = idx.ids_with_prefix(row_id)
        if len(matches) == 1:
            found = idx.locate(matches[0])
        elif len(matches) > 1:
            raise LineageError(f"row id prefix {row_id!r} is ambiguous: {', '.join(matches[:10])}")
    if found is None:
        raise LineageError(
            f"row {row_id!r} not found in {store.uri()}: searched data/seed.parquet, data/test.parquet and the "
            f"kept and rejected rows of {len(idx.iters)} iteration folder(s)"
        )
    out = Lineage(run=store.uri(), row=found)

    # Ancestors: follow parent_id until a row without a parent (a seed row), guarding against cycles.
    seen = {found.row["id"]}
    cur = found
    while cur.row.get("parent_id"):
        pid = cur.row["parent_id"]
        if pid in seen:
            break
        seen.add(pid)
        parent = idx.locate(pid)
        if parent is None:
            out.ancestors.append(Found({"id": pid}, "?", "missing", None))
            break
        out.ancestors.append(parent)
        cur = parent

    if found.iteration is not None and out.ancestors and out.ancestors[0].kind != "missing":
        out.prediction = idx.prediction(found.iteration, out.ancestors[0].row["id"])
    out.chain = _chain(idx, store, out)
    return out


def _chain(idx: RunIndex, store: RunStorage, lin: Lineage) -> list[Step]:
    steps: list[Step] = []
    links = [lin.row, *lin.ancestors][::-1]  # oldest first
    root = links[0]
    if root.kind == "missing":
        steps.append(Step(None, f"parent {root.row['id']} is not in this run folder"))
    elif root.kind in ("seed", "test"):
        steps.append(Step(None, f"{root.kind} row {root.row['id']} ({root.file})"))
    for parent, child in zip(links, links[1:]):
        i = child.iteration
        if i is None:
            continue
        pred = idx.prediction(i, parent.row["id"]) if parent.kind != "missing" else None
        if pred is not None:
            verdict = "right" if pred["correct"] else "wrong"
            steps.append(Step(i, f"iteration {i}: student answered {verdict} "
                                 f"(predicted {pred['predicted_answer']!s}, gold {pred['gold_answer']!s})"))
        model = child.row.get("teacher_model") or "teacher"
        rnd = child.row.get("round")
        steps.append(Step(i, f"iteration {i}: {model} generated {child.row['id']}"
                             + (f" (round {rnd})" if rnd is not None else "")))
        if child.kind == "rejected":
            steps.append(Step(i, f"iteration {i}: filter rejected it: {child.row.get('reason')}"))
            continue
        steps.append(Step(i, f"iteration {i}: filter kept it ({child.file})"))
        if idx.in_merge(i, child.row["id"]):
            steps.append(Step(i, f"iteration {i}: merged into iter-{i}/merge/train.parquet"))
    # Which later iterations trained on it: every committed iteration after the one that merged it.
    last = lin.row
    if last.kind in ("kept", "seed"):
        start = 0 if last.kind == "seed" else (last.iteration or 0) + 1
        trained = [i for i in store.iterations() if i >= start]
        if trained:
            span = f"{trained[0]}" if len(trained) == 1 else f"{trained[0]}-{trained[-1]}"
            steps.append(Step(trained[0], f"trained on in iteration(s) {span}"))
        else:
            steps.append(Step(None, "not trained on yet: no committed iteration after it"))
    return steps


def _block(label: str, text: Any, width: int = 100) -> list[str]:
    text = "" if text is None else str(text)
    lines = [f"  {label}:"]
    for para in text.splitlines() or [""]:
        wrapped = textwrap.wrap(para, width=width, replace_whitespace=False, drop_whitespace=False) or [""]
        lines += [f"    {w}" for w in wrapped]
    return lines


def _describe(f: Found, title: str) -> list[str]:
    r = f.row
    lines = [f"{title} {r.get('id')}  [{f.kind}, {f.file}]"]
    if f.kind == "missing":
        return lines + ["  (not found in this run folder)"]
    meta = [("iteration", r.get("iteration")), ("source", r.get("source")), ("teacher model", r.get("teacher_model")),
            ("prompt hash", r.get("prompt_hash")), ("parent id", r.get("parent_id"))]
    if f.kind == "rejected":
        meta += [("round", r.get("round")), ("rejected", r.get("reason"))]
    if f.kind in ("seed", "test"):
        meta = [(k, v) for k, v in meta if v is not None]
    lines += [f"  {k + ':':<15}{'-' if v is None else v}" for k, v in meta]
    lines += _block("input", r.get("input"))
    lines += _block("output", r.get("output"))
    if f.kind == "rejected" and r.get("input") is None:
        lines += _block("raw teacher text", r.get("raw"))
    return lines


def format_lineage(lin: Lineage) -> str:
    lines = [f"run: {lin.run}", ""]
    lines += _describe(lin.row, "row")
    for n, anc in enumerate(lin.ancestors):
        lines.append("")
        lines += _describe(anc, "parent" if n == 0 else "ancestor")
    if lin.prediction is not None:
        p = lin.prediction
        verdict = "correct" if p["correct"] else "wrong"
        lines += ["", f"student's prediction for the parent in iteration {p['iteration']} ({verdict}: "
                      f"predicted {p['predicted_answer']!s}, gold {p['gold_answer']!s}, backend {p['backend']})"]
        lines += _block("prediction", p["prediction"])
    lines += ["", "chain:"]
    lines += [f"  {'-' if s.iteration is None else s.iteration:>3}  {s.text}" for s in lin.chain]
    return "\n".join(lines)
