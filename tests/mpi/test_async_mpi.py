"""Asynchronous training under real mpirun: the properties of tests/test_async.py, with the
arrival order decided by real processes (run by tests/test_mpi_launch.py at 2 and 4 ranks)."""

from __future__ import annotations

import numpy as np

import async_cases as C
from minipar.dist.assertions import assert_allclose_collective, collective_assert

LR = 0.1


def test_staleness_zero_is_synchronous_sgd(world):
    for servers in range(1, min(world.size - 1, 2) + 1):
        final, _ = C.ps_case(world, 3, LR, servers, 0)
        expected = C.sync_sgd(world.size - servers, 3, LR)
        assert_allclose_collective(world, final, expected, rtol=1e-12, atol=1e-14,
                                   what=f"s=0 with {servers} server(s)")


def test_a_recorded_run_replays_to_its_serial_reference_bit_for_bit(world):
    workers = world.size - 1
    for bound in (None, 1):
        free, result = C.ps_case(world, 3, LR, 1, bound)
        order = world.bcast_obj(result.order if world.rank == 0 else None)
        reference = C.reference_of(order, workers, LR)
        collective_assert(world, np.array_equal(free, reference), f"free run, bound {bound}")
        again, _ = C.ps_case(world, 3, LR, 1, bound, order=order)
        collective_assert(world, np.array_equal(again, reference), f"replay, bound {bound}")


def test_local_sgd_equals_its_written_out_reference(world):
    for sync_every in (1, 2):
        final = C.local_sgd_case(world, 4, LR, sync_every)
        expected = C.local_sgd_reference(world.size, 4, LR, sync_every)
        assert_allclose_collective(world, final, expected, rtol=1e-12, atol=1e-14,
                                   what=f"local SGD, H={sync_every}")
