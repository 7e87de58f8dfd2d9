"""Activation recomputation and the blockwise kernel under real mpirun: with --recompute
selective and full every loss, gradient and updated weight is the same bits as with none, and
the blockwise kernel equals the serial plain run (tests/test_recompute.py does the same on the
thread world, over more layouts)."""

from __future__ import annotations

import numpy as np
import pytest

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig, replace
from minipar.dist.assertions import collective_assert

CFG = ModelConfig(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=4)


def layout(size: int) -> ParallelConfig:
    if size >= 4:
        return ParallelConfig(dp=size // 4, tp=2, pp=2, schedule="1f1b", microbatches=2,
                              sequence_parallel=True)
    return ParallelConfig(tp=2, sequence_parallel=True)


@pytest.mark.parametrize("attention", ["plain", "blockwise"])
def test_recomputation_changes_no_number_under_mpirun(world, attention):
    par = replace(layout(world.size), attention=attention)
    batches = random_batches(CFG, 2, 4 * par.dp, seed=7)
    runs = {rc: train_layout(world, CFG, replace(par, recompute=rc), batches, seed=7)
            for rc in ("none", "selective", "full")}
    for rc in ("selective", "full"):
        same = runs[rc].losses == runs["none"].losses and all(
            np.array_equal(runs[rc].params[n], runs["none"].params[n])
            and np.array_equal(runs[rc].grads[n], runs["none"].grads[n])
            for n in runs["none"].params)
        collective_assert(world, same, f"{par} recompute {rc} differs from none")
    bad = mismatches(runs["none"], serial_reference(CFG, batches, seed=7), rtol=1e-9)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")
