"""3D parallelism under real mpirun: dp, tp and pp together equal the serial run.

At 8 ranks (launched by tests/test_mpi_launch.py, oversubscribed on a small machine) this is
dp 2 x tp 2 x pp 2 with 1F1B and ZeRO-1, as issue 6 asks, plus sequence parallelism and other
schedules; at 2 and 4 ranks the largest 2- and 3-axis layouts that fit.
"""

from __future__ import annotations

import pytest

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.assertions import collective_assert

CFG = ModelConfig(vocab_size=13, seq_len=8, n_layers=4, d_model=16, n_heads=4)


def layouts(size: int) -> list[ParallelConfig]:
    if size == 8:
        return [
            ParallelConfig(dp=2, tp=2, pp=2, schedule="1f1b", microbatches=4, zero=1),
            ParallelConfig(dp=2, tp=2, pp=2, schedule="interleaved", microbatches=2,
                           virtual_stages=2, zero=2, sequence_parallel=True),
            ParallelConfig(dp=2, tp=2, pp=2, schedule="zb-h1", microbatches=3, zero=0,
                           bucket_mb=0.0, sequence_parallel=True),
            ParallelConfig(dp=2, tp=2, pp=2, schedule="gpipe", microbatches=2, zero=3),
        ]
    if size == 4:
        return [ParallelConfig(dp=2, tp=2, zero=1),
                ParallelConfig(tp=2, pp=2, schedule="1f1b", microbatches=3,
                               sequence_parallel=True)]
    return [ParallelConfig(tp=2, sequence_parallel=True), ParallelConfig(dp=2, zero=2)]


@pytest.mark.parametrize("index", range(4))
def test_3d_layout_equals_serial(world, index):
    options = layouts(world.size)
    par = options[index % len(options)]
    batches = random_batches(CFG, 2, par.dp * par.microbatches * 2, seed=index)
    result = train_layout(world, CFG, par, batches, seed=index)
    reference = serial_reference(CFG, batches, seed=index)  # every rank, locally
    bad = mismatches(result, reference, rtol=1e-9)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")
