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
       pos_bias=st.booleans(), seed=st.integers(0, 100))
def test_encdec_layouts_equal_serial_under_mpirun(world, tp, zero, sp, tie, norm, pos, pos_bias,
                                                  seed):
    par = ParallelConfig(dp=world.size // tp, tp=tp, zero=zero, sequence_parallel=sp and tp > 1,
                         microbatches=2)
    cfg = encdec_cfg(tie_weights=tie, norm=norm, pos=pos, pos_bias=pos_bias, weight_init="fan-in")
    bad = layout_mismatches(world, cfg, par, rows=1, seed=seed)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")


@st.composite
def pp_layouts(draw, n: int):
    """A dp x tp x pp layout with pp >= 2 on n ranks, any schedule; (ParallelConfig, layers)."""
    pp = draw(st.sampled_from([p for p in (2, 4) if n % p == 0]))
    tp = draw(st.sampled_from([t for t in (1, 2) if (n // pp) % t == 0]))
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]))
    v = 2 if schedule == "interleaved" else 1
    zero = 0 if schedule == "zb-h1" else draw(st.integers(0, 3))
    layers = 2 if (4 % (pp * v) == 0) else 4
    return ParallelConfig(dp=n // (pp * tp), tp=tp, pp=pp, zero=zero, schedule=schedule,
                          virtual_stages=v, microbatches=pp,
                          sequence_parallel=draw(st.booleans()) and tp > 1), layers


@settings(max_examples=4)
@given(data=st.data(), norm=st.sampled_from(["pre", "post"]), pos_bias=st.booleans(),
       seed=st.integers(0, 100))
def test_encdec_pipeline_layouts_equal_serial_under_mpirun(world, data, norm, pos_bias, seed):
    """Stages of encoder then decoder layers, the (x_dec, memory) pair between decoder stages,
    every schedule, composed with dp (ZeRO) and tp (SP): equal to the serial run."""
    par, layers = data.draw(pp_layouts(world.size))
    cfg = encdec_cfg(n_layers=layers, norm=norm, pos_bias=pos_bias)
    bad = layout_mismatches(world, cfg, par, rows=1, seed=seed)
    collective_assert(world, not bad, f"{par}: {bad[:3]}")


def test_encdec_predicted_comm_equals_mpicomm_stats(world):
    """The cost model's bytes for the encoder-decoder (pair messages, tp with its cross K/V f,
    ZeRO) equal what every rank's MPIComm records, group by group."""
    from test_comm_prediction import comm_problems
    from test_encdec_cost import encdec_layouts, run

    @settings(max_examples=6)  # derandomized by tests/mpi/conftest.py: all ranks agree
    @given(case=encdec_layouts(world=world.size))
    def prop(case):
        bad = comm_problems(case, world.rank, run(world, case))
        collective_assert(world, not bad, f"{case['par']}: {bad[:2]}")
    prop()
