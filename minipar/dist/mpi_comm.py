"""The MPI world: ``Comm`` over mpi4py, one process per rank.

Arrays move with mpi4py's buffer (upper-case) methods on contiguous NumPy arrays, so the hot
path never pickles: ``Allreduce``, ``Allgather``, ``Reduce_scatter_block``, ``Bcast``, ``Send``,
``Recv``, ``Isend``, ``Irecv``, ``Iallreduce``. Only ``allgather_obj``/``bcast_obj`` pickle.

With ``check=True`` (or env ``MINIPAR_COMM_CHECK=1``) every collective first compares the
ranks' calls (op, shape, dtype, axis, root) with one small extra allgather, so a mismatch is the
same ``CommError`` on every rank instead of a hang or garbage. That extra message is not
counted in the stats; the thread world always makes this check, at no cost.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from mpi4py import MPI
from mpi4py.util import dtlib

from minipar import backend
from minipar.dist.base import Comm, CommError, call_site, mismatch_error
from minipar.dist.stats import CommStats

_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


class MPIComm(Comm):
    """A ``Comm`` over an mpi4py communicator (see ``minipar.dist.comm`` for the semantics)."""

    def __init__(self, mpi_comm: MPI.Comm, name: str = "world", check: bool | None = None):
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.name = name
        self.stats = CommStats()
        self.check = os.environ.get("MINIPAR_COMM_CHECK") == "1" if check is None else check

    @classmethod
    def world(cls, check: bool | None = None) -> "MPIComm":
        """All processes of the job, on a duplicate of COMM_WORLD (collective).

        The duplicate keeps minipar's messages apart from any raw mpi4py traffic on COMM_WORLD.
        """
        return cls(MPI.COMM_WORLD.Dup(), "world", check)

    def _verify(self, desc: tuple) -> None:
        if self.check:
            calls = self.mpi.allgather((desc, call_site()))
            descs = [d for d, _ in calls]
            if any(d != descs[0] for d in descs):
                raise mismatch_error(self, descs, [site for _, site in calls])

    # ---- collectives ----

    def _allreduce(self, x, op, desc):
        self._verify(desc)
        out = backend.xp().empty_like(x)
        self.mpi.Allreduce(x, out, op=_OPS[op])
        return out

    def _allreduce_inplace(self, x, op, desc):
        self._verify(desc)
        self.mpi.Allreduce(MPI.IN_PLACE, x, op=_OPS[op])

    def _iallreduce_inplace(self, x, op, desc):
        self._verify(desc)
        req = self.mpi.Iallreduce(MPI.IN_PLACE, x, op=_OPS[op])

        def finish() -> None:
            req.Wait()
        return finish

    def _allgather(self, x, desc):
        self._verify(desc)
        out = backend.xp().empty((self.size,) + x.shape, dtype=x.dtype)
        self.mpi.Allgather(x, out)
        return out

    def _reduce_scatter(self, x, op, desc):
        self._verify(desc)
        out = backend.xp().empty((x.shape[0] // self.size,) + x.shape[1:], dtype=x.dtype)
        self.mpi.Reduce_scatter_block(x, out, op=_OPS[op])
        return out

    def _broadcast(self, x, root, desc):
        self._verify(desc)
        if self.rank == root:
            self.mpi.Bcast(x, root=root)
            return None
        out = backend.xp().empty(x.shape, dtype=x.dtype)
        self.mpi.Bcast(out, root=root)
        return out

    def _barrier(self, desc):
        self._verify(desc)
        self.mpi.Barrier()

    def _allgather_bytes(self, payload, desc):
        self._verify(desc)
        return self.mpi.allgather(payload)

    def _bcast_bytes(self, payload, root, desc):
        self._verify(desc)
        return self.mpi.bcast(payload, root=root)

    def _split(self, color, key, name):
        return MPIComm(self.mpi.Split(color, key), name, self.check)

    # ---- point to point ----

    def _send(self, x, dest, tag):
        self.mpi.Send(x, dest=dest, tag=tag)

    def _isend(self, x, dest, tag):
        req = self.mpi.Isend(x, dest=dest, tag=tag)

        def finish() -> None:
            req.Wait()
            del keep[:]  # the buffer must live until the send completes
        keep = [x]
        return finish

    def _recv(self, shape, dtype, source, tag):
        out = backend.xp().empty(shape, dtype=dtype)
        status = MPI.Status()
        try:
            self.mpi.Recv(out, source=source, tag=tag, status=status)
        except MPI.Exception as exc:
            raise self._recv_error(shape, dtype, source, tag, str(exc)) from exc
        self._check_count(status, out, source, tag)
        return out

    def _irecv(self, shape, dtype, source, tag):
        out = backend.xp().empty(shape, dtype=dtype)
        req = self.mpi.Irecv(out, source=source, tag=tag)

        def finish() -> Any:
            status = MPI.Status()
            try:
                req.Wait(status)
            except MPI.Exception as exc:
                raise self._recv_error(shape, dtype, source, tag, str(exc)) from exc
            self._check_count(status, out, source, tag)
            return out
        return finish

    def _check_count(self, status: MPI.Status, out, source: int, tag: int) -> None:
        got = status.Get_count(dtlib.from_numpy_dtype(out.dtype))
        if got != out.size:
            raise self._recv_error(out.shape, out.dtype, source, tag,
                                   f"the message has {got} elements")

    def _recv_error(self, shape, dtype, source, tag, why: str) -> CommError:
        return CommError(f"{self!r}: recv(source={source}, tag={tag}) expected {shape} {dtype}: "
                         f"{why}")


def install_abort_handler(comm: Comm | None = None) -> None:
    """Make an uncaught exception on any rank end the whole job at once.

    A plain exception on one rank of ``mpirun -n 4`` leaves the other ranks blocked in their
    next collective forever. This ``sys.excepthook`` prints one line,
    ``minipar: error on rank R: <message>`` (the full traceback when ``MINIPAR_DEBUG=1``), then
    calls ``MPI.COMM_WORLD.Abort(1)``, which takes every rank down.
    """
    rank = comm.rank if comm is not None else MPI.COMM_WORLD.Get_rank()

    def hook(etype, value, tb) -> None:
        if os.environ.get("MINIPAR_DEBUG") == "1":
            traceback.print_exception(etype, value, tb, file=sys.stderr)
        # minipar's own user-facing errors are written to be read alone; others need the type.
        own = etype.__module__.startswith("minipar") and str(value)
        msg = str(value) if own else f"{etype.__name__}: {value}"
        print(f"minipar: error on rank {rank}: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
