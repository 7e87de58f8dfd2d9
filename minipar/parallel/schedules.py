"""Pipeline schedules as data: one list of instructions per stage.

A schedule is a pure function ``(p, m, ...) -> Program``. The same program is printed, plotted,
checked (``minipar.parallel.program_checks``), executed on real ranks
(``minipar.parallel.pipeline``) and timed by the simulator (``minipar.sim.simulator``), so what
is drawn, predicted and run cannot drift apart.

Execution semantics (part of the design; the executor, the checks and the simulator obey them):

* Each stage runs its own list in order, one instruction at a time.
* Sends (``SendAct``, ``SendGrad``) are non-blocking: the executor posts an ``isend`` and waits
  for all of a step's sends at the end of the step. A receive (``RecvAct``, ``RecvGrad``) blocks
  until the matching message has arrived.
* Messages between a pair of stages are matched in order per (kind, peer): the k-th ``SendAct``
  from stage a to stage b matches the k-th ``RecvAct`` on b from a, and both name the same
  (microbatch, global chunk). Likewise for gradients.
* ``chunk`` in an instruction is the LOCAL model-chunk index on that stage (0..v-1). With v
  virtual stages per rank, rank s holds global chunks s, s+p, s+2p, ... (Narayanan et al. 2021),
  so local chunk j on stage s is global chunk ``j * p + s``. Activations flow from global chunk g
  to g+1 and gradients from g+1 to g; stage p-1 chunk j therefore sends to stage 0 chunk j+1.
  With p == 1 every hand-off is local: a program has no sends or receives at all.
* The stage that runs ``Fwd(mb, j)`` of a non-last global chunk emits ``SendAct(mb, j)`` right
  after it; the consumer emits ``RecvAct(mb, j')`` right before its ``Fwd(mb, j')``. Backward
  mirrors this with ``RecvGrad`` before and ``SendGrad`` after ``Bwd``/``BwdInput``.
* Every stage ends with ``SyncGrads()`` (data-parallel gradient sync) then ``Step()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

from minipar.config import SCHEDULE_NAMES, ConfigError


# ------------------------------------------------------------------------------- instructions
@dataclass(frozen=True)
class Instr:
    """Base of every pipeline instruction; ``kind`` names its event class in timelines."""

    kind: ClassVar[str] = "instr"
    letter: ClassVar[str] = "?"

    @property
    def label(self) -> str:
        """Short name, chunk shown when non-zero (``F3``, ``F3.1``); see ``label_for``."""
        return self.label_for(2 if getattr(self, "chunk", 0) else 1)

    def label_for(self, n_chunks: int) -> str:
        """Short name; the chunk is always shown when the program has ``n_chunks`` > 1."""
        mb = getattr(self, "mb", None)
        if mb is None:
            return self.letter
        chunk = getattr(self, "chunk", 0)
        return f"{self.letter}{mb}.{chunk}" if n_chunks > 1 else f"{self.letter}{mb}"


@dataclass(frozen=True)
class Fwd(Instr):
    """Forward pass of microbatch ``mb`` through local chunk ``chunk``."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "fwd"
    letter: ClassVar[str] = "F"


@dataclass(frozen=True)
class Bwd(Instr):
    """Full backward of ``mb`` through ``chunk``: input and weight gradients together."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "bwd"
    letter: ClassVar[str] = "B"


@dataclass(frozen=True)
class BwdInput(Instr):
    """Input-gradient half of the backward (zero-bubble "B", Qi et al. 2023)."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "bwd_input"
    letter: ClassVar[str] = "B"


@dataclass(frozen=True)
class BwdWeight(Instr):
    """Weight-gradient half of the backward (zero-bubble "W"), after its ``BwdInput``."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "bwd_weight"
    letter: ClassVar[str] = "W"


@dataclass(frozen=True)
class SendAct(Instr):
    """Non-blocking send of the output activation of (``mb``, ``chunk``) to the next chunk."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "send"
    letter: ClassVar[str] = "sA"


