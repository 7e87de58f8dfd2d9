"""The encoder-decoder over pipeline stages equals the serial run: every schedule (gpipe, 1f1b,
interleaved, zb-h1) composed with dp (ZeRO 0-3) and tp (with and without SP); pp-trained weights
decode to the serial model's tokens; the program checker's dataflow check accepts the pair
messages (x_dec, memory) and rejects a flow that drops or invents the memory.
``tests/mpi/test_encdec_mpi.py`` repeats the layouts under real mpirun."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.config import ConfigError, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.models import encdec_pipeline as EP
from minipar.models.decoding import greedy_cached
from minipar.parallel.program_checks import ProgramError, check_dataflow, check_program
from minipar.parallel.schedules import make_schedule
from minipar.train.show import serial_copy
import on_device as dev
from encdec_cases import encdec_batches, encdec_cfg, layout_mismatches


@st.composite
def pp_layouts(draw):
    """(ParallelConfig, n_layers): pp 2 or 4, every schedule, dp x tp x pp <= 8 ranks."""
    pp = draw(st.sampled_from([2, 4]))
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]))
    v = draw(st.sampled_from([1, 2])) if schedule == "interleaved" else 1
    tp = draw(st.sampled_from([1, 2])) if pp == 2 else 1
    dp = draw(st.sampled_from([1, 2])) if pp * tp <= 4 else 1
    zero = 0 if schedule == "zb-h1" else draw(st.integers(0, 3))
    mbs = pp * draw(st.integers(1, 2)) if schedule == "interleaved" else draw(st.sampled_from(
        [1, 2, 4]))
    layers = draw(st.sampled_from([n for n in (1, 2, 3, 4) if (2 * n) % (pp * v) == 0]))
    sp = draw(st.booleans()) and tp > 1
    return ParallelConfig(dp=dp, tp=tp, pp=pp, zero=zero, sequence_parallel=sp,
                          schedule=schedule, virtual_stages=v, microbatches=mbs), layers


@settings(max_examples=20, deadline=None)
@given(layout=pp_layouts(), norm=st.sampled_from(["pre", "post"]),
       pos=st.sampled_from(["learned", "sinusoidal"]), pos_bias=st.booleans(),
       seed=st.integers(0, 10_000))
def test_encdec_pipeline_layouts_equal_serial(layout, norm, pos, pos_bias, seed):
    """Losses of both steps, full gradients and the weights after 2 AdamW steps."""
    par, layers = layout
    cfg = encdec_cfg(n_layers=layers, norm=norm, pos=pos, pos_bias=pos_bias)
    results = run_threads(lambda w: layout_mismatches(w, cfg, par, 1, seed), par.world)
    assert results[0] == [], (par, layers, results[0])


@pytest.mark.parametrize("pp,layers", [(2, 1), (2, 2), (4, 2), (4, 3)])
def test_every_split_point_equals_serial(pp, layers):
    """Boundaries inside the encoder, at its end, and inside the decoder (the pair)."""
    cfg = encdec_cfg(n_layers=layers)
    par = ParallelConfig(pp=pp, schedule="1f1b", microbatches=2)
    if (2 * layers) % pp:
        with pytest.raises(ConfigError, match="2 x --layers"):
            par.validate(cfg)
        return
    assert run_threads(lambda w: layout_mismatches(w, cfg, par, 1, 5), pp)[0] == []


def test_dropping_the_incoming_memory_gradient_is_caught(monkeypatch):
    """Break the sum over stages (a decoder stage ignores the dmemory of later stages): the
    pipeline must then differ from the serial run in the encoder's gradients."""
    original = EP.EncDecChunk._unpack

    def drop_memory_grad(self, buf, parts):
        out = original(self, buf, parts)
        if "memory" in out and buf.shape[1] != sum(self.lengths[p] for p in self.parts_in):
            out["memory"] = out["memory"] * 0  # only gradients arrive in parts_out's layout
        return out

    cfg = encdec_cfg(n_layers=2)
    par = ParallelConfig(pp=4, schedule="1f1b", microbatches=2)
    assert EP.boundary_parts(2, [1, 1, 1, 1])[3] == ("x_dec", "memory")
    monkeypatch.setattr(EP.EncDecChunk, "_unpack", drop_memory_grad)
    bad = run_threads(lambda w: layout_mismatches(w, cfg, par, 1, 0), 4)[0]
    assert any("encoder" in b for b in bad), bad


def test_pp_trained_weights_decode_to_the_serial_tokens():
    """Train 2 steps in pp 2 x tp 2 (zb-h1) and serially; gather the full weights on rank 0 and
    decode greedily with the cache (decoding a pp model = gathering it, see train/show.py)."""
    cfg = encdec_cfg(n_layers=2, vocab_size=13, seq_len=5, src_len=6, pos_bias=True)
    batches = encdec_batches(cfg, 2, 4, seed=3)
    src = batches[0][0][:, :cfg.src_len]

    def run(par):
        def body(world):
            engine = Engine(cfg, par, Mesh(world, dp=par.dp, pp=par.pp, tp=par.tp), seed=3,
                            dtype="float64", lr=1e-3)
            for x, y in batches:
                engine.train_step(x, y, int((y >= 0).sum()))
            ev = engine.evaluate([batches[0]])  # teacher-forced, through the stages
            model = serial_copy(engine)
            if model is None:
                return ev, None
            for p in model.params():
                p.data *= 20  # large weights: outputs that change from step to step
            return ev, dev.down(greedy_cached(model, dev.up(src), 1, cfg.seq_len))
        return run_threads(body, par.world)[0]

    ev_pp, tokens_pp = run(ParallelConfig(pp=2, tp=2, schedule="zb-h1", microbatches=2))
    ev_serial, tokens_serial = run(ParallelConfig())
    assert len(np.unique(tokens_serial)) > 1
    np.testing.assert_array_equal(tokens_pp, tokens_serial)
    assert ev_pp["exact_match"] == ev_serial["exact_match"]
    assert ev_pp["loss"] == pytest.approx(ev_serial["loss"], rel=1e-9)


