"""Context parallelism under real mpirun: every cp layout that fits the job equals the serial run.

At 2 ranks cp 2 (both cuts, recomputation, both kernel flags); at 4, cp 4 and cp 2 with dp,
tp + sp or pp; at 8 (``tests/test_mpi_launch.py``), cp 2 with two more axes, and cp 8. The
thread-world twin is ``tests/test_context_parallel.py``. With dropout (each ring tile drawing
its slice of the serial mask) a couple of layouts per world; thread twin
``tests/test_cp_dropout.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig, replace
from minipar.dist.assertions import collective_assert

CFG = ModelConfig(vocab_size=11, seq_len=16, n_layers=2, d_model=16, n_heads=4)


def layouts(size: int) -> list[ParallelConfig]:
    if size == 8:
        return [ParallelConfig(dp=2, cp=2, tp=2, sequence_parallel=True, zero=1),
                ParallelConfig(cp=2, tp=2, pp=2, microbatches=2, recompute="selective"),
                ParallelConfig(cp=8, cp_split="contiguous"),
                ParallelConfig(dp=2, cp=2, pp=2, microbatches=2, recompute="full",
                               attention="blockwise")]
    if size == 4:
        return [ParallelConfig(cp=4), ParallelConfig(dp=2, cp=2, zero=3),
                ParallelConfig(cp=2, tp=2, sequence_parallel=True, recompute="full"),
                ParallelConfig(cp=2, pp=2, microbatches=2, cp_split="contiguous")]
    return [ParallelConfig(cp=2), ParallelConfig(cp=2, cp_split="contiguous"),
            ParallelConfig(cp=2, recompute="selective", attention="blockwise"),
            ParallelConfig(cp=2, recompute="full")]


def dropout_layouts(size: int) -> list[ParallelConfig]:
    if size == 8:
        return [ParallelConfig(dp=2, cp=2, tp=2, sequence_parallel=True, recompute="selective"),
                ParallelConfig(cp=4, pp=2, microbatches=2, cp_split="contiguous")]
    if size == 4:
        return [ParallelConfig(cp=4, attention="blockwise"),
                ParallelConfig(cp=2, tp=2, sequence_parallel=True, recompute="full")]
    return [ParallelConfig(cp=2), ParallelConfig(cp=2, cp_split="contiguous", recompute="full")]


def _check(world, par: ParallelConfig, seed: int, steps: int = 2, cfg: ModelConfig = CFG) -> None:
    batches = random_batches(cfg, steps, 2 * par.dp * par.microbatches, seed=seed)
    result = train_layout(world, cfg, par, batches, seed=seed)
    bad = mismatches(result, serial_reference(cfg, batches, seed=seed), rtol=1e-9)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")


@pytest.mark.parametrize("index", range(4))
def test_cp_layout_equals_serial_under_mpirun(world, index):
    _check(world, layouts(world.size)[index], seed=index)


@settings(max_examples=6)
@given(split=st.sampled_from(["zigzag", "contiguous"]),
       recompute=st.sampled_from(["none", "selective", "full"]),
       attention=st.sampled_from(["plain", "blockwise"]), tp=st.sampled_from([1, 2]),
       seed=st.integers(0, 1000))
def test_drawn_cp_options_under_mpirun(world, split, recompute, attention, tp, seed):
    tp = tp if world.size >= 4 else 1
    par = ParallelConfig(cp=world.size // tp, tp=tp, sequence_parallel=tp > 1, cp_split=split,
                         recompute=recompute, attention=attention)
    _check(world, par, seed=seed, steps=1)


@pytest.mark.parametrize("index", range(2))
def test_cp_with_dropout_equals_serial_under_mpirun(world, index):
    """Every process draws only its tiles and tokens of each mask, by global index."""
    _check(world, dropout_layouts(world.size)[index], seed=7 + index,
           cfg=replace(CFG, dropout=0.3))
