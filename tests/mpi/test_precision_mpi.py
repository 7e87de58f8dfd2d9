"""Mixed precision under real mpirun: 16-bit buffers cross MPI as uint16 with fp32-add user ops
(minipar.dist.mpi_comm), and the thread-world checks of tests/precision_cases.py hold the same:
pipelines bit for bit against the serial run, other layouts within the stated tolerance, memory
and bytes equal to the cost model, a forced fp16 overflow skipped on every rank."""

from __future__ import annotations

import pytest

import precision_cases as cases
from minipar.config import ParallelConfig, replace


def _layouts(size: int) -> list[ParallelConfig]:
    if size == 2:
        return [ParallelConfig(dp=2, zero=1), ParallelConfig(tp=2, sequence_parallel=True)]
    return [ParallelConfig(dp=2, tp=2, zero=2), ParallelConfig(dp=2, pp=2, microbatches=2),
            ParallelConfig(tp=2, pp=2, microbatches=2, sequence_parallel=True)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pipeline_equals_serial_bit_for_bit(world, precision):
    pp = world.size
    par = ParallelConfig(pp=pp, microbatches=pp, schedule="1f1b")
    cases.check_same_order_bitwise(world, replace(cases.TINY, n_layers=pp), par, precision)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_zero_equals_plain_dp(world, precision):
    """Bit for bit on 2 ranks (a + b is one rounding either way); on 4, MPI's allreduce and
    reduce-scatter may group the 4-term 16-bit sum differently, so within the tolerance."""
    par = ParallelConfig(dp=world.size, zero=3)
    if world.size == 2:
        cases.check_same_order_bitwise(world, cases.TINY, par, precision)
    else:
        cases.check_within_tolerance(world, cases.TINY, par, precision)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_layouts_within_tolerance_memory_and_bytes(world, precision):
    for par in _layouts(world.size):
        cases.check_within_tolerance(world, cases.TINY, par, precision)
        cases.check_memory_and_bytes(world, cases.TINY, par, precision)


def test_forced_overflow_is_skipped_on_every_rank(world):
    cases.check_forced_overflow(world, cases.TINY, _layouts(world.size)[0])
