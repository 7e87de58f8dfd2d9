"""Ring collectives built only from send/recv: how allreduce moves 2(p-1)/p x n bytes per rank.

For teaching: the library collectives (``Comm.allreduce`` ...) call MPI, which picks its own
algorithm; these functions spell out the bandwidth-optimal ring (Patarasuk & Yuan 2009, the
algorithm behind Baidu's ring allreduce and NCCL's rings) with ``isend``/``recv`` only, so that
``comm.stats`` shows exactly what each rank sends.

The flat array of n elements is cut into p chunks, chunk c on rank c's "home". Ranks form a ring:
rank r sends to r+1 and receives from r-1.

    reduce-scatter  p-1 steps. At step s rank r sends chunk (r-s-1) mod p and adds the chunk it
                    receives, (r-s-2) mod p, into its copy. Each chunk travels the ring once,
                    gathering one contribution per hop; after p-1 hops rank r holds chunk r
                    summed over all ranks.
    allgather       p-1 steps. At step s rank r sends chunk (r-s) mod p, which it has complete,
                    and stores the chunk it receives. After p-1 steps every rank has all chunks.

Each phase sends p-1 chunks per rank, (p-1)/p x n elements, so allreduce = reduce-scatter +
allgather sends 2(p-1)/p x n: the figure ``Comm.allreduce`` records as ``wire_bytes``. All ranks
send at once, so the time is about 2(p-1)/p x n / bandwidth, which approaches 2n / bandwidth: it
hardly grows with p (the latency term, 2(p-1) steps, does).

Sizes not divisible by p: chunks differ by at most one element (the first n mod p chunks get one
more). In the ring allreduce rank r sends every chunk except its own two "last" ones (chunk r in
the reduce-scatter, chunk r+1 in the allgather), i.e. 2n - |c_r| - |c_{r+1}| elements, which
differs from 2(p-1)/p x n by less than two elements; summed over all ranks it is exactly
2(p-1) x n elements.
"""

from __future__ import annotations

from minipar import backend
from minipar.dist.comm import Comm, CommError

RING_TAG = 7_001  # a tag of its own, so ring steps never match other messages of the pair


def chunk_bounds(n: int, p: int) -> list[slice]:
    """p contiguous slices of range(n); the first n mod p are one element longer."""
    base, extra = divmod(n, p)
    bounds, start = [], 0
    for c in range(p):
        stop = start + base + (1 if c < extra else 0)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


def _step(comm: Comm, flat, send_chunk: slice, recv_chunk: slice):
    """Send one chunk to the right neighbour and receive one from the left, without deadlock.

    ``isend`` first: if every rank did a blocking send first, large messages (sent without
    buffering) would leave all ranks waiting for a receive that nobody has posted yet.
    """
    p, r = comm.size, comm.rank
    req = comm.isend(flat[send_chunk], (r + 1) % p, tag=RING_TAG)
    incoming = comm.recv(recv_chunk.stop - recv_chunk.start, flat.dtype, (r - 1) % p,
                         tag=RING_TAG)
    req.wait()  # the sent chunk is never the one updated in this step, but reuse needs the wait
    return incoming


def _reduce_scatter_ring(comm: Comm, flat, bounds: list[slice]) -> None:
    """In place on ``flat``: afterwards chunk ``comm.rank`` holds the sum over all ranks."""
    p, r = comm.size, comm.rank
    for s in range(p - 1):
        recv_chunk = bounds[(r - s - 2) % p]
        flat[recv_chunk] += _step(comm, flat, bounds[(r - s - 1) % p], recv_chunk)


def _allgather_ring(comm: Comm, flat, bounds: list[slice]) -> None:
    """In place on ``flat``: rank r starts with chunk r complete and ends with every chunk."""
    p, r = comm.size, comm.rank
    for s in range(p - 1):
        recv_chunk = bounds[(r - s - 1) % p]
        flat[recv_chunk] = _step(comm, flat, bounds[(r - s) % p], recv_chunk)


def ring_allreduce(comm: Comm, x):
    """The sum over ranks of ``x`` (any shape), as reduce-scatter then allgather on a ring."""
    x = backend.xp().asarray(x)
    if comm.size == 1:
        return x
    flat = x.reshape(-1).copy()  # (n,) our working copy
    bounds = chunk_bounds(flat.size, comm.size)
    _reduce_scatter_ring(comm, flat, bounds)
    _allgather_ring(comm, flat, bounds)
    return flat.reshape(x.shape)


def ring_reduce_scatter(comm: Comm, x):
    """Chunk ``comm.rank`` (1-d, ``chunk_bounds`` sizes) of the flattened sum over ranks of x.

    When ``x.shape[0]`` is divisible by p this equals ``comm.reduce_scatter(x).reshape(-1)``.
    """
    x = backend.xp().asarray(x)
    if comm.size == 1:
        return x.reshape(-1)
    flat = x.reshape(-1).copy()
    bounds = chunk_bounds(flat.size, comm.size)
    _reduce_scatter_ring(comm, flat, bounds)
    return flat[bounds[comm.rank]].copy()


def ring_allgather(comm: Comm, x):
    """Every rank's ``x`` (same shape on all ranks) concatenated along axis 0, in rank order."""
    x = backend.xp().asarray(x)
    if x.ndim == 0:
        raise CommError(f"{comm!r}: ring_allgather needs an array with at least one axis")
    if comm.size == 1:
        return x
    p, n = comm.size, x.size
    flat = backend.xp().empty(p * n, dtype=x.dtype)  # (p * n,)
    bounds = [slice(c * n, (c + 1) * n) for c in range(p)]
    flat[bounds[comm.rank]] = x.reshape(-1)
    _allgather_ring(comm, flat, bounds)
    return flat.reshape((p * x.shape[0],) + x.shape[1:])
