"""The shared Comm, mesh and ring checks under real mpirun (one process per rank).

The same check functions as tests/test_comm.py, test_mesh.py and test_algorithms.py, here on
``MPIComm``; run by tests/test_mpi_launch.py with 2 and 4 ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from mpi4py import MPI

import accounting_cases
import comm_cases
import ring_cases
from minipar.dist.comm import MPIComm
from minipar.dist.assertions import collective_assert
from on_device import down, up

CASES = comm_cases.CASES + accounting_cases.CASES + ring_cases.CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_shared_case_under_mpi(world, case):
    if case.params is None:
        case.fn(world)
        return

    @settings(max_examples=case.examples)  # derandomized by the profile in conftest.py
    @given(params=case.params)
    def prop(params):
        case.fn(world, **params)
    prop()


def test_world_is_the_whole_job(world):
    ok = (isinstance(world, MPIComm) and world.size == MPI.COMM_WORLD.Get_size() > 1
          and world.rank == MPI.COMM_WORLD.Get_rank() and world.check
          and repr(world) == f"MPIComm(world, rank {world.rank} of {world.size})")
    collective_assert(world, ok, repr(world))


def test_split_inherits_the_call_check(world):
    sub = world.split(world.rank % 2, 0, "half")
    collective_assert(world, isinstance(sub, MPIComm) and sub.check and sub.name == "half",
                      repr(sub))


def test_large_buffers_move_without_pickling(world):
    """4 MiB per rank through each hot-path collective, checked exactly."""
    p, r = world.size, world.rank
    x = up(np.full(2**19, float(r + 1)))  # (524288,) float64 = 4 MiB
    total = p * (p + 1) / 2
    got = world.allreduce(x)
    world.allreduce_(x)
    shard = world.reduce_scatter(up(np.full((p, 2**19), 1.0)))
    got, x, shard = down((got, x, shard))
    ok = (np.all(got == total) and np.all(x == total) and shard.shape == (1, 2**19)
          and np.all(shard == p))
    collective_assert(world, bool(ok), "large-buffer collectives")
