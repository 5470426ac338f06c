"""Score and filter: judging student answers, and deciding which teacher candidates join the data.

The filter is deterministic: given the same candidates in the same order it keeps the same rows, so
the filter stage can be recomputed from the teach stage's output after a crash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa
from rapidfuzz import process
from rapidfuzz.distance import Indel

from llm2llm.schemas import DATASET, REJECTED, SCORED, row_id, table
from llm2llm.spec import FiltersSpec
from llm2llm.tasks import Task, parse_teacher_output

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


@dataclass
class CandidateFilter:
    """Stateful over one teach stage: knows every row so far (all rounds) and the held-out inputs."""

    task: Task
    spec: FiltersSpec
    samples_per_failure: int
    existing: list[str]  # inputs of every training row so far
    held_out: list[str] = field(default_factory=list)
    _tok: _Tokens = field(default_factory=_Tokens)
    _seen: set[str] = field(default_factory=set)
    _known: list[str] = field(default_factory=list)
    _test_norm: set[str] = field(default_factory=set)
    _test_enc: list[str] = field(default_factory=list)
    kept_per_parent: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for text in self.existing:
            self._remember(text)
        self._test_norm = {_norm(t) for t in self.held_out}
        self._test_enc = [self._tok.encode(t) for t in self.held_out]

    def _remember(self, text: str) -> None:
        self._seen.add(_norm(text))
        self._known.append(self._tok.encode(text))

    def _near(self, enc: str, pool: list[str]) -> bool:
        if not pool or not enc:
            return False
        hit = process.extractOne(enc, pool, scorer=Indel.normalized_similarity, score_cutoff=self.spec.near_threshold)
        return hit is not None

    def clean(self, output: str) -> str:
        if self.task.spec.kind == "gsm8k":
            # Anything after the final answer line is the start of the next item or chatter.
            return _GSM8K_TAIL.sub(r"\1", output).strip()
        return output.strip()

    def judge(self, parent_id: str, question: str, answer: str) -> str | None:
        """The reject reason, or None when the candidate is kept (and then remembered)."""
        if not question.strip() or not answer.strip():
            return "empty"
        if "\ufffd" in question + answer or any(0xD800 <= ord(c) <= 0xDFFF for c in question + answer):
            return "not_utf8"
        if len(question) + len(answer) > self.spec.max_output_chars:
            return "too_long"
        if not self.task.valid_output(answer):
            return "bad_format"
        norm = _norm(question)
        if self.spec.decontaminate and self.held_out:
            if norm in self._test_norm or self._near(self._tok.encode(question), self._test_enc):
                return "contaminated"
        if self.spec.dedup != "none" and norm in self._seen:
            return "duplicate"
        if self.spec.dedup == "near" and self._near(self._tok.encode(question), self._known):
            return "near_duplicate"
        if self.kept_per_parent.get(parent_id, 0) >= self.samples_per_failure:
            return "over_sampled"
        self.kept_per_parent[parent_id] = self.kept_per_parent.get(parent_id, 0) + 1
        self._remember(question)
        return None


def filter_candidates(
    flt: CandidateFilter, generated: pa.Table, teacher_model: str, prompt_hash: str, iteration: int
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Split teach-stage candidates (GENERATED rows, in order) into kept DATASET rows and REJECTED rows."""
    kept, rejected, reasons = [], [], {}
    for cand in generated.to_pylist():
        reason = cand.get("parse_error")
        if reason is None:
            question, answer = cand["input"], flt.clean(cand["output"])
            reason = flt.judge(cand["parent_id"], question, answer)
        if reason is None:
            kept.append(
                {
                    "id": row_id(question, answer),
                    "parent_id": cand["parent_id"],
                    "iteration": iteration,
                    "source": "teacher",
                    "teacher_model": teacher_model,
                    "prompt_hash": prompt_hash,
                    "input": question,
                    "output": answer,
                }
            )
        else:
            rejected.append({**cand, "reason": reason})
            reasons[reason] = reasons.get(reason, 0) + 1
    return table(kept, DATASET), table(rejected, REJECTED), reasons


def candidates_from_completion(text: str, parent_id: str, round_: int, teacher_model: str, prompt_hash: str,
                               iteration: int, prompt_tokens: int, completion_tokens: int) -> list[dict]:
    """GENERATED rows from one teacher completion (one row per parsed item, or one unparseable row).
    Token counts are attributed to the first row so sums stay exact."""
    base = {"parent_id": parent_id, "iteration": iteration, "source": "teacher", "teacher_model": teacher_model,
            "prompt_hash": prompt_hash, "raw": text, "round": round_}
    if not text.strip():
        pairs, error = [], "empty"
    elif "\ufffd" in text:
        pairs, error = [], "not_utf8"
    else:
        pairs = parse_teacher_output(text)
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
