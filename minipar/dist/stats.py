"""Per-operation counters of one communicator: calls, bytes, bytes on the wire, seconds.

Every ``Comm`` owns one ``CommStats``; a mesh therefore keeps one per group (world, dp, pp, tp),
which is how a step's traffic is split by parallelism. The rules for what each operation records
are in the docstring of ``minipar.dist.comm``; ``wire_bytes`` below is their single statement in
code, so the cost model can reuse it and reproduce the measured numbers exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

# The operation names a Comm records.
COMM_OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast", "send", "recv", "barrier",
            "object")
# Host<->device copies that stage device arrays through host memory for an MPI that cannot read
# GPU memory (minipar.dist.staging). They move no bytes between ranks, so CommStats keeps them
# in their own table (``copies``), apart from the communication that ``ops`` and ``total()``
# describe and the cost model predicts.
COPY_OPS = ("d2h", "h2d")


def wire_bytes(op: str, nbytes: int, p: int) -> int:
    """Bytes one rank sends for ``op`` on a group of ``p`` ranks, given the op's ``bytes`` figure.

    The bandwidth-optimal (ring) algorithms set the figure (Patarasuk & Yuan 2009; Thakur et al.
    2005): an allreduce is a reduce-scatter followed by an allgather, each moving (p-1)/p of the
    buffer, so 2(p-1)/p x n. Rounded down to an integer. A group of one moves nothing.
    """
    if p <= 1:
        return 0
    if op == "allreduce":
        return 2 * (p - 1) * nbytes // p
    if op in ("allgather", "reduce_scatter"):
        return (p - 1) * nbytes // p
    if op in ("broadcast", "send", "object"):
        return nbytes
    if op in ("recv", "barrier"):
        return 0
    raise ValueError(f"wire_bytes: unknown op {op!r} (known: {', '.join(COMM_OPS)})")


@dataclass
class OpStats:
    """Totals of one operation: how often, how many payload bytes, wire bytes and seconds."""

    calls: int = 0
    bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class CommStats:
    """Per-op counters of one communicator (one group); each rank has its own."""

    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = {}
        self.copies: dict[str, OpStats] = {}  # "d2h"/"h2d" staging copies (wire_bytes 0)
        self._paused = 0

    def record(self, op: str, nbytes: int, wire_bytes: int, seconds: float) -> None:
        """Count one call of ``op`` (ignored while ``paused()``)."""
        if self._paused:
            return
        s = self.ops.get(op)
        if s is None:  # not setdefault(op, OpStats()): that builds an OpStats on every call
            s = self.ops[op] = OpStats()
        s.calls += 1
        s.bytes += int(nbytes)
        s.wire_bytes += int(wire_bytes)
        s.seconds += float(seconds)

    def record_copy(self, op: str, nbytes: int, seconds: float) -> None:
        """Count one host<->device staging copy (``op`` in COPY_OPS) of ``nbytes``.

        Its seconds are the copy's own time on the device (minipar.dist.staging)."""
        if op not in COPY_OPS:
            raise ValueError(f"record_copy: {op!r} is not one of {COPY_OPS}")
        if self._paused:
            return
        s = self.copies.setdefault(op, OpStats())
        s.calls += 1
        s.bytes += int(nbytes)
        s.seconds += float(seconds)

    def add_copy_seconds(self, op: str, seconds: float) -> None:
        """Add the time of a copy counted earlier, known once it has run (an asynchronous
        host -> device copy); dropped if the table was reset since."""
        if not self._paused and op in self.copies:
            self.copies[op].seconds += float(seconds)

    def add_seconds(self, op: str, seconds: float) -> None:
        """Add waiting time to an op already counted (a non-blocking call finishing in wait())."""
        if self._paused:
            return
        self.ops.setdefault(op, OpStats()).seconds += float(seconds)

    def total(self) -> OpStats:
        """All ops summed (calls, bytes, wire bytes, seconds)."""
        t = OpStats()
        for s in self.ops.values():
            t.calls += s.calls
            t.bytes += s.bytes
            t.wire_bytes += s.wire_bytes
            t.seconds += s.seconds
        return t

    def reset(self) -> None:
        self.ops.clear()
        self.copies.clear()

    def as_dict(self) -> dict:
        """``{op: {"calls": .., "bytes": .., "wire_bytes": .., "seconds": ..}}``."""
        return {op: s.as_dict() for op, s in self.ops.items()}

    def copies_as_dict(self) -> dict:
        """``{"d2h"|"h2d": {"calls": .., "bytes": .., "wire_bytes": 0, "seconds": ..}}``."""
        return {op: s.as_dict() for op, s in self.copies.items()}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block: for test bookkeeping that is not the run's traffic."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __repr__(self) -> str:
        t = self.total()
        return f"CommStats({len(self.ops)} ops, {t.calls} calls, {t.wire_bytes} wire bytes)"
