"""Pipeline parallelism under real mpirun (one process per rank), at world sizes 2 and 4.

Every rank trains the layout, computes the serial reference locally, and the comparison is
asserted collectively. Layouts come from the world size: pp = 2 on two ranks; pp = 2 x dp = 2,
pp = 2 x tp = 2 and pp = 4 on four. A larger activation (d_model 64, seq 64: 256 KiB per
message) goes past MPI's eager limit, so the isend / blocking recv pattern is exercised under
the rendezvous protocol too.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import SCHEDULE_NAMES, ModelConfig, ParallelConfig
from minipar.dist.assertions import collective_assert

TINY = ModelConfig(vocab_size=12, seq_len=6, n_layers=4, d_model=8, n_heads=2)


def layouts(size: int) -> list[dict]:
    """dp/tp/pp sizes whose product is the world size, pp >= 2."""
    if size == 2:
        return [dict(pp=2)]
    if size == 4:
        return [dict(pp=2, dp=2), dict(pp=2, tp=2), dict(pp=4)]
    return [dict(pp=size)]


def _par(schedule: str, m_per: int, **sizes) -> ParallelConfig:
    pp = sizes["pp"]
    if schedule == "interleaved":
        return ParallelConfig(schedule=schedule, microbatches=pp * m_per,
                              virtual_stages=2 if TINY.n_layers % (2 * pp) == 0 else 1, **sizes)
    return ParallelConfig(schedule=schedule, microbatches=pp + m_per - 1, **sizes)


def check_equal(world, cfg, par, steps=2, rows=1, seed=0) -> None:
    batches = random_batches(cfg, steps, par.dp * par.microbatches * rows, seed=seed)
    result = train_layout(world, cfg, par, batches, seed=seed)
    reference = serial_reference(cfg, batches, seed=seed)  # every rank, locally
    bad = mismatches(result, reference, rtol=1e-9)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_schedule_equals_serial(world, schedule):
    for sizes in layouts(world.size):
        check_equal(world, TINY, _par(schedule, 2, **sizes))


@settings(max_examples=10)  # derandomized by tests/mpi/conftest.py: every rank draws the same
@given(st.sampled_from(SCHEDULE_NAMES), st.integers(1, 3), st.integers(1, 2), st.data())
def test_drawn_pipelines_equal_serial(world, schedule, m_per, rows, data):
    sizes = data.draw(st.sampled_from(layouts(world.size)))
    sp = sizes.get("tp", 1) > 1 and data.draw(st.booleans())
    stages = [0, 1, 2] if schedule == "zb-h1" else [0, 1, 2, 3]  # zb-h1 defers W past ZeRO-3
    zero = data.draw(st.sampled_from(stages)) if sizes.get("dp", 1) > 1 else 0
    par = _par(schedule, m_per, **sizes)
    par = ParallelConfig(**{**par.__dict__, "sequence_parallel": sp, "zero": zero})
    check_equal(world, TINY, par, rows=rows, seed=m_per)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_large_activations_past_the_eager_limit(world, schedule):
    cfg = ModelConfig(vocab_size=16, seq_len=64, n_layers=world.size, d_model=64, n_heads=4)
    par = ParallelConfig(pp=world.size, schedule=schedule, microbatches=world.size + 1)
    check_equal(world, cfg, par, steps=1, rows=8)
