"""The encoder-decoder in every layout it supports equals the serial run: data parallelism with
ZeRO 0-3 and buckets, tensor parallelism with and without sequence parallelism (heads of all
three attentions split; the memory's gradient summed over tp by each cross-attention's f),
microbatches; and cached greedy decoding under tp writes the serial model's tokens.
``tests/mpi/test_encdec_mpi.py`` repeats the property under real mpirun."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.config import ParallelConfig
from minipar.dist.comm import local_comm, run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.models.decoding import greedy_cached
from minipar.models.encdec import EncoderDecoder
from minipar.nn.module import BuildContext
import on_device as dev
from encdec_cases import encdec_batches, encdec_cfg, layout_mismatches


@settings(max_examples=25, deadline=None)
@given(tp=st.sampled_from([1, 2, 4]), dp=st.sampled_from([1, 2, 4]), zero=st.integers(0, 3),
       sp=st.booleans(), bucket=st.booleans(), tie=st.booleans(),
       pos=st.sampled_from(["learned", "sinusoidal"]), norm=st.sampled_from(["pre", "post"]),
       vocab=st.sampled_from([7, 11, 13]), mbs=st.sampled_from([1, 2]),
       rows=st.sampled_from([1, 2]), pos_bias=st.booleans(),
       init=st.sampled_from(["gpt2", "fan-in"]), seed=st.integers(0, 10_000))
def test_encdec_layouts_equal_serial(tp, dp, zero, sp, bucket, tie, pos, norm, vocab, mbs, rows,
                                     pos_bias, init, seed):
    """Losses of both steps, full gradients and the weights after 2 AdamW steps (the position
    bias, split with the heads over tp, is non-zero from the first step on)."""
    if dp * tp > 8:
        dp = 8 // tp
    sp = sp and tp > 1
    cfg = encdec_cfg(vocab_size=vocab, tie_weights=tie, pos=pos, norm=norm, pos_bias=pos_bias,
                     weight_init=init)
    par = ParallelConfig(dp=dp, tp=tp, zero=zero, sequence_parallel=sp, microbatches=mbs,
                         bucket_mb=1e-4 if bucket and zero < 3 else 0.0)
    results = run_threads(lambda w: layout_mismatches(w, cfg, par, rows, seed), par.world)
    assert results[0] == [], (par, results[0])


def test_memory_gradient_is_summed_over_tp_by_f():
    """Deliberately skip each cross-attention's f (the allreduce of its key/value projection's
    input gradient): the tp run must then differ from the serial one, so the property test
    above does see where the memory's gradient is summed."""
    from minipar.parallel import tensor

    cfg = encdec_cfg()
    par = ParallelConfig(tp=2)
    original = tensor.ColumnParallelLinear.backward

    def no_f_for_kv(self, dy, mb=0):
        if ".kv." not in self.w.name:
            return original(self, dy, mb)
        self.tp = local_comm("tp")  # this rank's partial sum only: no allreduce
        return original(self, dy, mb)

    tensor.ColumnParallelLinear.backward = no_f_for_kv
    try:
        bad = run_threads(lambda w: layout_mismatches(w, cfg, par, 2, 0), 2)[0]
    finally:
        tensor.ColumnParallelLinear.backward = original
    assert any("grads" in b for b in bad), bad


def test_cached_decoding_under_tp_writes_the_serial_tokens():
    cfg = encdec_cfg(vocab_size=13, seq_len=5, src_len=6)
    src = encdec_batches(cfg, 1, 4, seed=2)[0][0][:, :cfg.src_len]

    def decode(world):
        par = ParallelConfig(tp=2)
        engine = Engine(cfg, par, Mesh(world, tp=2), seed=3, dtype="float64")
        for p in engine.params:
            p.data *= 20  # large weights: outputs that change from step to step
        return dev.down(greedy_cached(engine.chunks[0], dev.up(src), 1, cfg.seq_len))

    tp_tokens = run_threads(decode, 2)
    serial = EncoderDecoder(cfg, BuildContext(3, "float64", local_comm("tp")))
    for p in serial.params():
        p.data *= 20
    want = dev.down(greedy_cached(serial, dev.up(src), 1, cfg.seq_len))
    assert len(np.unique(want)) > 1
    for got in tp_tokens:
        np.testing.assert_array_equal(got, want)
