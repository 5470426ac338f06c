"""Which seed examples the teacher sees each round, and how many rows a round may add (spec.loop).

- ``select: failures`` (the default, LLM2LLM): the seed examples the student got wrong, in seed order.
- ``select: random`` (a control): seed examples in a random order, seeded by student.training.seed and the
  iteration, so a retried job or a re-run draws the same ones. With n = ``rowsPerRound[i]`` it asks about
  ``RANDOM_OVERDRAW * ceil(n / samplesPerFailure)`` of them (the teacher's output is not always usable),
  and the filter keeps the first n accepted rows in that order.

Pure functions over plain rows: the iteration calls them in its teach and filter stages.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

from llm2llm.spec import LoopSpec

# Seed examples drawn per row wanted (select: random), so that rejected teacher output rarely leaves a
# round short of its rowsPerRound.
RANDOM_OVERDRAW = 2


def round_cap(loop: LoopSpec, iteration: int) -> int | None:
    """The most rows round ``iteration`` may add (rowsPerRound, the last item repeating), or None."""
    rows = loop.rows_per_round
    if not rows:
        return None
    return rows[min(iteration, len(rows) - 1)]


def select_seed_rows(seed_rows: Sequence[dict[str, Any]], loop: LoopSpec, samples_per_failure: int, seed: int,
                     iteration: int) -> list[dict[str, Any]]:
    """The scored seed rows (with ``correct``) the teacher is asked about this round, in priority order."""
    if loop.select == "failures":
        return [r for r in seed_rows if not r["correct"]]
    n = round_cap(loop, iteration) or 0
    want = min(len(seed_rows), RANDOM_OVERDRAW * math.ceil(n / max(samples_per_failure, 1)))
    order = list(range(len(seed_rows)))
    random.Random(seed * 1_000_003 + iteration).shuffle(order)
    return [seed_rows[j] for j in order[:want]]


def in_selection_order(candidates: Sequence[dict[str, Any]], selected: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher candidates ordered by their parent's place in the selection (stable within a parent), so
    a cap keeps the rows of the first-drawn seed examples. Unknown parents go last."""
    rank = {r["id"]: k for k, r in enumerate(selected)}
    return sorted(candidates, key=lambda c: rank.get(c["parent_id"], len(rank)))
