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


# handlers._NewRuns: a new run's finalizer patch (what Kopf does once the submit handler returns) waits for the
# first jobs of the new runs queued behind it, and for no one when there is no storm.

def _returns(hold_s: float, n: int, release_after_s: float) -> tuple[list[float], float]:
    """n new runs at once in one handler thread; every submit after the first blocks until released. Returns
    when each run's handler returned (s after the start) and when the queued submits were released."""
    import asyncio
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from llm2llm_operator.handlers import _NewRuns

    gate = threading.Event()
    runs = _NewRuns(hold_s)

    class _Settings:  # what _NewRuns reads of Kopf's settings: its handler executor
        class execution:
            executor = ThreadPoolExecutor(1)

    runs.settings = _Settings  # type: ignore[assignment]

    async def main() -> tuple[list[float], float]:
        t0 = time.monotonic()
        done: list[float] = []

        async def one(i: int) -> None:
            await runs.submit(lambda: None if i == 0 else gate.wait(5))
            done.append(time.monotonic() - t0)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(release_after_s)
        released = time.monotonic() - t0
        gate.set()
        await asyncio.gather(*tasks)
        return sorted(done), released

    try:
        return asyncio.run(main())
    finally:
        _Settings.execution.executor.shutdown()


def test_a_new_run_alone_returns_as_soon_as_its_job_is_submitted():
    done, released = _returns(hold_s=5.0, n=1, release_after_s=0.5)
    assert done[0] < released  # nothing else pending: no hold


def test_a_new_runs_bookkeeping_waits_for_the_jobs_queued_behind_it():
    done, released = _returns(hold_s=5.0, n=4, release_after_s=0.5)
    # The first run's submit finished at once, but its handler (and so Kopf's finalizer patch) returned only
    # once the three submits behind it were out.
    assert all(t >= released for t in done)


def test_the_hold_is_bounded():
    done, released = _returns(hold_s=0.2, n=4, release_after_s=1.0)
    assert done[0] < released  # the first run stopped waiting after hold_s
    assert all(t >= released for t in done[1:])

