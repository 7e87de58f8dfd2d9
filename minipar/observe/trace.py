"""Per-rank event traces: record spans, merge ranks, write Chrome-trace JSON.

An event is a plain dict, the same for measured runs and for simulated timelines, so a
predicted and a measured step can be laid side by side::

    {"rank": 0, "name": "F3", "kind": "fwd", "start": 0.12, "end": 0.15, "args": {"mb": 3}}

``rank`` is the row the event belongs to (a rank, or a stage for a simulated timeline);
``start`` and ``end`` are seconds from a common t0; ``kind`` is one of the simulator's kinds
(fwd, bwd, bwd_input, bwd_weight, send, recv, sync, step, idle) or any other name a caller
records (allreduce, optim, ...). ``args`` carries small JSON-able extras (mb, chunk, bytes).
"""

from __future__ import annotations

import json
import time
from fractions import Fraction
from typing import Any

# Which Chrome-trace thread (tid) a kind is drawn on: passes, communication, the rest.
KIND_GROUPS = {
    "fwd": "compute", "bwd": "compute", "bwd_input": "compute", "bwd_weight": "compute",
    "send": "comm", "recv": "comm", "sync": "comm", "allreduce": "comm", "allgather": "comm",
    "reduce_scatter": "comm", "broadcast": "comm", "collective": "comm",
}
_GROUP_TID = {"compute": 0, "comm": 1, "other": 2}


def kind_group(kind: str) -> str:
    """compute, comm or other: the row group of an event kind."""
    return KIND_GROUPS.get(kind, "other")


class _Span:
    """Context manager that appends one event to its tracer on exit."""

    __slots__ = ("tracer", "name", "kind", "args", "start")

    def __init__(self, tracer: "Tracer", name: str, kind: str, args: dict) -> None:
        self.tracer, self.name, self.kind, self.args = tracer, name, kind, args

    def __enter__(self) -> "_Span":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end = time.perf_counter()
        t0 = self.tracer.t0
        self.tracer.events.append({"rank": self.tracer.rank, "name": self.name,
                                   "kind": self.kind, "start": self.start - t0,
                                   "end": end - t0, "args": self.args})


class _NullSpan:
    """What a disabled tracer hands out: one shared object whose enter and exit do nothing."""

    __slots__ = ()

    def __enter__(self) -> "_NullSpan":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SPAN = _NullSpan()


class Tracer:
    """Records timed spans of one rank: ``with tracer.span("F3", "fwd", mb=3): ...``.

    Times come from ``time.perf_counter()`` relative to ``t0``. Call ``reset_clock()`` right
    after a barrier on every rank so that all ranks share t0 (perf_counter is one monotonic
    clock per machine; across machines the barrier is the best common origin we have). A
    disabled tracer returns a shared no-op context manager: no clock read, no allocation.
    """

    def __init__(self, rank: int = 0, enabled: bool = True, t0: float | None = None) -> None:
        self.rank = rank
        self.enabled = enabled
        self.t0 = time.perf_counter() if t0 is None else t0
        self.events: list[dict[str, Any]] = []

    def reset_clock(self) -> None:
        """Make now the time origin (call after a barrier so ranks agree)."""
        self.t0 = time.perf_counter()

    def span(self, name: str, kind: str, **args: Any) -> _Span | _NullSpan:
        """A context manager timing one event of ``kind`` named ``name`` with extra ``args``."""
        if not self.enabled:
            return _NULL_SPAN
        return _Span(self, name, kind, args)

    def clear(self) -> None:
        self.events.clear()


def merge(event_lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """All ranks' events in one list, ordered by start time then rank (e.g. after allgather)."""
    out = [e for lst in event_lists for e in lst]
    out.sort(key=lambda e: (e["start"], e["rank"], e["end"]))
    return out


def _plain(x: Any) -> Any:
    """Fractions (exact simulator times) become floats so that events are JSON-able."""
    return float(x) if isinstance(x, Fraction) else x


def timeline_events(timeline: Any, include_idle: bool = True) -> list[dict[str, Any]]:
    """A simulator ``Timeline`` as trace events (rank = stage, times in seconds)."""
    out = []
    for e in timeline.events:
        if e.kind == "idle" and not include_idle:
            continue
        args = {k: v for k, v in (("mb", e.mb), ("chunk", e.chunk)) if v is not None}
        out.append({"rank": e.stage, "name": e.label or e.kind, "kind": e.kind,
                    "start": float(e.start), "end": float(e.end), "args": args})
    return out


def to_chrome_trace(events: list[dict[str, Any]], path: str | None = None,
                    include_idle: bool = False) -> dict[str, Any]:
    """Chrome-trace JSON (open in Perfetto or chrome://tracing); written to ``path`` if given.

    Complete events (ph "X") with ts/dur in microseconds; pid is the rank (or stage) and tid
    the kind group (0 compute, 1 comm, 2 other), each named by a metadata event. Idle events
    are left out unless asked for: the viewer shows gaps anyway.
    """
    trace: list[dict[str, Any]] = []
    ranks = sorted({int(e["rank"]) for e in events})
    for r in ranks:
        trace.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0,
                      "args": {"name": f"rank {r}"}})
        for group, tid in _GROUP_TID.items():
            trace.append({"ph": "M", "name": "thread_name", "pid": r, "tid": tid,
                          "args": {"name": group}})
    for e in events:
        if e["kind"] == "idle" and not include_idle:
            continue
        start, end = float(e["start"]), float(e["end"])
        trace.append({"ph": "X", "name": e["name"], "cat": e["kind"], "pid": int(e["rank"]),
                      "tid": _GROUP_TID[kind_group(e["kind"])], "ts": start * 1e6,
                      "dur": max(0.0, end - start) * 1e6,
                      "args": {k: _plain(v) for k, v in e.get("args", {}).items()}})
    doc = {"traceEvents": trace, "displayTimeUnit": "ms"}
    if path is not None:
        with open(path, "w") as f:
            json.dump(doc, f)
    return doc


__all__ = ["Tracer", "merge", "timeline_events", "to_chrome_trace", "kind_group",
           "KIND_GROUPS"]
