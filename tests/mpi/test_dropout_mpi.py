"""Dropout under real mpirun: every layout that fits the world, with dropout on, equals the
serial run (computed by every rank locally) number for number. Each process draws only its own
slice of each mask (minipar.nn.dropout), from its dp rows, tp heads and tokens, and stage's
layers, with no communication about randomness at all.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import SCHEDULE_NAMES, ModelConfig, ParallelConfig
from minipar.dist.assertions import collective_assert

CFG = ModelConfig(vocab_size=11, seq_len=8, n_layers=4, d_model=16, n_heads=4, dropout=0.3)


def sizes(world: int) -> list[tuple[int, int, int]]:
    """(dp, tp, pp) with dp x tp x pp = world, every axis used where the world allows."""
    return [(dp, tp, world // (dp * tp)) for dp in (1, 2, 4, 8) for tp in (1, 2, 4)
            if world % (dp * tp) == 0 and world // (dp * tp) in (1, 2)]


@settings(max_examples=8)  # derandomized by tests/mpi/conftest.py: every rank draws the same
@given(st.data())
def test_layouts_with_dropout_equal_serial(world, data):
    dp, tp, pp = data.draw(st.sampled_from(sizes(world.size)))
    schedule = data.draw(st.sampled_from(SCHEDULE_NAMES))
    zero = data.draw(st.integers(0, 2 if schedule == "zb-h1" else 3)) if dp > 1 else 0
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=zero, schedule=schedule,
                         microbatches=2 * pp if schedule == "interleaved" else 2,
                         sequence_parallel=tp > 1 and data.draw(st.booleans()))
    batches = random_batches(CFG, 2, dp * par.microbatches, seed=11)
    result = train_layout(world, CFG, par, batches, seed=11)
    bad = mismatches(result, serial_reference(CFG, batches, seed=11), rtol=1e-9)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")


def named_layout(world: int) -> ParallelConfig:
    """The largest composed layout of this world (the 8-rank launch runs only this test)."""
    if world == 8:
        return ParallelConfig(dp=2, tp=2, pp=2, zero=1, microbatches=2, sequence_parallel=True)
    if world == 4:
        return ParallelConfig(dp=2, pp=2, zero=3, schedule="gpipe", microbatches=2)
    return ParallelConfig(tp=world, sequence_parallel=True)


def test_composed_layout_with_dropout_equals_serial(world):
    par = named_layout(world.size)
    batches = random_batches(CFG, 2, par.dp * par.microbatches * 2, seed=5)
    result = train_layout(world, CFG, par, batches, seed=5)
    bad = mismatches(result, serial_reference(CFG, batches, seed=5), rtol=1e-9)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")
