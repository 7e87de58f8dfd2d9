"""With dropout on, every layout equals the serial run number for number (float64, rtol 1e-9):
dp under ZeRO 0-3 with microbatches and buckets, tp with and without sequence parallelism,
pipelines under every schedule, and all of them composed. The masks are drawn per rank from
the global index of each element (minipar.nn.dropout), so a dp rank's rows, a tp rank's heads
and tokens and a stage's layers each draw the serial run's slice. ``tests/mpi/`` repeats this
under real mpirun.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig, SCHEDULE_NAMES
from minipar.dist.comm import run_threads

RTOL = 1e-9


@st.composite
def layouts(draw) -> ParallelConfig:
    """A valid layout of at most 8 ranks for a 4-layer, 4-head model, any axis mix."""
    dp = draw(st.sampled_from([1, 2, 4]))
    tp = draw(st.sampled_from([1, 2, 4] if dp < 4 else [1, 2]))
    pp = draw(st.sampled_from([1, 2] if dp * tp <= 4 else [1]))
    schedule = draw(st.sampled_from(SCHEDULE_NAMES))
    virtual = 2 if schedule == "interleaved" and draw(st.booleans()) else 1
    microbatches = draw(st.sampled_from([1, 2]))
    if schedule == "interleaved" and pp > 1:
        microbatches = pp * microbatches  # interleaving needs a multiple of pp
    zero = draw(st.integers(0, 3))
    bucket = draw(st.sampled_from([0.0, 1e-3])) if zero < 3 else 0.0
    if schedule == "zb-h1":
        zero, bucket = min(zero, 2), 0.0
    return ParallelConfig(dp=dp, tp=tp, pp=pp, zero=zero, schedule=schedule,
                          sequence_parallel=tp > 1 and draw(st.booleans()),
                          microbatches=microbatches, virtual_stages=virtual, bucket_mb=bucket)


def model(p: float, vocab: int = 11, seq: int = 8, tie: bool = False,
          pos: str = "learned") -> ModelConfig:
    return ModelConfig(vocab_size=vocab, seq_len=seq, n_layers=4, d_model=16, n_heads=4,
                       tie_weights=tie, pos=pos, dropout=p)


def run(cfg: ModelConfig, par: ParallelConfig, batches, seed: int):
    return run_threads(lambda w: train_layout(w, cfg, par, batches, seed=seed), par.world)[0]


@settings(max_examples=30, deadline=None)
@given(par=layouts(), p=st.sampled_from([0.1, 0.5]), vocab=st.sampled_from([7, 11, 16]),
       seq=st.sampled_from([4, 8]), tie=st.booleans(),
       pos=st.sampled_from(["learned", "sinusoidal"]), rows=st.sampled_from([1, 2]),
       seed=st.integers(0, 10_000))
def test_every_layout_with_dropout_equals_serial(par, p, vocab, seq, tie, pos, rows, seed):
    """Losses of 2 AdamW steps, the last step's full gradients and the updated weights."""
    cfg = model(p, vocab, seq, tie and par.pp * par.virtual_stages == 1, pos)  # one chunk
    batches = random_batches(cfg, steps=2, batch=par.dp * par.microbatches * rows, seed=seed)
    assert mismatches(run(cfg, par, batches, seed), serial_reference(cfg, batches, seed=seed),
                      RTOL) == []


# One named layout per family, so that a failure says which axis broke (and the deliberate
# breaks in the report name a test): each must equal serial with dropout, and differ from the
# run without it (the masks act).
FAMILIES = {
    "dp2-zero0-mb2": ParallelConfig(dp=2, microbatches=2),
    "dp2-zero1": ParallelConfig(dp=2, zero=1),
    "dp2-zero2-buckets": ParallelConfig(dp=2, zero=2, bucket_mb=1e-3),
    "dp4-zero3": ParallelConfig(dp=4, zero=3),
    "tp2": ParallelConfig(tp=2),
    "tp4-sp": ParallelConfig(tp=4, sequence_parallel=True),
    **{f"pp2-{s}": ParallelConfig(pp=2, schedule=s, microbatches=2,
                                  virtual_stages=2 if s == "interleaved" else 1)
       for s in SCHEDULE_NAMES},
    "dp2-tp2-pp2-sp-zero1": ParallelConfig(dp=2, tp=2, pp=2, microbatches=2, zero=1,
                                           sequence_parallel=True),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_axis_with_dropout_equals_serial(name):
    par = FAMILIES[name]
    cfg = model(0.3)
    batches = random_batches(cfg, steps=2, batch=par.dp * par.microbatches * 2, seed=7)
    got = run(cfg, par, batches, seed=7)
    assert mismatches(got, serial_reference(cfg, batches, seed=7), RTOL) == []
    assert mismatches(got, serial_reference(model(0.0), batches, seed=7), RTOL) != []