# ------------------------------------------------------------------ the checker's dataflow
@pytest.mark.parametrize("schedule,pp,v", [("gpipe", 2, 1), ("1f1b", 4, 1), ("zb-h1", 4, 1),
                                           ("interleaved", 2, 2), ("interleaved", 4, 2)])
def test_checker_accepts_the_pair_messages_of_every_schedule(schedule, pp, v):
    prog = make_schedule(schedule, pp, 2 * pp, v)
    check_program(prog)
    blocks = EP.encdec_blocks(4, pp * v)
    carries = check_dataflow(prog, EP.dataflow(4, blocks))
    n = pp * v
    assert carries[0] == ()
    enc_end = n // 2  # equal split of 8 layers: the encoder ends where chunk n/2 starts
    for g in range(1, n):
        want = (("x_enc",) if g < enc_end else ("memory",) if g == enc_end
                else ("x_dec", "memory"))
        assert carries[g] == want, (g, carries)


def test_checker_rejects_a_flow_that_drops_or_invents_the_memory():
    prog = make_schedule("1f1b", 4, 4)
    flow = EP.dataflow(2, [1, 1, 1, 1])  # encoder 0 | encoder 1 | decoder 0 | decoder 1
    check_dataflow(prog, flow)
    dropped = dict(flow, carries=[(), ("x_enc",), ("memory",), ("x_dec",)])
    with pytest.raises(ProgramError, match="global chunk 3 carries"):
        check_dataflow(prog, dropped)
    early = dict(flow, carries=[(), ("x_enc", "memory"), ("memory",), ("x_dec", "memory")])
    with pytest.raises(ProgramError, match="global chunk 1"):
        check_dataflow(prog, early)
    no_end = dict(flow, ends=[frozenset()] * 4)
    with pytest.raises(ProgramError):
        check_dataflow(prog, no_end)
    unmade = dict(flow, makes=[frozenset({"x_enc"}), frozenset(), frozenset({"x_dec"}),
                               frozenset()])
    with pytest.raises(ProgramError):
        check_dataflow(prog, unmade)


def test_message_shapes_are_the_packed_pair():
    cfg = encdec_cfg(n_layers=2, seq_len=4, src_len=6, d_model=16)
    shapes = [EP.message_shape(cfg, g, 3, 4, 1) for g in range(1, 4)]
    assert shapes == [(3, 6, 16), (3, 6, 16), (3, 4 + 6, 16)]
    assert EP.message_shape(cfg, 3, 3, 4, 1, tp=2, sequence_parallel=True) == (3, 5, 16)


@pytest.mark.parametrize("counts", [(1, 3), (3, 1), (1, 2, 1)])
def test_explicit_partition_equals_serial(counts):
    """--partition N,N over the 2L encoder and decoder layers: a pair boundary at pp 2 (3,1),
    an encoder boundary (1,3), three stages."""
    from dataclasses import replace

    cfg = encdec_cfg(n_layers=2)
    par = ParallelConfig(pp=len(counts), schedule="1f1b", microbatches=2, partition=counts)
    assert run_threads(lambda w: layout_mismatches(w, cfg, par, 1, 4), par.world)[0] == []
    with pytest.raises(ConfigError, match="--partition 2,1: --arch encdec needs 2 counts"):
        replace(par, pp=2, partition=(2, 1)).validate(cfg)


def test_balanced_partition_gives_decoder_chunks_fewer_layers():
    """A decoder layer costs more than an encoder layer (cross-attention), so the balanced
    split of 4 + 4 layers over 2 stages puts the boundary inside the decoder; the CLI takes it
    and refuses a bad one with one line."""
    from minipar.sim.encdec_cost import resolve_partition

    cfg = encdec_cfg(n_layers=4, d_model=64, seq_len=8, src_len=8)
    blocks = resolve_partition("balanced", cfg, 2, 1)
    assert sum(blocks) == 8 and blocks[0] > blocks[1]
    assert resolve_partition("equal", cfg, 2, 1) == ()
    with pytest.raises(ConfigError, match="--partition 'x'"):
        resolve_partition("x", cfg, 2, 1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pipeline_under_16_bit_precision_is_bitwise_the_one_rank_run(precision):
    """--precision composes with the encoder-decoder pipeline: the pair messages travel in the
    compute dtype and the sums keep their order, so pp 2 (1f1b) and pp 4 (zb-h1) equal one rank
    with the same microbatches exactly (rtol 0; 16-bit rounding differs with the microbatch
    count, so the reference keeps it)."""
    from minipar.compare import mismatches, train_layout
    from minipar.dist.comm import local_comm

    cfg = encdec_cfg(n_layers=2, pos_bias=True, weight_init="fan-in")
    batches = encdec_batches(cfg, 2, 4, 1)
    ref = train_layout(local_comm(), cfg, ParallelConfig(microbatches=2), batches, seed=1,
                       precision=precision)
    for par in (ParallelConfig(pp=2, microbatches=2, schedule="1f1b"),
                ParallelConfig(pp=4, microbatches=2, schedule="zb-h1")):
        got = run_threads(lambda w, p=par: train_layout(w, cfg, p, batches, seed=1,
                                                         precision=precision), par.world)
        assert mismatches(got[0], ref, 0.0) == [], (precision, par)
