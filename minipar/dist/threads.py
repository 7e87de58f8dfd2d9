"""An in-process world: one thread per rank, the same ``Comm`` semantics as MPI.

Why it exists: tests, lessons and notebooks can run a 4- or 8-rank job without ``mpirun``, and a
failure is an ordinary Python exception in the caller. NumPy releases the GIL inside BLAS and
large ufuncs, so the ranks really do overlap their arithmetic.

How it works: every collective is a *round* on its group. Each rank posts a private copy of its
input (so it may reuse its array the moment the call returns), waits until all ranks of the
group have posted, then computes its own result from the posted copies, in rank order, so every
rank gets bitwise the same reduction and its own array. A rank posts its n-th collective of a
group into round n, so non-blocking calls (``iallreduce_``) may still be pending while the next
one starts. Point-to-point messages go into a channel per (source, dest, tag); each receive
takes a ticket when it is posted, so messages match in posting order, as MPI guarantees.

Sends are buffered: ``send``/``isend`` copy the array and return at once (MPI may do the same
for small messages). All waits share one condition variable; they end with ``CommAborted`` when
another rank failed, and with ``CommDeadlock`` after ``timeout`` seconds or at once when they
wait on a rank whose function has already returned.

On a device backend (CuPy, or the strict stand-in) each rank's thread selects its own device,
``rank mod devices`` (a thread's current device is its own in CUDA), so a 4-rank world on a
2-GPU node uses both GPUs, and finishes its queued work before its function returns. A posted
copy is finished (the poster synchronises) before another rank, perhaps on another device,
reads it, and the reader moves it onto its own device (``xp.asarray``). With
``run_threads(..., staging=True)`` the ranks instead move device arrays through pinned host
buffers, exactly as ``MPIComm`` does for an MPI that cannot read device memory
(``minipar.dist.staging``: the same code, copies counted the same way), so the staging path
runs in-process too.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Callable

from minipar import backend
from minipar.dist.base import Comm, CommAborted, CommDeadlock, CommError, mismatch_error
from minipar.dist.staging import Staging
from minipar.dist.stats import CommStats

_POLL_S = 1.0  # a safety net only: every state change notifies the waiters


class _World:
    """State shared by all ranks of one run_threads call."""

    def __init__(self, size: int, timeout: float, staging: bool = False) -> None:
        self.size = size
        self.timeout = timeout
        self.staging = staging  # device arrays travel through host buffers, as MPI stages them
        self.cond = threading.Condition()
        self.failure: tuple[int, BaseException] | None = None  # the first error, and its rank
        self.finished: set[int] = set()  # world ranks whose function has returned
        self.pending_splits: dict[tuple, list] = {}
        self._ids = itertools.count()

    def next_id(self) -> int:
        return next(self._ids)

    def fail(self, rank: int, exc: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = (rank, exc)
            self.cond.notify_all()

    def finish(self, rank: int) -> None:
        with self.cond:
            self.finished.add(rank)
            self.cond.notify_all()


@dataclass
class _Round:
    """The n-th collective of a group: what each rank posted, and how many have read it."""

    size: int
    values: list = field(default_factory=list)
    descs: list = field(default_factory=list)
    posted: int = 0
    readers: int = 0

    def __post_init__(self) -> None:
        self.values = [None] * self.size
        self.descs = [None] * self.size


@dataclass
class _Channel:
    """Messages from one rank to another with one tag; ticket i takes the i-th message sent."""

    messages: dict = field(default_factory=dict)
    sent_at: dict = field(default_factory=dict)  # message index -> world-wide send order
    sent: int = 0
    tickets: int = 0


class _Group:
    """A set of world ranks (in group-rank order) with its rounds and channels."""

    def __init__(self, world: _World, members: list[int]) -> None:
        self.world = world
        self.gid = world.next_id()
        self.members = members
        self.rounds: dict[int, _Round] = {}
        self.channels: dict[tuple[int, int, int], _Channel] = {}

    def channel(self, src: int, dst: int, tag: int) -> _Channel:
        return self.channels.setdefault((src, dst, tag), _Channel())


class ThreadComm(Comm):
    """One rank's view of a group in an in-process world (see the module docstring)."""

    check = True  # calls are always compared across ranks (free here; optional under MPI)

    def __init__(self, world: _World, group: _Group, rank: int, name: str) -> None:
        self._world = world
        self._group = group
        self.rank = rank
        self.size = len(group.members)
        self.name = name
        self.stats = CommStats()
        self._seq = 0  # collectives this rank has posted on this group
        self.wire = Staging(self.stats, direct=False)  # used only when the world stages

    def _staged(self) -> bool:
        return self._world.staging and backend.on_device()

    def _give(self, x):
        """What this rank posts for ``x``: a private copy, finished before anyone reads it."""
        if self._staged():
            return self.wire.outgoing(x)  # a fresh host buffer (device -> host, blocking)
        out = x.copy()
        if backend.on_device():
            backend.synchronize()  # another thread, maybe on another device, will read it
        return out

    def _take(self, values: list) -> list:
        """Posted values as this rank computes with them: host arrays when staging, else
        arrays on this rank's device (moved there from another device if need be)."""
        if self._staged():
            return values
        xp = backend.xp()
        return [xp.asarray(v) for v in values]

    def _deliver(self, host):
        """A staged result: MPI writes it into a host buffer, which is copied to the device."""
        buf, finish = self.wire.incoming(host.shape, host.dtype)
        buf[...] = host
        return finish()

    @property
    def world_rank(self) -> int:
        return self._group.members[self.rank]

    # ---- waiting ----

    def _wait(self, ready: Callable[[], bool], what: str, waits_on: Callable[[], list[int]]):
        """Block (holding the world's condition) until ready(), an abort, or a deadlock."""
        w = self._world
        deadline = monotonic() + w.timeout
        while not ready():
            if w.failure is not None:
                rank, exc = w.failure
                raise CommAborted(f"{self!r}: {what} aborted because rank {rank} failed: "
                                  f"{type(exc).__name__}: {exc}")
            gone = [r for r in waits_on() if self._group.members[r] in w.finished]
            if gone:
                raise CommDeadlock(f"{self!r}: {what} waits on rank(s) {gone}, which already "
                                   f"returned from their function (deadlock)")
            left = deadline - monotonic()
            if left <= 0:
                raise CommDeadlock(f"{self!r}: {what} waited {w.timeout:g} s for rank(s) "
                                   f"{waits_on()} (deadlock?)")
            w.cond.wait(min(left, _POLL_S))

    def _alive(self, what: str) -> None:
        if self._world.failure is not None:
            rank, exc = self._world.failure
            raise CommAborted(f"{self!r}: {what} not started because rank {rank} failed: "
                              f"{type(exc).__name__}: {exc}")

    # ---- rounds ----

    def _post(self, desc: tuple, value: Any) -> int:
        g = self._group
        with self._world.cond:
            self._alive(desc[0])
            seq = self._seq
            self._seq += 1
            rnd = g.rounds.setdefault(seq, _Round(self.size))
            rnd.values[self.rank], rnd.descs[self.rank] = value, desc
            rnd.posted += 1
            if rnd.posted == self.size:
                self._world.cond.notify_all()
        return seq

    def _complete(self, seq: int) -> list:
        g = self._group
        with self._world.cond:
            rnd = g.rounds[seq]
            self._wait(lambda: rnd.posted == self.size, f"{rnd.descs[self.rank][0]} #{seq}",
                       lambda: [r for r in range(self.size) if rnd.descs[r] is None])
            rnd.readers += 1
            if rnd.readers == self.size:
                del g.rounds[seq]
        if any(d != rnd.descs[0] for d in rnd.descs):
            raise mismatch_error(self, rnd.descs)
        return rnd.values

    def _exchange(self, desc: tuple, value: Any) -> list:
        return self._complete(self._post(desc, value))

    # ---- collectives: posted copies are private, results are computed per rank ----

    def _allreduce(self, x, op, desc):
        values = self._take(self._exchange(desc, self._give(x)))
        if self._staged():
            return self._deliver(_reduce(values, op, backend.host_xp()))
        return _reduce(values, op, backend.xp())

    def _allreduce_inplace(self, x, op, desc):
        self._iallreduce_inplace(x, op, desc)()

    def _iallreduce_inplace(self, x, op, desc):
        if self._staged():
            buf, write_back = self.wire.inplace(x)
            seq = self._post(desc, buf.copy())  # MPI overwrites buf: others read a copy

            def finish_staged() -> None:
                _reduce(self._complete(seq), op, backend.host_xp(), out=buf)
                write_back()
            return finish_staged
        seq = self._post(desc, self._give(x))

        def finish() -> None:
            _reduce(self._take(self._complete(seq)), op, backend.xp(), out=x)
        return finish

    def _allgather(self, x, desc):
        values = self._take(self._exchange(desc, self._give(x)))
        if self._staged():
            return self._deliver(backend.host_xp().stack(values))
        return backend.xp().stack(values)

    def _reduce_scatter(self, x, op, desc):
        k = x.shape[0] // self.size
        mine = slice(self.rank * k, (self.rank + 1) * k)
        values = [v[mine] for v in self._take(self._exchange(desc, self._give(x)))]
        if self._staged():
            return self._deliver(_reduce(values, op, backend.host_xp()))
        return _reduce(values, op, backend.xp())

    def _broadcast(self, x, root, desc):
        values = self._exchange(desc, self._give(x) if self.rank == root else None)
        if self.rank == root:
            return None
        if self._staged():
            return self._deliver(values[root])
        return self._take([values[root]])[0].copy()

    def _barrier(self, desc):
        self._exchange(desc, None)

    def _allgather_bytes(self, payload, desc):
        return list(self._exchange(desc, payload))

    def _bcast_bytes(self, payload, root, desc):
        return self._exchange(desc, payload)[root]

    def _split(self, color, key, name):
        seq = self._post(("split",), (color, key))
        values = self._complete(seq)
        ranks = sorted((r for r in range(self.size) if values[r][0] == color),
                       key=lambda r: (values[r][1], r))
        w = self._world
        with w.cond:
            # The first member to get here creates the group; the last one removes the entry.
            entry = w.pending_splits.setdefault(
                (self._group.gid, seq, color),
                [_Group(w, [self._group.members[r] for r in ranks]), len(ranks)])
            entry[1] -= 1
            if entry[1] == 0:
                del w.pending_splits[(self._group.gid, seq, color)]
        return ThreadComm(w, entry[0], ranks.index(self.rank), name)

    # ---- point to point ----

    def _send(self, x, dest, tag):
        msg = self._give(x)
        with self._world.cond:
            self._alive("send")
            ch = self._group.channel(self.rank, dest, tag)
            ch.messages[ch.sent] = msg
            ch.sent_at[ch.sent] = self._world.next_id()
            ch.sent += 1
            self._world.cond.notify_all()

    def _isend(self, x, dest, tag):
        self._send(x, dest, tag)
        return lambda: None

    def _irecv(self, shape, dtype, source, tag):
        with self._world.cond:
            self._alive("recv")
            ch = self._group.channel(source, self.rank, tag)
            ticket = ch.tickets
            ch.tickets += 1

        def take():
            with self._world.cond:
                self._wait(lambda: ticket in ch.messages,
                           f"recv(source={source}, tag={tag}) message #{ticket}", lambda: [source])
                msg = ch.messages.pop(ticket)
                ch.sent_at.pop(ticket, None)
            if msg.dtype != dtype or msg.size != _count(shape):
                raise CommError(f"{self!r}: recv(source={source}, tag={tag}) expected "
                                f"{shape} {dtype}, but the message is {msg.shape} {msg.dtype}")
            if self._staged():
                return self._deliver(msg.reshape(shape))
            return self._take([msg])[0].reshape(shape)
        return take

    def _recv(self, shape, dtype, source, tag):
        return self._irecv(shape, dtype, source, tag)()

    def _recv_any(self, shape, dtype, tag):
        g, me = self._group, self.rank

        def first_sent():  # the channel whose next unclaimed message was sent earliest
            heads = [(ch.sent_at[ch.tickets], src, ch) for (src, dst, t), ch in g.channels.items()
                     if dst == me and t == tag and ch.tickets in ch.messages]
            return min(heads, key=lambda h: h[0], default=None)

        others = [r for r in range(self.size) if r != me]

        def waits_on() -> list[int]:  # a deadlock only once every possible sender has returned
            done = self._world.finished
            return others if all(g.members[r] in done for r in others) else []

        with self._world.cond:
            self._alive("recv_any")
            self._wait(lambda: first_sent() is not None, f"recv_any(tag={tag})", waits_on)
            _, source, ch = first_sent()
            msg = ch.messages.pop(ch.tickets)
            del ch.sent_at[ch.tickets]
            ch.tickets += 1
        if msg.dtype != dtype or msg.size != _count(shape):
            raise CommError(f"{self!r}: recv_any(tag={tag}) expected {shape} {dtype}, but the "
                            f"message from rank {source} is {msg.shape} {msg.dtype}")
        return msg.reshape(shape), source


