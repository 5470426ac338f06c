"""Reading user datasets (JSONL or Parquet, any fsspec URI) into the DATASET schema.

A row is used only when it fits the task: its input and output fields are non-empty strings, and the output
has the task's answer format (a classification output is one of ``task.labels``; a gsm8k output ends in
``#### <number>``). Anything else is refused with the file, the row (the 1-based line of a JSONL file, the
1-based row of a Parquet file) and the field, never trained on or silently turned into text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .schemas import DATASET, row_id, table
from .spec import TaskSpec
from .tasks import Task

# Problems listed per file before the rest are only counted: enough to see a pattern, not a wall of text.
MAX_PROBLEMS = 10


class DataError(ValueError):
    """A dataset that cannot be read, lacks the configured columns, or has rows that do not fit the task.

    ``problems`` has one line per problem, each naming the file and, where there is one, the row and field."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _kind(value: object) -> str:
    """A JSON-ish name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(uri: str, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{uri}: line 1: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                        "save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark (some editors write one) is harmless
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        hint = " (it looks like a Parquet file: name it .parquet)" if raw.startswith(b"PAR1") else \
            "; save it as UTF-8"
        raise DataError(f"{uri}: line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column})"
                        f"{hint}") from None


def _jsonl_rows(uri: str, raw: bytes, limit: int | None) -> Iterator[tuple[str, object]]:
    # Lines end at "\n" only (JSON Lines): str.splitlines would also split at U+2028, \x1c... which a JSON
    # string may hold as they are.
    n = 0
    for number, line in enumerate(_decode(uri, raw).split("\n"), 1):
        if not line.strip():
            continue
        if limit is not None and n >= limit:
            return
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{uri}: line {number}: not valid JSON: {err.msg} (column {err.colno})") from None
        except (ValueError, RecursionError) as err:  # an integer of 5000 digits, nesting thousands deep
            raise DataError(f"{uri}: line {number}: not usable JSON: {err}") from None
        n += 1
        yield f"line {number}", row


def _parquet_rows(uri: str, raw: bytes, fields: tuple[str, str], limit: int | None) -> Iterator[tuple[str, object]]:
    try:
        pf = pq.ParquetFile(pa.BufferReader(raw))
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{uri}: not a readable Parquet file: {err}") from None
    names = schema.names
    problems = []
    for field in dict.fromkeys(fields):
        count = names.count(field)
        if count == 0:
            problems.append(f"{uri}: no column {field!r} (the file has {', '.join(map(repr, names)) or 'none'})")
        elif count > 1:
            problems.append(f"{uri}: column {field!r} appears {count} times")
        else:
            kind = schema.field(field).type
            if pa.types.is_dictionary(kind):
                kind = kind.value_type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
                problems.append(f"{uri}: column {field!r} has type {schema.field(field).type}; it must hold strings")
    if problems:
        raise DataError(problems)
    try:
        t = pf.read(columns=list(dict.fromkeys(fields)))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{uri}: not a readable Parquet file: {err}") from None
    if limit is not None:
        t = t.slice(0, limit)
    columns = {f: _strings(uri, f, t.column(f)) for f in dict.fromkeys(fields)}
    for n in range(t.num_rows):
        yield f"row {n + 1}", {f: columns[f][n] for f in columns}


def _strings(uri: str, field: str, column: pa.ChunkedArray) -> list:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # a writer that did not check its strings: find the first bad row
        values = column.combine_chunks()
        for n in range(len(values)):
            try:
                values[n].as_py()
            except UnicodeDecodeError as err:
                raise DataError(f"{uri}: row {n + 1}, field {field!r}: not UTF-8 text ({err.reason})") from None
        raise DataError(f"{uri}: column {field!r}: not UTF-8 text") from None


def _read(uri: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{uri}: a folder, not a file") from None
    except (OSError, ValueError, ImportError) as err:
        raise DataError(f"{uri}: cannot read: {err}") from None


def _text(value: object) -> str:
    """The field's value as training text; ValueError says why it cannot be."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_kind(value)}" + ("" if value is None else f" ({_short(value)})"))
    if not value.strip():
        raise ValueError("is empty" if not value else "is only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"is not valid Unicode (a lone surrogate {value[err.start]!r})") from None
    return value


def _fits(task: TaskSpec, output: str) -> str | None:
    """Why ``output`` is not a gold answer of ``task``, or None."""
    if task.kind == "gsm8k" and Task(task).extract(output) is None:
        return f"{_short(output)} has no final answer '#### <number>' (task.kind gsm8k)"
    if task.kind == "classification" and task.labels:
        labels = {" ".join(label.split()) for label in task.labels}
        if " ".join(output.split()) not in labels:
            return f"{_short(output)} is not one of task.labels ({', '.join(task.labels)})"
    return None


def load_examples(uri: str, input_field: str, output_field: str, source: str, limit: int | None = None,
                  task: TaskSpec | None = None) -> pa.Table:
    """The first ``limit`` rows of ``uri`` as a DATASET table; ids are content hashes, so duplicates collapse.

    Raises DataError listing the rows that are not usable (with ``task``: also those that do not fit it)."""
    raw = _read(uri)
    if uri.endswith(".parquet"):
        rows = _parquet_rows(uri, raw, (input_field, output_field), limit)
    else:
        rows = _jsonl_rows(uri, raw, limit)
    out, seen, problems, more = [], set(), [], 0
    for where, row in rows:
        found = []
        if not isinstance(row, dict):
            found.append(f"{uri}: {where}: not a JSON object but {_kind(row)} ({_short(row)}); each line must be "
                         f"one object with the fields {input_field!r} and {output_field!r}")
        else:
            values = {}
            for field in dict.fromkeys((input_field, output_field)):
                if field not in row:
                    has = ", ".join(repr(k) for k in sorted(row)[:20]) or "none"
                    found.append(f"{uri}: {where}: lacks {field!r} (the row has {has})")
                    continue
                try:
                    values[field] = _text(row[field])
                except ValueError as err:
                    found.append(f"{uri}: {where}, field {field!r}: {err}")
            if len(values) == len({input_field, output_field}) and task is not None:
                why = _fits(task, values[output_field])
                if why:
                    found.append(f"{uri}: {where}, field {output_field!r}: {why}")
        if found:
            shown = found[: MAX_PROBLEMS - len(problems)]
            problems += shown
            more += len(found) - len(shown)
            continue
        inp, outp = values[input_field], values[output_field]
        rid = row_id(inp, outp)
        if rid in seen:
            continue
        seen.add(rid)
        out.append({"id": rid, "source": source, "input": inp, "output": outp})
    if problems:
        raise DataError(problems + ([f"{uri}: ... and {more} more problems"] if more else []))
    if not out:
        raise DataError(f"{uri}: no examples (the file has no rows)")
    return table(out, DATASET)
