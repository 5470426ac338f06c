"""Which seed examples the teacher sees (spec.loop.select) and how many rows a round adds (rowsPerRound)."""

from __future__ import annotations

from llm2llm.schemas import GENERATED, table
from llm2llm.spec import FiltersSpec, LoopSpec, TaskSpec
from llm2llm.tasks import Task
from llm2llm_jobs.filter import CandidateFilter, candidates_from_completion, filter_candidates
from llm2llm_jobs.select import RANDOM_OVERDRAW, in_selection_order, round_cap, select_seed_rows

SEED = [{"id": f"s{k}", "input": f"review {k}", "output": "positive", "correct": k % 3 != 0} for k in range(30)]
FAILED = ["s0", "s3", "s6", "s9", "s12", "s15", "s18", "s21", "s24", "s27"]


def ids(rows):
    return [r["id"] for r in rows]


def test_default_sends_the_failures_in_seed_order():
    assert ids(select_seed_rows(SEED, LoopSpec(), 1, seed=1, iteration=0)) == FAILED
    # A cap does not change which examples go to the teacher; the filter applies it.
    assert ids(select_seed_rows(SEED, LoopSpec(rows_per_round=[2]), 1, seed=1, iteration=4)) == FAILED


def test_rows_per_round_uses_item_i_and_the_last_repeats():
    loop = LoopSpec(rows_per_round=[5, 0, 2])
    assert [round_cap(loop, i) for i in range(5)] == [5, 0, 2, 2, 2]
    assert round_cap(LoopSpec(), 3) is None


def test_random_draws_twice_the_rows_wanted_from_the_whole_seed_set():
    loop = LoopSpec(select="random", rows_per_round=[4, 3])
    first = select_seed_rows(SEED, loop, 1, seed=1, iteration=0)
    assert len(first) == RANDOM_OVERDRAW * 4 and len(set(ids(first))) == len(first)
    assert set(ids(first)) <= set(ids(SEED))
    # Correct examples are drawn too: the draw ignores the student's verdicts.
    assert len(select_seed_rows(SEED, loop, 1, seed=1, iteration=1)) == RANDOM_OVERDRAW * 3
    # samplesPerFailure rows per example: fewer examples for the same rows; never more than the seed set.
    assert len(select_seed_rows(SEED, loop, 2, seed=1, iteration=0)) == RANDOM_OVERDRAW * 2
    assert len(select_seed_rows(SEED, LoopSpec(select="random", rows_per_round=[100]), 1, seed=1, iteration=0)) == 30
    assert select_seed_rows(SEED, LoopSpec(select="random", rows_per_round=[0]), 1, seed=1, iteration=0) == []


def test_random_is_deterministic_given_the_seed_and_varies_with_it():
    loop = LoopSpec(select="random", rows_per_round=[5])
    draw = lambda seed, it: ids(select_seed_rows(SEED, loop, 1, seed=seed, iteration=it))  # noqa: E731
    assert draw(1, 0) == draw(1, 0)  # a retried job asks about the same examples
    assert draw(1, 0) != draw(2, 0)
    assert draw(1, 0) != draw(1, 1)
    # Over many seeds every example gets drawn: no bias towards the failures or the file's start.
    seen = {i for s in range(200) for i in draw(s, 0)}
    assert seen == set(ids(SEED))


def test_the_cap_keeps_the_rows_of_the_first_drawn_examples():
    task = Task(TaskSpec(kind="classification", labels=["positive", "negative"]))
    selected = [SEED[7], SEED[2], SEED[11]]
    cands = []
    for parent, text in (("s11", "The tram was spotless and on time."), ("s2", "A lovely quiet hotel."),
                         ("s7", "Best pasta in town."), ("s2", "The staff were so kind.")):
        cands += candidates_from_completion(f"1. Question: {text}\nAnswer: positive", parent, 0, "t", "h", 0, 1, 1)
    ordered = in_selection_order(cands, selected)
    assert [c["parent_id"] for c in ordered] == ["s7", "s2", "s2", "s11"]

    def run(cap):
        flt = CandidateFilter(task, FiltersSpec(), samples_per_failure=1, existing=[r["input"] for r in SEED])
        return filter_candidates(flt, table(ordered, GENERATED), "t", "h", 0, cap=cap)

    kept, rejected, reasons = run(2)
    assert kept.column("parent_id").to_pylist() == ["s7", "s2"]
    # Once the cap is reached, the rest are rejected as round_cap without being judged.
    assert reasons == {"round_cap": 2}
    assert rejected.column("parent_id").to_pylist() == ["s2", "s11"]
    kept, _, reasons = run(None)
    assert kept.column("parent_id").to_pylist() == ["s7", "s2", "s11"] and reasons == {"over_sampled": 1}
