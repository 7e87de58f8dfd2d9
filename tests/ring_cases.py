"""Checks of the send/recv ring algorithms against the library collectives, in both worlds.

Also checks the bytes: each rank of a ring allreduce sends 2n - |c_r| - |c_{r+1}| elements
(its chunk sizes), which is the library's recorded 2(p-1)/p x n exactly when p divides n, and
which sums over the ranks to exactly 2(p-1) x n elements in every case.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from comm_cases import Case, assert_same, rank_data, reduced
from minipar import backend
from minipar.dist.algorithms import ring_allgather, ring_allreduce, ring_reduce_scatter
from minipar.dist.assertions import collective_assert

CASES: list[Case] = []
DTYPES = st.sampled_from(("float32", "float64", "int64"))


def chunk_sizes(n: int, p: int) -> list[int]:
    return [n // p + (1 if c < n % p else 0) for c in range(p)]


def sent_bytes(comm) -> int:
    stats = comm.stats.as_dict()
    return stats["send"]["wire_bytes"] if "send" in stats else 0


def check_ring_allreduce(comm, shape, dtype, seed):
    p, r = comm.size, comm.rank
    ring = comm.split(0, r, "ring")  # fresh stats: only the ring's sends
    data = [rank_data(q, shape, dtype, seed) for q in range(p)]
    got = ring_allreduce(ring, data[r])
    assert_same(comm, got, reduced(data, "sum"), "ring allreduce")
    assert_same(comm, got, backend.to_host(comm.allreduce(data[r])), "ring == library")
    n, item = data[r].size, data[r].itemsize
    sent = sent_bytes(ring)
    ring.stats.reset()
    ring.allreduce(data[r])
    library = ring.stats.as_dict().get("allreduce", {"wire_bytes": 0})["wire_bytes"]
    sizes = chunk_sizes(n, p)
    mine = 0 if p == 1 else (2 * n - sizes[r] - sizes[(r + 1) % p]) * item
    total = sum(comm.allgather_obj(sent))
    ok = (sent == mine and abs(sent - library) < 2 * item
          and (n % p != 0 or sent == library) and total == 2 * (p - 1) * n * item)
    collective_assert(comm, ok, f"ring sent {sent} B (expected {mine}), library records "
                                f"{library}, all ranks {total}, n={n}, p={p}")


CASES.append(Case(check_ring_allreduce, st.fixed_dictionaries({
    "shape": st.lists(st.integers(0, 7), max_size=2).map(tuple), "dtype": DTYPES,
    "seed": st.integers(0, 2**16)}), 12))


def check_ring_reduce_scatter(comm, rows, cols, extra, dtype, seed):
    p, r = comm.size, comm.rank
    shape = (rows * p + extra, cols)
    data = [rank_data(q, shape, dtype, seed) for q in range(p)]
    got = ring_reduce_scatter(comm, data[r])
    n = rows * p * cols + extra * cols
    start = sum(chunk_sizes(n, p)[:r])
    want = reduced(data, "sum").reshape(-1)[start:start + chunk_sizes(n, p)[r]]
    assert_same(comm, got, want, "ring reduce-scatter: this rank's chunk of the flat sum")
    if not extra:
        assert_same(comm, got, backend.to_host(comm.reduce_scatter(data[r])).reshape(-1),
                    "ring == library")


CASES.append(Case(check_ring_reduce_scatter, st.fixed_dictionaries({
    "rows": st.integers(0, 3), "cols": st.integers(1, 3), "extra": st.integers(0, 1),
    "dtype": DTYPES, "seed": st.integers(0, 2**16)}), 10))


def check_ring_allgather(comm, shape, dtype, seed):
    p, r = comm.size, comm.rank
    ring = comm.split(0, r, "ring")
    data = [rank_data(q, shape, dtype, seed) for q in range(p)]
    got = ring_allgather(ring, data[r])
    assert_same(comm, got, np.concatenate(data, axis=0), "ring allgather")
    sent = sent_bytes(ring)
    ring.stats.reset()
    ring.allgather(data[r])
    library = ring.stats.as_dict().get("allgather", {"wire_bytes": 0})["wire_bytes"]
    collective_assert(comm, sent == library == (p - 1) * data[r].nbytes,
                      f"ring allgather sent {sent} B, library records {library}")


CASES.append(Case(check_ring_allgather, st.fixed_dictionaries({
    "shape": st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple), "dtype": DTYPES,
    "seed": st.integers(0, 2**16)}), 10))
