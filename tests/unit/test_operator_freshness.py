"""When the operator decides on Kopf's body without reading the run again (handlers._Written): only when the
body's status is the one this process wrote last, or the run has none and this process never wrote one. A
reconcile on a body an event behind its own last write would re-plan from an older status."""

from __future__ import annotations

from llm2llm_operator.handlers import _Written

S1 = {"phase": "Pending", "jobs": [{"name": "j-a1", "state": "Submitted"}]}
S2 = {"phase": "Running", "jobs": [{"name": "j-a1", "state": "Running"}]}


def test_a_new_run_is_current_only_without_a_status():
    w = _Written()
    assert w.current("u", None) and w.current("u", {})
    # A status this process never wrote (an earlier operator's): read the run first.
    assert not w.current("u", S1)


def test_only_the_status_last_written_is_current():
    w = _Written()
    w.wrote("u", S1)
    assert w.current("u", dict(S1))
    w.wrote("u", S2)
    assert w.current("u", S2)
    assert not w.current("u", S1)  # an event behind the last write
    assert not w.current("u", None)  # ... or from before the first one
    assert w.current("other", None)  # per run


def test_a_write_that_may_have_landed_makes_nothing_current():
    w = _Written()
    w.wrote("u", S1)
    w.wrote("u", None)  # the write failed or timed out: the server holds S1 or the new status
    assert not w.current("u", S1) and not w.current("u", None)
    w.wrote("u", S2)  # then read (or written) again
    assert w.current("u", S2)
    w.forget("u")  # the run was deleted
    assert w.current("u", None) and not w.current("u", S2)
