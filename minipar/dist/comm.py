"""Communicators: one ``Comm`` interface, two worlds, every byte counted.

A *communicator* is a group of ``size`` ranks; each rank knows its ``rank`` in the group. A
*collective* is a call every rank of the group makes, in the same order, with arrays of the same
shape and dtype. minipar needs these (p = group size, x = this rank's array):

    allreduce(x, op)        every rank gets  x_0 + x_1 + ... + x_{p-1}  (or avg, max);
                            data parallelism averages gradients with it
    allgather(x, axis)      every rank gets  concat(x_0, ..., x_{p-1})  along axis;
                            ZeRO rebuilds full parameters from shards with it
    reduce_scatter(x, axis) rank r gets slice r (of p equal slices along axis) of the sum;
                            ZeRO-2/3 keep only their gradient shard with it
    broadcast(x, root)      every rank gets root's x
    send/recv, isend/irecv  one rank to one rank; pipeline stages pass activations with them
    barrier()               wait until all ranks arrive
    split(color, key, name) new groups out of this one (a mesh's dp, tp and pp groups)
    allgather_obj/bcast_obj pickled Python objects, for control and checks only

Two worlds implement the same interface with the same semantics and the same accounting:

- ``MPIComm`` (``minipar.dist.mpi_comm``): one process per rank under ``mpirun``; arrays move
  with mpi4py's buffer methods, never pickled.
- ``ThreadComm`` and ``run_threads(fn, world_size)`` (``minipar.dist.threads``): one thread per
  rank inside one Python process. It exists so that tests, lessons and notebooks can run a 4- or
  8-rank job without ``mpirun``, and so that a failing rank is a normal exception (never a
  hang). ``local_comm()`` is a world of one for serial runs, where every collective is a no-op.

Shared semantics:

- Inputs may be non-contiguous (they are copied to contiguous first); the dtype is kept.
  ``allreduce`` returns a new array, 0-d arrays included. ``allreduce_``/``iallreduce_`` work in
  place and need a C-contiguous array. Negative axes count from the end.
- ``op`` is "sum", "avg" (sum, then divide by p; floating dtypes only) or "max".
- ``reduce_scatter`` needs ``x.shape[axis] % p == 0``, else ``CommError`` naming both numbers.
- A group of one returns at once without a copy (``allreduce``, ``allgather``,
  ``reduce_scatter``, ``broadcast`` return ``x`` itself) and records nothing: nothing moved.
- Messages from one rank to another with the same tag arrive in the order they were sent.
- A wrong call (bad op or axis, ranks disagreeing on shapes) raises ``CommError`` on every rank.

Accounting (``comm.stats``, a ``CommStats``): every call on a group of two or more records, on
every rank, ``calls += 1``, ``seconds +=`` the wall time of the call, and these bytes (n is the
named array's ``nbytes``; ``//`` rounds down):

    op               bytes                   wire_bytes (what this rank sends)
    allreduce        n = x.nbytes            2 * (p - 1) * n // p
    allgather        n = output nbytes       (p - 1) * n // p
    reduce_scatter   n = input nbytes        (p - 1) * n // p
    broadcast        n = x.nbytes            n
    send             n = x.nbytes            n             (on the sender; isend too)
    recv             n = received nbytes     0             (on the receiver; irecv too)
    barrier          0                       0
    object           n = pickled length      n             (allgather_obj: all ranks' pickles
                                                            summed; bcast_obj: root's pickle;
                                                            pickle.HIGHEST_PROTOCOL)

``iallreduce_`` counts as "allreduce"; a non-blocking call is counted when it starts, and the
time spent in its ``wait()`` is added to the op's seconds. The wire figures are those of the
bandwidth-optimal ring algorithms (Patarasuk & Yuan 2009): a ring allreduce is a reduce-scatter
plus an allgather, each sending p-1 chunks of n/p bytes. ``minipar.dist.algorithms`` builds
those rings from send/recv, and its measured sends match these figures.
``stats.wire_bytes(op, n, p)`` is the rule in code; the cost model uses it.
``split`` and the optional call check of ``MPIComm(check=True)`` are not recorded.
"""

from __future__ import annotations

from minipar.dist.base import (PICKLE_PROTOCOL, REDUCE_OPS, Comm, CommAborted, CommDeadlock,
                               CommError, Request)
from minipar.dist.stats import COMM_OPS, CommStats, OpStats, wire_bytes
from minipar.dist.threads import ThreadComm, local_comm, run_threads

__all__ = [
    "COMM_OPS", "PICKLE_PROTOCOL", "REDUCE_OPS", "Comm", "CommAborted", "CommDeadlock",
    "CommError", "CommStats", "MPIComm", "OpStats", "Request", "ThreadComm",
    "install_abort_handler", "local_comm", "run_threads", "wire_bytes",
]


def __getattr__(name: str):
    # Importing mpi4py.MPI initialises MPI; serial runs and the thread world never need it.
    if name in ("MPIComm", "install_abort_handler"):
        from minipar.dist import mpi_comm  # noqa: PLC0415
        return getattr(mpi_comm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