@dataclass(frozen=True)
class RecvAct(Instr):
    """Blocking receive of the input activation of (``mb``, ``chunk``) from the previous chunk."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "recv"
    letter: ClassVar[str] = "rA"


@dataclass(frozen=True)
class SendGrad(Instr):
    """Non-blocking send of the input gradient of (``mb``, ``chunk``) to the previous chunk."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "send"
    letter: ClassVar[str] = "sG"


@dataclass(frozen=True)
class RecvGrad(Instr):
    """Blocking receive of the output gradient of (``mb``, ``chunk``) from the next chunk."""

    mb: int
    chunk: int = 0
    kind: ClassVar[str] = "recv"
    letter: ClassVar[str] = "rG"


@dataclass(frozen=True)
class SyncGrads(Instr):
    """Data-parallel gradient synchronisation of this stage's parameters."""

    kind: ClassVar[str] = "sync"
    letter: ClassVar[str] = "sync"


@dataclass(frozen=True)
class Step(Instr):
    """Optimiser step of this stage's parameters."""

    kind: ClassVar[str] = "step"
    letter: ClassVar[str] = "step"


COMPUTE = (Fwd, Bwd, BwdInput, BwdWeight)
SENDS = (SendAct, SendGrad)
RECVS = (RecvAct, RecvGrad)
COMPUTE_KINDS = frozenset(c.kind for c in COMPUTE)


# -------------------------------------------------------------------------------- chunk maps
def global_chunk(stage: int, chunk: int, p: int) -> int:
    """Global chunk id of local chunk ``chunk`` on ``stage`` (rank s holds s, s+p, s+2p...)."""
    return chunk * p + stage


def chunk_location(g: int, p: int) -> tuple[int, int]:
    """(stage, local chunk) that holds global chunk ``g``."""
    return g % p, g // p


def act_dest(stage: int, chunk: int, p: int,
             n_chunks: int | None = None) -> tuple[int, int] | None:
    """(stage, local chunk) that consumes the activations of (stage, chunk).

    Returns None for the last global chunk when ``n_chunks`` (v) is given.
    """
    g = global_chunk(stage, chunk, p) + 1
    if n_chunks is not None and g >= p * n_chunks:
        return None
    return chunk_location(g, p)


def grad_dest(stage: int, chunk: int, p: int) -> tuple[int, int] | None:
    """(stage, local chunk) that receives the input gradient of (stage, chunk); None for g=0."""
    g = global_chunk(stage, chunk, p) - 1
    return None if g < 0 else chunk_location(g, p)


def peer(stage: int, instr: Instr, p: int) -> int:
    """The stage a send goes to, or a receive comes from (what the executor passes to MPI)."""
    g = global_chunk(stage, instr.chunk, p)
    if isinstance(instr, (SendAct, RecvGrad)):
        return chunk_location(g + 1, p)[0]
    if isinstance(instr, (SendGrad, RecvAct)):
        return chunk_location(g - 1, p)[0]
    raise TypeError(f"{instr!r} is not a send or a receive")


# ------------------------------------------------------------------------------------ program
@dataclass
class Program:
    """A pipeline schedule: ``stages[s]`` is the instruction list stage s runs, in order."""

    name: str
    n_stages: int
    n_microbatches: int
    n_chunks: int
    stages: list[list[Instr]]

    def __str__(self) -> str:
        return self.text()

    def text(self, width: int | None = None, comm: bool = False) -> str:
        """One row per stage in execution order: ``stage 0 | F0 F1 F2 F3 B0 B1 B2 B3``, with the
        sends and receives when ``comm``; rows cut at ``width`` characters."""
        rows = [[self.label(i) for i in lst if comm or i.kind in COMPUTE_KINDS]
                for lst in self.stages]
        cell = max((len(x) for r in rows for x in r), default=1)
        head = (f"{self.name}: {self.n_stages} stages, {self.n_microbatches} microbatches"
                + (f", {self.n_chunks} chunks per stage" if self.n_chunks > 1 else ""))
        lines = [head]
        for s, r in enumerate(rows):
            name = f"stage {s:<{len(str(self.n_stages - 1))}} | "
            line = name + " ".join(x.ljust(cell) for x in r)
            if width is not None and len(line) > width:
                line = line[:width - 3] + "..."
            lines.append(line.rstrip())
        return "\n".join(lines)

    def label(self, instr: Instr) -> str:
        """Label of ``instr`` in this program (chunk shown when v > 1)."""
        return instr.label_for(self.n_chunks)

    def compute(self, stage: int) -> list[Instr]:
        """The compute instructions (forward and backward passes) of one stage, in order."""
        return [i for i in self.stages[stage] if isinstance(i, COMPUTE)]