def _reduce(values: list, op: str, xp, out=None):
    """Reduce in rank order with array module ``xp``, so that every rank computes bitwise the
    same result."""
    ufunc = xp.maximum if op == "max" else xp.add
    if out is None:
        out = values[0].copy()
    else:
        xp.copyto(out, values[0])
    for v in values[1:]:
        ufunc(out, v, out=out)
    return out


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run_threads(fn: Callable[[Comm], Any], world_size: int, timeout: float = 120.0,
                staging: bool = False) -> list:
    """Run ``fn(comm)`` on ``world_size`` threads, one ``ThreadComm`` rank each; results by rank.

    If a rank raises, the others' pending waits end with ``CommAborted`` and this re-raises the
    first original exception, with its rank added as a note. A wait longer than ``timeout``
    seconds raises ``CommDeadlock`` naming the op and the group instead of hanging. On a device
    backend, rank r runs on device ``r mod devices`` (a world of one stays on the caller's), and
    ``staging=True`` moves device arrays through host buffers as a non-CUDA-aware MPI needs.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_threads: world_size must be a positive int, got {world_size!r}")
    world = _World(world_size, timeout, staging)
    group = _Group(world, list(range(world_size)))
    results: list = [None] * world_size
    dev = backend.device()

    def main(rank: int) -> None:
        try:
            if world_size > 1:
                dev.select(backend.pick_device(rank, dev.count))
            results[rank] = fn(ThreadComm(world, group, rank, "world"))
            backend.synchronize()  # the rank's queued work is done when run_threads returns
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            world.fail(rank, exc)
        finally:
            world.finish(rank)

    if world_size == 1:
        main(0)  # in the caller's thread: plain tracebacks and debuggers
    else:
        threads = [threading.Thread(target=main, args=(r,), name=f"minipar-rank-{r}",
                                    daemon=True) for r in range(world_size)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException as exc:  # Ctrl-C in the caller: stop the ranks, then re-raise
            world.fail(-1, exc)
            raise
    if world.failure is not None:
        rank, exc = world.failure
        exc.add_note(f"(raised on rank {rank} of a run_threads world of {world_size})")
        raise exc
    return results


def local_comm(name: str = "world") -> Comm:
    """A world of one rank without threads or MPI: every collective is a no-op (serial runs)."""
    world = _World(1, float("inf"))
    return ThreadComm(world, _Group(world, [0]), 0, name)
