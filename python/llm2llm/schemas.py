"""Parquet schemas of every stage, with lineage columns.

Every training row carries a stable ``id`` (content hash of input and output), its ``parent_id`` (the
seed row it was generated from), the ``iteration`` whose teach stage created it, its ``source``, the
teacher model and the teacher prompt's hash.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

LINEAGE = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("parent_id", pa.string()),
    pa.field("iteration", pa.int32()),
    pa.field("source", pa.string(), nullable=False),  # seed | teacher | test
    pa.field("teacher_model", pa.string()),
    pa.field("prompt_hash", pa.string()),
]

# Seed, test and cumulative training sets.
DATASET = pa.schema([*LINEAGE, pa.field("input", pa.string(), nullable=False), pa.field("output", pa.string(), nullable=False)])

# infer: one row per (split, example), greedy generation of the student.
PREDICTIONS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # seed | test
        pa.field("input", pa.string(), nullable=False),
        pa.field("output", pa.string(), nullable=False),
        pa.field("prediction", pa.string(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
    ]
)

# score: predictions plus the extracted answers and the verdict.
SCORED = pa.schema(
    [
        *PREDICTIONS,
        pa.field("predicted_answer", pa.string()),
        pa.field("gold_answer", pa.string()),
        pa.field("correct", pa.bool_(), nullable=False),
    ]
)

# teach: raw teacher candidates, parsed where possible.
GENERATED = pa.schema(
    [
        *LINEAGE,
        pa.field("input", pa.string()),
        pa.field("output", pa.string()),
        pa.field("raw", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("parse_error", pa.string()),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
        # filters.verify: what the teacher answered when asked to check this candidate (JSON: "solutions" for
        # GSM8K self-consistency, "label" for relabelling); null when not asked. Its tokens are in the counts.
        pa.field("checks", pa.string()),
    ]
)

# filter: rejected candidates with the reason.
REJECTED = pa.schema([*GENERATED, pa.field("reason", pa.string(), nullable=False)])

REJECT_REASONS = (
    "unparseable",  # the teacher's text has no 'Question: / Answer:' block
    "bad_format",  # the answer does not have the task's format (e.g. no '#### <number>')
    "too_long",
    "empty",
    "not_utf8",
    "duplicate",  # exact duplicate of a row so far (any round) or in this batch
    "near_duplicate",  # ROUGE-L above the threshold against rows so far
    "contaminated",  # overlaps the held-out test set
    "over_sampled",  # more than samplesPerFailure survived for one parent
    "budget",  # teacher token budget used up
    "round_cap",  # the round already added loop.rowsPerRound rows
    "verify_arithmetic",  # filters.verify.arithmetic: a step of the rationale does not compute
    "verify_final",  # filters.verify.arithmetic: the final answer is not the last step's result
    "verify_consistency",  # filters.verify.selfConsistency: most of the teacher's own solutions disagree
    "verify_label",  # filters.verify.relabel: the teacher labels the new input otherwise
    "verify_missing",  # a teacher-side check is on but was not made for this candidate
)


def row_id(input_text: str, output_text: str) -> str:
    """Stable content id: the same example always gets the same id, across rounds and runs."""
    h = hashlib.sha256()
    h.update(input_text.encode("utf-8", "surrogatepass"))
    h.update(b"\x1f")
    h.update(output_text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:20]


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows to a table, checked against the schema (missing nullable columns become null)."""
    return pa.Table.from_pylist(rows, schema=schema)