def _with_comm(name: str, p: int, m: int, v: int,
               orders: list[list[Instr]]) -> Program:
    """Wrap each stage's compute order with the sends and receives it implies, then sync, step.

    With p == 1 all chunks sit on one stage and hand off locally, so nothing is sent.
    """
    last = p * v - 1
    stages: list[list[Instr]] = []
    for s, order in enumerate(orders):
        out: list[Instr] = []
        for ins in order:
            g = global_chunk(s, ins.chunk, p)
            if isinstance(ins, Fwd):
                recv, send, before, after = RecvAct, SendAct, g > 0, g < last
            elif isinstance(ins, (Bwd, BwdInput)):
                recv, send, before, after = RecvGrad, SendGrad, g < last, g > 0
            else:
                recv = send = None
                before = after = False
            if p > 1 and before:
                out.append(recv(ins.mb, ins.chunk))
            out.append(ins)
            if p > 1 and after:
                out.append(send(ins.mb, ins.chunk))
        out += [SyncGrads(), Step()]
        stages.append(out)
    return Program(name, p, m, v, stages)


# ---------------------------------------------------------------------------------- schedules
def _check_pm(p: int, m: int) -> None:
    if p < 1 or m < 1:
        raise ValueError(f"need p >= 1 stages and m >= 1 microbatches, got p={p}, m={m}")


def naive(p: int, m: int = 1) -> Program:
    """Model split over p stages without pipelining: one microbatch at a time end to end.

    Every stage waits for the previous microbatch's backward before its next forward, so only
    one stage ever works: the idle fraction is (p-1)/p. The baseline every schedule improves.
    """
    _check_pm(p, m)
    orders: list[list[Instr]] = [[] for _ in range(p)]
    for s in range(p):
        for mb in range(m):
            orders[s] += [Fwd(mb), Bwd(mb)]
    return _with_comm("naive", p, m, 1, orders)


def gpipe(p: int, m: int) -> Program:
    """GPipe (Huang et al. 2018): every stage runs all m forwards, then all m backwards.

    Holds all m microbatches' activations at once; idle fraction (p-1)/(m+p-1).
    """
    _check_pm(p, m)
    orders = [[Fwd(i) for i in range(m)] + [Bwd(i) for i in range(m)] for _ in range(p)]
    return _with_comm("gpipe", p, m, 1, orders)


def one_f_one_b(p: int, m: int) -> Program:
    """1F1B, PipeDream-Flush (Narayanan et al. 2021): warm-up, one-forward-one-backward, drain.

    Stage s runs min(p-s-1, m) warm-up forwards, then alternates a forward and a backward, then
    drains the remaining backwards. Same bubble as GPipe, but at most min(m, p-s) microbatches
    are live on stage s instead of m.
    """
    _check_pm(p, m)
    orders: list[list[Instr]] = []
    for s in range(p):
        warm = min(p - s - 1, m)
        order: list[Instr] = [Fwd(i) for i in range(warm)]
        for i in range(m - warm):
            order += [Fwd(warm + i), Bwd(i)]
        order += [Bwd(i) for i in range(m - warm, m)]
        orders.append(order)
    return _with_comm("1f1b", p, m, 1, orders)


