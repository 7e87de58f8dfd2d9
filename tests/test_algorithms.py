"""Ring allreduce/allgather/reduce-scatter from send/recv on thread worlds (also under MPI).

Sizes 1 to 4 include 3, so the rings are checked off powers of two, and the drawn array sizes
include ones smaller than the world (empty chunks) and ones not divisible by it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

import ring_cases
from minipar.dist.algorithms import chunk_bounds
from minipar.dist.comm import run_threads


@pytest.mark.parametrize("size", (1, 2, 3, 4))
@pytest.mark.parametrize("case", ring_cases.CASES, ids=lambda c: c.name)
def test_ring_case_on_threads(case, size):
    @settings(max_examples=case.examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(params=case.params)
    def prop(params):
        run_threads(lambda comm: case.fn(comm, **params), size, timeout=30)
    prop()


@pytest.mark.parametrize("n,p", [(0, 3), (2, 4), (7, 3), (12, 4), (13, 1)])
def test_chunk_bounds_tile_the_range(n, p):
    bounds = chunk_bounds(n, p)
    sizes = [b.stop - b.start for b in bounds]
    assert len(bounds) == p and sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert [b.start for b in bounds] == [sum(sizes[:c]) for c in range(p)]
    assert sizes == sorted(sizes, reverse=True)  # the longer chunks come first
