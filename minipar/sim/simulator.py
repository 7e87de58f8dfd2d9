"""Discrete-event simulation of a pipeline program: predicted timeline, makespan and bubble.

The simulator times the same walk that ``check_program`` uses to prove a program cannot
deadlock (``minipar.parallel.program_checks.walk``), under the semantics of
``minipar.parallel.schedules``: each stage runs its list in order; an instruction starts when
its stage is free; a compute pass or a send takes ``cost(stage, instr)`` seconds; a send's data
reaches its receiver ``p2p_time(src, dst, send)`` seconds after the send ends; a receive starts
when its stage is free and that data is there, and then takes ``cost(stage, recv)``. The wait
for the data is an ``idle`` event. Stages do not contend for links, so this dataflow timing is
exactly what an event queue would produce.

Bubble. A stage is computing while it runs a forward or backward pass (``fwd``, ``bwd``,
``bwd_input``, ``bwd_weight``); any other time in [0, makespan] is idle, including time spent
in sends, receives, gradient sync and the optimiser step. ``bubble_fraction`` is the total idle
time over p x makespan. With unit costs (sync and step cost 0) this is the pipeline bubble of
the papers.

Costs may be ``fractions.Fraction``: the arithmetic then stays exact, which the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from minipar.parallel.program_checks import live_counts, route, walk
from minipar.parallel.schedules import (
    COMPUTE_KINDS, RECVS, SENDS, Bwd, BwdInput, BwdWeight, Fwd, Instr, Program,
)

CostFn = Callable[[int, Instr], float]
P2PFn = Callable[[int, int, Instr], float]


@dataclass(frozen=True)
class Event:
    """One span on one stage: a pass, a send, a receive, sync, step, or idle time."""

    stage: int
    label: str
    kind: str  # fwd, bwd, bwd_input, bwd_weight, send, recv, sync, step, idle
    start: float
    end: float
    mb: int | None = None
    chunk: int | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timeline:
    """The predicted run of a program: events per stage and the numbers derived from them."""

    name: str
    n_stages: int
    n_chunks: int
    events: list[Event]  # sorted by (stage, start); idle gaps are events of kind "idle"
    makespan: float
    busy: list[float]  # computing time per stage (forward and backward passes)
    peak_live: list[int]  # peak live (mb, chunk) pairs per stage, see program_checks

    @property
    def idle(self) -> list[float]:
        """Time per stage in [0, makespan] not spent computing."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        """Total idle time over p x makespan (0 for an empty timeline)."""
        if not self.makespan:
            return 0
        return sum(self.idle) / (self.n_stages * self.makespan)

    def stage_events(self, stage: int) -> list[Event]:
        return [e for e in self.events if e.stage == stage]


def no_p2p(src: int, dst: int, send: Instr) -> float:
    """Zero transfer time (an exact integer 0, so Fraction costs stay Fractions)."""
    return 0


def unit_cost(fwd: float = 1.0, bwd: float = 2.0, chunks: int = 1) -> CostFn:
    """The textbook cost: a stage's forward costs ``fwd`` and its backward ``bwd``.

    With ``chunks`` = v model chunks per stage, one chunk's pass costs 1/v of the stage's. The
    zero-bubble split gives each half (B and W) ``bwd / 2``: T_F = T_B = T_W when bwd = 2 fwd,
    the setting of Qi et al. 2023. Communication, sync and step cost 0.
    """
    table = {Fwd: fwd / chunks, Bwd: bwd / chunks, BwdInput: bwd / (2 * chunks),
             BwdWeight: bwd / (2 * chunks)}
    def cost(stage: int, instr: Instr) -> float:
        return table.get(type(instr), 0)

    return cost


def simulate(program: Program, cost: CostFn, p2p_time: P2PFn = no_p2p) -> Timeline:
    """Run ``program`` as a discrete-event simulation with the given costs; see module doc.

    Raises ``DeadlockError`` (from the walk) if the program cannot finish.
    """
    p = program.n_stages
    # Integer zeros: adding Fraction or float costs keeps their type (Fractions stay exact).
    free: list[float] = [0] * p  # time each stage becomes free
    sent: dict[tuple[int, int], float] = {}  # (stage, index) of a send -> data arrival time
    spans: list[list[Event]] = [[] for _ in range(p)]
    busy: list[float] = [0] * p
    for s, i, ins, src in walk(program):
        start = free[s]
        if isinstance(ins, RECVS):
            ready = max(start, sent.pop(src))
            if ready > start:
                spans[s].append(Event(s, "", "idle", start, ready))
            start = ready
        end = start + cost(s, ins)
        mb, chunk = getattr(ins, "mb", None), getattr(ins, "chunk", None)
        spans[s].append(Event(s, program.label(ins), ins.kind, start, end, mb, chunk))
        if isinstance(ins, SENDS):
            _, a, b, _ = route(ins, s, p)
            sent[s, i] = end + p2p_time(a, b, ins)
        if ins.kind in COMPUTE_KINDS:
            busy[s] += end - start
        free[s] = end
    makespan = max(free)
    events: list[Event] = []
    for s in range(p):
        events += _fill_idle(spans[s], s, makespan)
    peak = [live_counts(program, s)[0] for s in range(p)]
    return Timeline(program.name, p, program.n_chunks, events, makespan, busy, peak)


def _fill_idle(spans: list[Event], stage: int, makespan: float) -> list[Event]:
    """Add idle events for the gaps before, between and after a stage's spans."""
    out: list[Event] = []
    t: float = 0
    for e in spans:
        if e.start > t:
            out.append(Event(stage, "", "idle", t, e.start))
        out.append(e)
        t = max(t, e.end)
    if makespan > t:
        out.append(Event(stage, "", "idle", t, makespan))
    return out


def bubble_formula(schedule: str, p: int, m: int, v: int = 1) -> float:
    """The published idle fraction with unit costs (backward = 2 x forward), as a Fraction.

    GPipe and 1F1B: (p-1)/(m+p-1) (Huang et al. 2018; Narayanan et al. 2021). Interleaved with
    v chunks: (p-1)/(v*m+p-1) (Narayanan et al. 2021). ZB-H1 with T_F = T_B = T_W = 1: each
    stage idles (p-1)(T_F+T_B-T_W) = p-1 beside its m(T_F+T_B+T_W) = 3m of work, so
    (p-1)/(3m+p-1) (Qi et al. 2023); this needs m >= p. Naive splitting: (p-1)/p.
    """
    from fractions import Fraction

    if schedule in ("gpipe", "1f1b"):
        return Fraction(p - 1, m + p - 1)
    if schedule == "interleaved":
        return Fraction(p - 1, v * m + p - 1)
    if schedule == "zb-h1":
        return Fraction(p - 1, 3 * m + p - 1)
    if schedule == "naive":
        return Fraction(p - 1, p)
    raise ValueError(f"no bubble formula for schedule {schedule!r}")


__all__ = ["Event", "Timeline", "simulate", "unit_cost", "no_p2p", "bubble_formula"]