def interleaved(p: int, m: int, v: int) -> Program:
    """Interleaved 1F1B of PTD-P (Narayanan et al. 2021), v model chunks per stage.

    Microbatches go through the chunks in groups of p: the k-th forward on a stage is chunk
    (k // p) % v of microbatch (k // (p*v)) * p + k % p, and backwards mirror it over the
    chunks in reverse. Stage s warms up with 2(p-s-1) + (v-1)p forwards (all of them when
    m == p), as in Megatron-LM. The bubble shrinks by v to (p-1)/(v*m + p-1) while stage 0
    keeps v*p + p - 1 chunk-microbatches live (Korthikanti et al. 2022, section 4.2.3).
    Requires m % p == 0, as Megatron-LM does.
    """
    _check_pm(p, m)
    if v < 1:
        raise ValueError(f"interleaved needs v >= 1 chunks per stage, got v={v}")
    if m % p:
        raise ValueError(
            f"interleaved needs the number of microbatches ({m}) to be a multiple of the "
            f"number of stages ({p})")
    total = m * v

    def mb_of(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def fwd(k: int) -> Instr:
        return Fwd(mb_of(k), (k // p) % v)

    def bwd(k: int) -> Instr:
        return Bwd(mb_of(k), v - 1 - (k // p) % v)

    orders: list[list[Instr]] = []
    for s in range(p):
        warm = total if m == p else min(total, 2 * (p - s - 1) + (v - 1) * p)
        order = [fwd(k) for k in range(warm)]
        for i in range(total - warm):
            order += [fwd(warm + i), bwd(i)]
        order += [bwd(k) for k in range(total - warm, total)]
        orders.append(order)
    return _with_comm("interleaved", p, m, v, orders)


def zero_bubble_h1(p: int, m: int) -> Program:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"), backward split into B and W.

    B (``BwdInput``) is on the critical path between stages, W (``BwdWeight``) is not, so W
    passes can be postponed into what would be idle time. Stage s keeps 1F1B's warm-up and
    order of F and B, and runs each W s steps behind its B (finishing the late ones in the
    cool-down). Stage s then holds at most p - s microbatches before their B plus s waiting
    for their W: at most p in all, the peak of 1F1B's first stage. With T_F = T_B = T_W the
    bubble drops from 1F1B's (p-1)(T_F+T_B+T_W) to (p-1)(T_F+T_B-T_W) per stage.
    """
    _check_pm(p, m)
    orders: list[list[Instr]] = []
    for s in range(p):
        warm = min(p - s - 1, m)
        order: list[Instr] = [Fwd(i) for i in range(warm)]
        for i in range(m):
            if warm + i < m:
                order.append(Fwd(warm + i))
            order.append(BwdInput(i))
            if i - s >= 0:
                order.append(BwdWeight(i - s))
        order += [BwdWeight(i) for i in range(max(0, m - s), m)]
        orders.append(order)
    return _with_comm("zb-h1", p, m, 1, orders)


SCHEDULES = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
    "zb-h1": zero_bubble_h1,
}
assert tuple(SCHEDULES) == SCHEDULE_NAMES, "config.SCHEDULE_NAMES and SCHEDULES must agree"


def make_schedule(name: str, p: int, m: int, v: int = 1) -> Program:
    """Build a registered schedule after validating the layout, each error naming its flag."""
    if name not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    for flag, value in (("--pp", p), ("--microbatches", m), ("--virtual-stages", v)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    if name == "interleaved":
        if m % p:
            raise ConfigError(
                f"--microbatches {m} must be a multiple of --pp {p} for --schedule interleaved")
        return interleaved(p, m, v)
    if v > 1:
        raise ConfigError(f"--virtual-stages {v} needs --schedule interleaved (got {name!r})")
    return SCHEDULES[name](p, m)


def instructions(program: Program) -> Iterable[tuple[int, int, Instr]]:
    """Every (stage, index, instruction) of a program, stage by stage."""
    for s, lst in enumerate(program.stages):
        for i, ins in enumerate(lst):
            yield s, i, ins
