"""The encoder-decoder under real mpirun (one process per rank), world sizes 2 and 4: data
parallelism with ZeRO, tensor parallelism with and without sequence parallelism. Every rank
trains the layout, computes the serial reference locally, and asserts collectively that
losses, full gradients and updated weights match (``tests/encdec_cases.py``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.config import ParallelConfig
from minipar.dist.assertions import collective_assert
from encdec_cases import encdec_cfg, layout_mismatches


@settings(max_examples=4)  # derandomized by tests/mpi/conftest.py: every rank draws the same
@given(tp=st.sampled_from([1, 2]), zero=st.integers(0, 3), sp=st.booleans(), tie=st.booleans(),
       norm=st.sampled_from(["pre", "post"]), pos=st.sampled_from(["learned", "sinusoidal"]),
       seed=st.integers(0, 100))
def test_encdec_layouts_equal_serial_under_mpirun(world, tp, zero, sp, tie, norm, pos, seed):
    par = ParallelConfig(dp=world.size // tp, tp=tp, zero=zero, sequence_parallel=sp and tp > 1,
                         microbatches=2)
    cfg = encdec_cfg(tie_weights=tie, norm=norm, pos=pos)
    bad = layout_mismatches(world, cfg, par, rows=1, seed=seed)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")
