"""Predicted communication equals what ``MPIComm`` records, exactly, under real mpirun.

The property of tests/test_comm_prediction.py with one process per rank (2, 4 or 8 ranks): every
rank trains the drawn layout over the job's world, compares each step's ``CommStats`` of every
group with ``predict_comm_bytes`` for its own pipeline stage and dp rank, and the verdict is
collective. The MPI byte counts come from the buffers mpi4py is given, not from the thread
world's bookkeeping, so this proves the accounting on the path real jobs use.
"""

from __future__ import annotations

from hypothesis import given, settings

from test_comm_prediction import NAMED, comm_problems, draw_layout, run
from minipar.config import replace
from minipar.dist.assertions import collective_assert


def _check(world, case: dict) -> None:
    bad = comm_problems(case, world.rank, run(world, case))
    collective_assert(world, not bad, f"{case['par']}: {bad[:2]}")


def test_predicted_comm_equals_mpicomm_stats(world):
    @settings(max_examples=10)  # derandomized by the profile in conftest.py: all ranks agree
    @given(case=draw_layout(world=world.size))
    def prop(case):
        _check(world, case)
    prop()


def test_named_layouts_under_mpi(world):
    """The in-process named cases, with dp stretched (or tp, pp shrunk) to this world."""
    for case in NAMED:
        par = case["par"]
        dp = world.size // (par.tp * par.pp)
        if dp < 1:  # too many tp x pp ranks for this world: keep pp, drop tp
            par = replace(par, tp=1, sequence_parallel=False)
            dp = world.size // par.pp
        par = replace(par, dp=dp)
        batch = case["batch"] // case["par"].dp * dp
        _check(world, {**case, "par": par, "batch": batch})
