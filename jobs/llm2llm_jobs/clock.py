"""Time inside the calls that do a stage's real work (generate calls, the optimisation loop), recorded in the
stage markers so that the fixed cost around them (engine start, model loads, task start-up, I/O) can be told
apart: ``bench/iteration_overhead.py`` reads them.

A span is (wall-clock start, monotonic duration): the start is comparable between the processes and nodes of
one job (to the clocks' sync), which is what merging the spans of parallel replicas needs; the duration is
immune to clock steps. A few clock reads per call: nothing measurable.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

Span = tuple[float, float]  # (time.time() at the start, seconds)


class Clock:
    """Spans of the work calls of one replica, and the seconds its engine took to start."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.engine_seconds = 0.0

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        start, t0 = time.time(), time.monotonic()
        try:
            yield
        finally:
            self.spans.append((start, time.monotonic() - t0))

    @contextlib.contextmanager
    def engine(self) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.engine_seconds += time.monotonic() - t0

    def figures(self) -> dict[str, Any]:
        """What a replica returns: its spans (rounded to the millisecond) and engine seconds."""
        return {"generate_spans": [[round(s, 3), round(d, 3)] for s, d in self.spans],
                "engine_seconds": round(self.engine_seconds, 3)}


class TimedTeacher:
    """A teacher whose ``complete`` calls are timed on ``clock``; everything else is the teacher's own."""

    def __init__(self, teacher: Any, clock: Clock):
        self._teacher, self._clock = teacher, clock

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        with self._clock.span():
            return self._teacher.complete(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._teacher, name)


def busy_seconds(spans: list[Any]) -> float:
    """Seconds during which at least one span was open (parallel replicas overlap: their sum would count the
    same second twice)."""
    merged = 0.0
    end = None
    for start, seconds in sorted((float(s), float(d)) for s, d in spans):
        stop = start + seconds
        if end is None or start > end:
            merged += seconds
            end = stop
        elif stop > end:
            merged += stop - end
            end = stop
    return round(merged, 3)


def stage_figures(replicas: list[dict[str, Any]]) -> dict[str, float]:
    """A fan-out stage's figures from its replicas' ``Clock.figures()``: ``generate_seconds`` (the union of their
    spans) and ``engine_seconds`` (the slowest engine start)."""
    spans = [s for r in replicas for s in r.get("generate_spans") or []]
    return {"generate_seconds": busy_seconds(spans),
            "engine_seconds": round(max((float(r.get("engine_seconds") or 0) for r in replicas), default=0.0), 3)}
