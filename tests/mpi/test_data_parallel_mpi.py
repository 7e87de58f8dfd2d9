"""Data parallelism and ZeRO 1/2/3 under real mpirun: the properties of
tests/test_data_parallel.py, one process per rank (run with 2 and 4 ranks by
tests/test_mpi_launch.py).

Every rank trains the drawn layout over the job's world and computes the serial run of the same
batches by itself; each rank checks its own results and dp traffic, and the verdict is
collective, so a failure on one rank fails all of them together.
"""

from __future__ import annotations

from hypothesis import given, settings

from test_data_parallel import (BATCH, SMALL_BUCKET_MB, STEPS, check_rank, draw_case,
                                expected_memory, run_case)
from minipar.compare import random_batches, serial_reference
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.dist.assertions import collective_assert


def test_data_parallel_equals_serial_under_mpi(world):
    @settings(max_examples=8)  # derandomized by the profile in conftest.py: all ranks agree
    @given(case=draw_case(world=world.size))
    def prop(case):
        _check(world, case)
    prop()


def _check(world, case: dict) -> None:
    batches = random_batches(case["cfg"], STEPS, BATCH, seed=5)
    result = run_case(world, case, batches)
    reference = serial_reference(case["cfg"], batches, optimizer=case["optimizer"],
                                 weight_decay=0.1)
    bad = check_rank(case, world.rank, result, reference)
    collective_assert(world, not bad, f"{case}: {bad[:3]}")


def test_named_layouts_under_mpi(world):
    """The cases that matter most, whatever hypothesis draws: overlapped buckets with
    accumulation, ZeRO-3 with a tied head, bucketed ZeRO-2 beside tensor parallelism."""
    n = world.size
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    tied = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2,
                       tie_weights=True)
    for model, par in (
            (cfg, ParallelConfig(dp=n, zero=0, microbatches=2, bucket_mb=SMALL_BUCKET_MB)),
            (tied, ParallelConfig(dp=n, zero=3, microbatches=2)),
            (cfg, ParallelConfig(dp=n // 2, tp=2, zero=2, bucket_mb=SMALL_BUCKET_MB,
                                 sequence_parallel=True))):
        _check(world, {"cfg": model, "par": par, "optimizer": "adamw"})


def test_memory_per_rank_equals_the_zero_formulas_under_mpi(world):
    cfg = ModelConfig(vocab_size=13, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    for tp in (1, 2):
        for zero in (0, 1, 2, 3):
            par = ParallelConfig(dp=world.size // tp, tp=tp, zero=zero)
            engine = Engine(cfg, par, Mesh(world, dp=par.dp, tp=tp), dtype="float64")
            got, want = engine.dp.memory(), expected_memory(cfg, par, 0, "adamw")
            collective_assert(world, got == want, f"tp {tp} zero {zero}: {got} != {want}")
