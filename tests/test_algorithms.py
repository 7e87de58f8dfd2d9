"""Ring allreduce/allgather/reduce-scatter from send/recv on thread worlds (also under MPI).

Sizes 1 to 4 include 3, so the rings are checked off powers of two, and the drawn array sizes
include ones smaller than the world (empty chunks) and ones not divisible by it.
"""

from __future__ import annotations

import pytest

import comm_cases
import ring_cases
from minipar.dist.algorithms import chunk_bounds


@pytest.mark.parametrize("size", (1, 2, 3, 4))
@pytest.mark.parametrize("case", ring_cases.CASES, ids=lambda c: c.name)
def test_ring_case_on_threads(case, size):
    comm_cases.run_case(case, size)


@pytest.mark.parametrize("n,p", [(0, 3), (2, 4), (7, 3), (12, 4), (13, 1)])
def test_chunk_bounds_tile_the_range(n, p):
    bounds = chunk_bounds(n, p)
    sizes = [b.stop - b.start for b in bounds]
    assert len(bounds) == p and sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert [b.start for b in bounds] == [sum(sizes[:c]) for c in range(p)]
    assert sizes == sorted(sizes, reverse=True)  # the longer chunks come first
