"""Checks that a pipeline program is well formed and runs, for tests and for users.

``check_program`` raises ``ProgramError`` naming the first violation (stage, index, instruction)
and otherwise returns a ``ProgramReport`` with the peak number of live microbatches per stage.
``walk`` is the untimed execution of a program under the semantics documented in
``minipar.parallel.schedules``; the simulator times the very same walk.

Live microbatches. A forward's activations are live from its ``Fwd`` until its backward has
finished: ``Bwd``, or ``BwdWeight`` when the backward is split. Counts are per (microbatch,
chunk) pair, so with v chunks per stage one pair is about 1/v of a stage's activations.
``peak_live`` counts every pair still holding anything. ``peak_full`` counts pairs whose input
gradient has not run yet (``Bwd``/``BwdInput`` pending): these hold the whole activation stack,
while a pair only waiting for its W keeps just the inputs of its linear layers and their output
gradients (Qi et al. 2023, section 2). Without a split the two counts are equal.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Iterator

from minipar.parallel.schedules import (
    RECVS, SENDS, Bwd, BwdInput, BwdWeight, Fwd, Instr, Program, RecvAct, RecvGrad,
    SendAct, SendGrad, Step, SyncGrads, chunk_location, global_chunk, peer,
)


class ProgramError(ValueError):
    """A pipeline program breaks a rule; the message names stage, index and instruction."""


class DeadlockError(ProgramError):
    """The program cannot finish: every unfinished stage waits on a receive nobody sends."""


@dataclass(frozen=True)
class ProgramReport:
    """What a valid program does: sizes, message counts and peak live microbatches per stage."""

    name: str
    n_stages: int
    n_microbatches: int
    n_chunks: int
    n_messages: int  # point-to-point messages per step (activations + gradients)
    peak_live: list[int]  # (mb, chunk) pairs live from Fwd until Bwd / BwdWeight
    peak_full: list[int]  # (mb, chunk) pairs live from Fwd until Bwd / BwdInput


def _where(program: Program, s: int, i: int) -> str:
    ins = program.stages[s][i]
    return f"stage {s}, instruction {i} ({program.label(ins)})"


# ------------------------------------------------------------------------------ message routes
def route(ins: Instr, stage: int, p: int) -> tuple[str, int, int, tuple[int, int]]:
    """(channel kind, source stage, destination stage, (mb, consumer global chunk)).

    The key names the activation or gradient by the global chunk that consumes it, so a send
    and its receive carry the same key.
    """
    g = global_chunk(stage, ins.chunk, p)
    other = peer(stage, ins, p)
    if isinstance(ins, SendAct):
        return "act", stage, other, (ins.mb, g + 1)
    if isinstance(ins, RecvAct):
        return "act", other, stage, (ins.mb, g)
    if isinstance(ins, SendGrad):
        return "grad", stage, other, (ins.mb, g - 1)
    return "grad", other, stage, (ins.mb, g)  # RecvGrad; peer() rejected anything else


# ----------------------------------------------------------------------------------- the walk
def walk(program: Program) -> Iterator[tuple[int, int, Instr, tuple[int, int] | None]]:
    """Execute a program abstractly; yield (stage, index, instr, matched send) in a valid order.

    For a receive, the last item is the (stage, index) of the send it matches, else None.
    Stages run round-robin as far as they can; a receive proceeds once its send has run.
    Raises ``ProgramError`` when a receive gets a message it did not expect, and
    ``DeadlockError`` naming every blocked stage when no stage can move.
    """
    p = program.n_stages
    pc = [0] * p
    queues: dict[tuple[str, int, int], deque] = defaultdict(deque)
    while True:
        moved = False
        for s in range(p):
            lst = program.stages[s]
            while pc[s] < len(lst):
                ins, src = lst[pc[s]], None
                if isinstance(ins, SENDS):
                    kind, a, b, key = route(ins, s, p)
                    queues[kind, a, b].append((s, pc[s], key))
                elif isinstance(ins, RECVS):
                    kind, a, b, key = route(ins, s, p)
                    q = queues[kind, a, b]
                    if not q:
                        break
                    sa, ia, sent = q.popleft()
                    if sent != key:
                        raise ProgramError(
                            f"{_where(program, s, pc[s])} receives the message sent by "
                            f"{_where(program, sa, ia)}: messages between two stages must "
                            "be received in the order they are sent")
                    src = (sa, ia)
                yield s, pc[s], ins, src
                pc[s] += 1
                moved = True
        if all(pc[s] == len(program.stages[s]) for s in range(p)):
            return
        if not moved:
            blocked = [f"{_where(program, s, pc[s])} waits for stage "
                       f"{route(program.stages[s][pc[s]], s, p)[1]}"
                       for s in range(p) if pc[s] < len(program.stages[s])]
            raise DeadlockError("deadlock: " + "; ".join(blocked))


# ------------------------------------------------------------------------------- live counts
def live_counts(program: Program, stage: int) -> tuple[int, int]:
    """(peak_live, peak_full) of one stage, walking its list in order (see module docstring)."""
    live = full = peak_live = peak_full = 0
    for ins in program.stages[stage]:
        if isinstance(ins, Fwd):
            live, full = live + 1, full + 1
        elif isinstance(ins, Bwd):
            live, full = live - 1, full - 1
        elif isinstance(ins, BwdInput):
            full -= 1
        elif isinstance(ins, BwdWeight):
            live -= 1
        peak_live, peak_full = max(peak_live, live), max(peak_full, full)
    return peak_live, peak_full


# ------------------------------------------------------------------------------- the checks
def _check_stage(program: Program, s: int) -> None:
    """Per-stage rules: ranges, sync/step last, each pass once and in order, comm placement."""
    p, m, v = program.n_stages, program.n_microbatches, program.n_chunks
    lst = program.stages[s]
    last = p * v - 1
    where = lambda i: _where(program, s, i)  # noqa: E731
    if len(lst) < 2 or not isinstance(lst[-2], SyncGrads) or not isinstance(lst[-1], Step):
        raise ProgramError(f"stage {s} must end with SyncGrads() then Step()")
    done: dict[tuple[str, int, int], int] = {}  # (pass, mb, chunk) -> index where it ran
    seen: set[tuple[str, int, int]] = set()  # sends and receives by (letter, mb, chunk)
    for i, ins in enumerate(lst):
        if not isinstance(ins, Instr):
            raise ProgramError(f"stage {s}, instruction {i} ({ins!r}) is not an instruction")
        if isinstance(ins, (SyncGrads, Step)):
            if i < len(lst) - 2:
                raise ProgramError(f"{where(i)} must come last (SyncGrads then Step)")
            continue
        if not (0 <= ins.mb < m and 0 <= ins.chunk < v):
            raise ProgramError(f"{where(i)}: microbatch or chunk out of range (m={m}, v={v})")
        g = global_chunk(s, ins.chunk, p)
        if isinstance(ins, (SENDS + RECVS)):
            if p == 1:
                raise ProgramError(f"{where(i)}: with one stage hand-offs are local, no sends")
            edge = {SendAct: g < last, RecvAct: g > 0, SendGrad: g > 0, RecvGrad: g < last}
            if not edge[type(ins)]:
                raise ProgramError(f"{where(i)}: global chunk {g} has no peer for this message")
            if isinstance(ins, SENDS):
                need = "F" if isinstance(ins, SendAct) else "B"
                if (need, ins.mb, ins.chunk) not in done:
                    raise ProgramError(f"{where(i)} sends before the pass that computes it")
            if (ins.letter, ins.mb, ins.chunk) in seen:
                raise ProgramError(f"{where(i)} appears twice")
            seen.add((ins.letter, ins.mb, ins.chunk))
            continue
        tag = {Fwd: "F", Bwd: "B", BwdInput: "B", BwdWeight: "W"}[type(ins)]
        if (tag, ins.mb, ins.chunk) in done:
            raise ProgramError(f"{where(i)} runs a second time")
        if tag != "F" and ("F", ins.mb, ins.chunk) not in done:
            raise ProgramError(f"{where(i)}: backward before its forward")
        if tag == "W" and ("split", ins.mb, ins.chunk) not in done:
            raise ProgramError(f"{where(i)}: weight gradient before its BwdInput")
        # The pass needs its input from the neighbouring chunk: received, or local when p == 1.
        if tag == "F" and g > 0:
            prev = chunk_location(g - 1, p)[1]
            ok = ((RecvAct.letter, ins.mb, ins.chunk) in seen if p > 1
                  else ("F", ins.mb, prev) in done)
            if not ok:
                raise ProgramError(f"{where(i)} runs before its input activation arrives")
        if tag == "B" and g < last:
            nxt = chunk_location(g + 1, p)[1]
            ok = ((RecvGrad.letter, ins.mb, ins.chunk) in seen if p > 1
                  else ("B", ins.mb, nxt) in done)
            if not ok:
                raise ProgramError(f"{where(i)} runs before its output gradient arrives")
        done[tag, ins.mb, ins.chunk] = i
        if isinstance(ins, BwdInput):
            done["split", ins.mb, ins.chunk] = i
    for mb in range(m):
        for j in range(v):
            for tag, what in (("F", "forward"), ("B", "backward")):
                if (tag, mb, j) not in done:
                    raise ProgramError(f"stage {s} never runs the {what} of microbatch {mb} "
                                       f"chunk {j}")
            if ("split", mb, j) in done and ("W", mb, j) not in done:
                raise ProgramError(f"stage {s} never runs BwdWeight of microbatch {mb} chunk {j}")
    if len([x for x in lst if isinstance(x, SyncGrads)]) != 1:
        raise ProgramError(f"stage {s} must run SyncGrads exactly once")


def _check_matching(program: Program) -> int:
    """Every send has its receive and vice versa, in the same order per (kind, peer)."""
    p = program.n_stages
    sends: dict[tuple, list] = defaultdict(list)
    recvs: dict[tuple, list] = defaultdict(list)
    for s, lst in enumerate(program.stages):
        for i, ins in enumerate(lst):
            if isinstance(ins, SENDS + RECVS):
                kind, a, b, key = route(ins, s, p)
                (sends if isinstance(ins, SENDS) else recvs)[kind, a, b].append((s, i, key))
    for chan in sorted(set(sends) | set(recvs)):
        kind, a, b = chan
        out, inn = sends[chan], recvs[chan]
        # First a message with no partner at all, then partners out of order.
        for mine, theirs, side in ((inn, out, "receive has no send"),
                                   (out, inn, "send has no receive")):
            keys = {k for _, _, k in theirs}
            for s, i, k in mine:
                if k not in keys:
                    raise ProgramError(f"{_where(program, s, i)}: {kind} {side} "
                                       f"(between stage {a} and stage {b})")
        for (sa, ia, ka), (sb, ib, kb) in zip(out, inn):
            if ka != kb:
                raise ProgramError(
                    f"{_where(program, sb, ib)} is matched with {_where(program, sa, ia)}: "
                    f"the k-th {kind} receive from stage {a} must match the k-th send")
    return sum(len(x) for x in sends.values())


def check_dataflow(program: Program, flow: dict) -> list[tuple[str, ...]]:
    """Check what the messages carry, for a model whose boundary messages are not all alike.

    ``flow`` (from the model, e.g. ``minipar.models.encdec_pipeline.dataflow``) names per
    global chunk the parts it ``makes``, ``uses`` and ``ends`` (consumes for good), and per
    chunk g the parts its incoming message ``carries`` (the encoder-decoder's pair
    ``("x_dec", "memory")``). Walking the chunks in order, a part is live from the chunk that
    makes it until the one that ends it; the message into g must carry exactly the parts live
    after g - 1, so a part every later chunk needs (the memory, read by each decoder stage's
    cross-attention) can be neither dropped nor invented. Gradients cross the same boundaries
    with the same parts, so the check covers both directions. Combined with ``check_program``'s
    matching (every message received once, in order, no deadlock) each send and its receive
    agree on the parts. Returns ``carries``.
    """
    n = program.n_stages * program.n_chunks
    makes, uses, ends, carries = (flow[k] for k in ("makes", "uses", "ends", "carries"))
    if not all(len(x) == n for x in (makes, uses, ends, carries)):
        raise ProgramError(f"dataflow: needs one entry per global chunk ({n})")
    live: set = set()
    for g in range(n):
        if set(carries[g]) != live or len(carries[g]) != len(set(carries[g])):
            raise ProgramError(f"dataflow: the message into global chunk {g} carries "
                               f"{sorted(carries[g])}, but {sorted(live)} are live there")
        twice = live & set(makes[g])
        if twice:
            raise ProgramError(f"dataflow: global chunk {g} makes {sorted(twice)} again")
        have = live | set(makes[g])
        for what, need in (("uses", uses[g]), ("ends", ends[g])):
            if not set(need) <= have:
                raise ProgramError(f"dataflow: global chunk {g} {what} "
                                   f"{sorted(set(need) - have)}, which no message brings")
        live = have - set(ends[g])
    if live:
        raise ProgramError(f"dataflow: {sorted(live)} outlive the last chunk")
    return [tuple(c) for c in carries]


def check_program(program: Program) -> ProgramReport:
    """Validate a program and report its peak live microbatches; raise ``ProgramError``.

    Checks, in order: each stage's list (ranges, every forward and backward exactly once on the
    owning stage with B before W, inputs received before use, sends after the pass that
    computes them, SyncGrads then Step last); sends and receives matched in order per
    (kind, peer) with the same (mb, chunk); and, by walking the program, that it cannot
    deadlock.
    """
    if len(program.stages) != program.n_stages:
        raise ProgramError(f"program has {len(program.stages)} stage lists, "
                           f"expected {program.n_stages}")
    for s in range(program.n_stages):
        _check_stage(program, s)
    n_messages = _check_matching(program)
    for _ in walk(program):
        pass
    peaks = [live_counts(program, s) for s in range(program.n_stages)]
    return ProgramReport(program.name, program.n_stages, program.n_microbatches,
                         program.n_chunks, n_messages, [a for a, _ in peaks],
                         [b for _, b in peaks])


__all__ = ["ProgramError", "DeadlockError", "ProgramReport", "check_program", "walk", "route",
           "live_counts", "check_dataflow", "check_messages"]


# ----------------------------------------------------------- point-to-point call lists (rings)
def check_messages(calls: list[list[tuple[str, int, int]]]) -> int:
    """Prove that per-rank lists of point-to-point calls finish under minipar's semantics
    (a send never blocks; a receive blocks until the matching send, in order per (source,
    destination, tag)) and that every send is received. ``calls[r]`` lists rank r's
    ("send" | "recv", peer, tag) in program order: context parallelism's ring
    (``minipar.parallel.context.ring_program``) is checked this way. Returns the number of
    messages; raises ``DeadlockError`` naming the waiting ranks, or ``ProgramError`` for a
    message nobody receives."""
    pos = [0] * len(calls)
    queued: dict = defaultdict(int)  # (source, destination, tag) -> sent, not yet received
    sent = 0
    while True:
        moved = False
        for r, mine in enumerate(calls):
            while pos[r] < len(mine):
                op, peer, tag = mine[pos[r]]
                if op == "send":
                    queued[r, peer, tag] += 1
                    sent += 1
                elif queued[peer, r, tag]:
                    queued[peer, r, tag] -= 1
                else:
                    break  # blocked in this receive
                pos[r] += 1
                moved = True
        if not moved:
            break
    waiting = [r for r, mine in enumerate(calls) if pos[r] < len(mine)]
    if waiting:
        raise DeadlockError("point-to-point calls cannot finish: " + "; ".join(
            f"rank {r} waits in {calls[r][pos[r]]}" for r in waiting))
    left = {k: n for k, n in queued.items() if n}
    if left:
        raise ProgramError(f"messages sent but never received (source, dest, tag): {left}")
    return sent

