"""Reading user datasets (JSONL or Parquet, any fsspec URI) into the DATASET schema."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .schemas import DATASET, row_id, table


class DataError(ValueError):
    """A dataset that cannot be read or lacks the configured columns."""


def _read_rows(uri: str) -> list[dict]:
    try:
        with fsspec.open(uri, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file") from None
    except (OSError, ValueError, ImportError) as err:
        raise DataError(f"{uri}: cannot read: {err}") from None
    if uri.endswith(".parquet"):
        return pq.read_table(pa.BufferReader(raw)).to_pylist()
    rows = []
    for n, line in enumerate(raw.decode("utf-8", errors="strict").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{uri}:{n}: not valid JSON: {err}") from None
    return rows


def load_examples(uri: str, input_field: str, output_field: str, source: str, limit: int | None = None) -> pa.Table:
    """Rows of ``uri`` as a DATASET table; ids are content hashes, so duplicates collapse."""
    rows = _read_rows(uri)
    if limit is not None:
        rows = rows[:limit]
    out, seen = [], set()
    for n, row in enumerate(rows, 1):
        if input_field not in row or output_field not in row:
            raise DataError(f"{uri}: row {n} lacks {input_field!r} or {output_field!r} (has {sorted(row)})")
        inp, outp = str(row[input_field]), str(row[output_field])
        rid = row_id(inp, outp)
        if rid in seen:
            continue
        seen.add(rid)
        out.append({"id": rid, "source": source, "input": inp, "output": outp})
    if not out:
        raise DataError(f"{uri}: no examples")
    return table(out, DATASET)
