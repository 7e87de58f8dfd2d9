"""Uneven pipeline splits (``--partition N,N,...``) under real mpirun: every schedule, with
drawn block counts per virtual stage, equals the serial run (losses, gradients, weights)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import SCHEDULE_NAMES, ModelConfig, ParallelConfig
from minipar.dist.assertions import collective_assert


def _sizes(world: int) -> list[dict]:
    return [dict(pp=2)] if world == 2 else [dict(pp=2, dp=2), dict(pp=2, tp=2), dict(pp=4)]


@settings(max_examples=6)  # derandomized by tests/mpi/conftest.py: every rank draws the same
@given(st.sampled_from(SCHEDULE_NAMES), st.data())
def test_drawn_partitions_equal_serial(world, schedule, data):
    sizes = data.draw(st.sampled_from(_sizes(world.size)))
    pp = sizes["pp"]
    v = 2 if schedule == "interleaved" else 1
    layers = pp * v + data.draw(st.integers(0, 3))
    cuts = sorted(data.draw(st.sets(st.integers(1, layers - 1), min_size=pp * v - 1,
                                    max_size=pp * v - 1)))
    blocks = tuple(b - a for a, b in zip((0, *cuts), (*cuts, layers)))
    m = pp if schedule == "interleaved" else pp + 1
    cfg = ModelConfig(vocab_size=40, seq_len=6, n_layers=layers, d_model=8, n_heads=2)
    par = ParallelConfig(schedule=schedule, microbatches=m, virtual_stages=v,
                         partition=blocks, **sizes)
    batches = random_batches(cfg, 2, par.dp * m, seed=len(cuts))
    result = train_layout(world, cfg, par, batches, seed=1)
    reference = serial_reference(cfg, batches, seed=1)  # every rank, locally
    bad = mismatches(result, reference, rtol=1e-9)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")
