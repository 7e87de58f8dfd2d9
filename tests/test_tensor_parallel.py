"""Tensor and sequence parallelism equal the serial run, move exactly the bytes the theory says,
and keep exactly the activations the formula says (Megatron-LM 2019; Korthikanti et al. 2022).

Every multi-rank case runs on an in-process ``run_threads`` world; ``tests/mpi/`` repeats the
model property under real mpirun.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ConfigError, ModelConfig, ParallelConfig
from minipar.dist.comm import local_comm, run_threads
from minipar.dist.stats import wire_bytes
from minipar.nn import functional
from minipar.models.blocks import Block
from minipar.nn.module import BuildContext, Module, Sharding
from minipar.parallel.deferral import DeferredWeightGrads
from minipar.parallel.tensor import (ColumnParallelLinear, RowParallelLinear,
                                     VocabParallelCrossEntropy, VocabParallelHead,
                                     padded_vocab, vocab_parallel_argmax)
from minipar.sim.activations import activation_breakdown, measure_block_activations
from minipar.sim.comm_volume import partial_elements, predict_comm_bytes
from minipar.sim.costmodel import activation_bytes_per_layer, block_activation_terms
import on_device as dev

F = dev.OnBackend(functional)  # host arrays in and out, on whichever backend the suite runs

RTOL = 1e-9
E = 8  # float64
MINIPAR = {"value_bytes": E, "dropout": False, "layernorm_rstd": True}  # what a Block keeps


def tp_traffic(cfg: ModelConfig, par: ParallelConfig, batch: int, stage: int = 0,
               dp_rank: int = 0) -> dict:
    """The cost model's tp-group traffic of one step for a rank (global batch ``batch``)."""
    return predict_comm_bytes(cfg, par, batch, E, stage, dp_rank).get("tp", {})


def calls_and_bytes(stats: dict) -> dict:
    return {op: {"calls": d["calls"], "bytes": d["bytes"]} for op, d in stats.items()}


# ------------------------------------------------------------------ the model: parallel == serial
@settings(max_examples=40, deadline=None)
@given(tp=st.sampled_from([1, 2, 4]), dp=st.sampled_from([1, 2, 4]), sp=st.booleans(),
       tie=st.booleans(), vocab=st.sampled_from([5, 7, 11, 13, 16]),
       pos=st.sampled_from(["learned", "sinusoidal"]), d_model=st.sampled_from([8, 16]),
       seq=st.sampled_from([4, 8]), mbs=st.sampled_from([1, 2]), rows=st.sampled_from([1, 2]),
       seed=st.integers(0, 10_000))
def test_tensor_parallel_training_equals_serial(tp, dp, sp, tie, vocab, pos, d_model, seq, mbs,
                                                rows, seed):
    """Losses of every step, full gradients and parameters after 2 AdamW steps equal the serial
    run, and every rank's tp traffic each step is exactly the cost model's (``tp_traffic``)."""
    if dp * tp > 8:
        dp = 8 // tp
    cfg = ModelConfig(vocab_size=vocab, seq_len=seq, n_layers=2, d_model=d_model, n_heads=4,
                      tie_weights=tie, pos=pos)
    par = ParallelConfig(dp=dp, tp=tp, sequence_parallel=sp, microbatches=mbs)
    batches = random_batches(cfg, steps=2, batch=dp * mbs * rows, seed=seed)
    results = run_threads(lambda w: train_layout(w, cfg, par, batches, seed=seed), par.world)
    assert mismatches(results[0], serial_reference(cfg, batches, seed=seed), RTOL) == []
    want = tp_traffic(cfg, par, dp * mbs * rows)
    for r in results:
        for step in r.comm:
            assert calls_and_bytes(step.get("tp", {})) == want


PIPELINED = [ParallelConfig(tp=2, pp=2, microbatches=2, sequence_parallel=True),
             ParallelConfig(tp=2, pp=2, dp=2, microbatches=2),
             ParallelConfig(tp=2, pp=2, microbatches=2, schedule="interleaved",
                            virtual_stages=2, sequence_parallel=True),
             ParallelConfig(tp=2, pp=2, microbatches=2, schedule="zb-h1",
                            sequence_parallel=True)]


@pytest.mark.parametrize("par", PIPELINED, ids=lambda p: f"dp{p.dp}pp{p.pp}{p.schedule}"
                         f"v{p.virtual_stages}sp{int(p.sequence_parallel)}")
def test_tp_traffic_of_every_pipeline_stage_is_the_formula(par):
    """With pipeline stages each rank holds part of the model: its tp traffic is the formula for
    its own stage (embedding on the first, head and loss on the last), and it still trains as
    the serial run does."""
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=4, d_model=8, n_heads=2)
    rows = 2
    batches = random_batches(cfg, steps=1, batch=par.dp * par.microbatches * rows, seed=3)

    def rank(world):
        from minipar.dist.mesh import Mesh
        stage = Mesh(world, dp=par.dp, pp=par.pp, tp=par.tp).pp_rank
        return stage, train_layout(world, cfg, par, batches, seed=3)

    out = run_threads(rank, par.world)
    assert mismatches(out[0][1], serial_reference(cfg, batches, seed=3), RTOL) == []
    for stage, r in out:
        want = tp_traffic(cfg, par, par.dp * par.microbatches * rows, stage)
        assert calls_and_bytes(r.comm[0]["tp"]) == want


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_under_zero_each_dp_rank_sums_its_shard_of_the_partial_gradients(zero):
    """ZeRO keeps a dp shard of the flat gradient, and sums over tp only the tp-partial entries
    of that shard: the activation traffic is unchanged, each rank's is the prediction for its dp
    rank, and the dp ranks' partial-gradient allreduces together cover every partial entry
    exactly once."""
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    par = ParallelConfig(dp=2, tp=2, zero=zero, sequence_parallel=True)
    batches = random_batches(cfg, steps=1, batch=4, seed=5)
    results = run_threads(lambda w: train_layout(w, cfg, par, batches, seed=5), par.world)
    assert mismatches(results[0], serial_reference(cfg, batches, seed=5), RTOL) == []
    loss_bytes = 3 * 2 * cfg.seq_len * E  # the cross-entropy's three (b, s) allreduces
    shard_elements = []
    for rank, r in enumerate(results):
        got = calls_and_bytes(r.comm[0]["tp"])
        shard_elements.append((got["allreduce"]["bytes"] - loss_bytes) // E)
        assert got == tp_traffic(cfg, par, 4, dp_rank=rank // par.tp)
    # world rank = dp_rank * tp + tp_rank: ranks 0 and 2 are the two dp shards of tp rank 0
    every = partial_elements(cfg, ParallelConfig(dp=2, tp=2, sequence_parallel=True), 0)
    assert shard_elements[0] + shard_elements[2] == every
    assert shard_elements[1] + shard_elements[3] == every


# ------------------------------------------------------------------------------ one block
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_a_block_costs_two_allreduces_each_way_or_the_same_volume_under_sp(tp, sp):
    """Megatron: exactly 2 allreduces of b x s x h forward and 2 backward per block. Sequence
    parallel: an allgather and a reduce-scatter of b x s x h in place of each, the same wire
    bytes forward; backward adds one allgather per column-parallel matrix (the cached shard)."""
    cfg = ModelConfig(vocab_size=7, seq_len=8, n_layers=2, d_model=16, n_heads=4)
    b = 3
    full = np.random.default_rng(0).normal(size=(b, cfg.seq_len, cfg.d_model))
    act = b * cfg.seq_len * cfg.d_model * E

    def rank(comm):
        block = Block(BuildContext(0, "float64", comm, sp), "blocks.0", cfg)
        t = cfg.seq_len // tp if sp else cfg.seq_len
        lo = comm.rank * t if sp else 0
        block.forward(dev.up(full[:, lo:lo + t].copy()))
        fwd = calls_and_bytes(comm.stats.as_dict())
        fwd_wire = comm.stats.total().wire_bytes
        comm.stats.reset()
        block.backward(dev.up(np.ones((b, t, cfg.d_model))))
        return fwd, fwd_wire, calls_and_bytes(comm.stats.as_dict())

    for fwd, fwd_wire, bwd in run_threads(rank, tp):
        if sp:
            assert fwd == {"allgather": {"calls": 2, "bytes": 2 * act},
                           "reduce_scatter": {"calls": 2, "bytes": 2 * act}}
            assert bwd == {"allgather": {"calls": 4, "bytes": 4 * act},
                           "reduce_scatter": {"calls": 2, "bytes": 2 * act}}
        else:
            assert fwd == {"allreduce": {"calls": 2, "bytes": 2 * act}}
            assert bwd == {"allreduce": {"calls": 2, "bytes": 2 * act}}
        assert fwd_wire == 2 * wire_bytes("allreduce", act, tp)


# ------------------------------------------------------------- column then row, by hand
@settings(max_examples=15, deadline=None)
@given(tp=st.sampled_from([1, 2, 4]), sp=st.booleans(), b=st.integers(1, 3),
       t_per=st.integers(1, 3), c=st.integers(1, 6), f_per=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_column_then_row_equals_one_serial_linear_pair(tp, sp, b, t_per, c, f_per, seed):
    """y = (x W1 + b1) W2 + b2, dx and every full weight gradient, as the serial pair."""
    t, f = t_per * tp, f_per * tp
    rng = np.random.default_rng(seed)
    x, dy = rng.normal(size=(b, t, c)), rng.normal(size=(b, t, c))
    bias = rng.normal(size=c)

    def pair(comm, use_sp):
        ctx = BuildContext(seed, "float64", comm, use_sp)
        col = ColumnParallelLinear(ctx, "fc", c, f, 0.5)
        row = RowParallelLinear(ctx, "proj", f, c, 0.5)
        row.b.data += dev.up(bias)  # nonzero: the row-parallel bias is added once, not tp times
        tl = t // comm.size if use_sp else t
        lo = comm.rank * tl if use_sp else 0
        y = row.forward(col.forward(dev.up(x[:, lo:lo + tl].copy())))
        dx = col.backward(row.backward(dev.up(dy[:, lo:lo + tl].copy())))
        return dev.down((y, dx, [(p, p.grad) for p in col.params() + row.params()]))

    y_ref, dx_ref, grads_ref = pair(local_comm("tp"), False)
    out = run_threads(lambda comm: pair(comm, sp), tp)
    tl = t // tp if sp else t
    for r, (y, dx, _) in enumerate(out):
        lo = r * tl if sp else 0
        np.testing.assert_allclose(y, y_ref[:, lo:lo + tl], rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(dx, dx_ref[:, lo:lo + tl], rtol=RTOL, atol=1e-12)
    for i, (p_ref, g_ref) in enumerate(grads_ref):
        pieces = [o[2][i][1] for o in out]
        p = out[0][2][i][0]
        if p.sharding is not None:
            g = p.sharding.full(pieces, p.full_shape)
        else:  # replicated: whole on every rank, or a partial sum over tp under SP
            g = sum(pieces) if p.tp_partial_grad else pieces[0]
        np.testing.assert_allclose(g, g_ref, rtol=RTOL, atol=1e-12, err_msg=p.name)


class _Pair(Module):
    """Column-parallel, row-parallel, then the vocab-parallel head: the three linears."""

    def __init__(self, ctx, c, f, v):
        super().__init__()
        self.col = ColumnParallelLinear(ctx, "fc", c, f, 0.5)
        self.row = RowParallelLinear(ctx, "proj", f, c, 0.5)
        self.head = VocabParallelHead(ctx, "head", c, v, 0.5)

    def forward(self, x, mb=0):
        return self.head.forward(self.row.forward(self.col.forward(x, mb), mb), mb)

    def backward(self, dy, mb=0):
        return self.col.backward(self.row.backward(self.head.backward(dy, mb), mb), mb)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("sp", [False, True])
def test_deferred_weight_grads_equal_the_immediate_ones_and_move_no_bytes(tp, sp):
    """Zero-bubble's split (``parallel.deferral``): the B pass leaves every weight gradient
    unset, the W pass fills it with exactly the immediate backward's values and, since the
    SP allgather of the input already ran in B, moves no bytes; the layers are left as built."""
    b, t, c, f, v = 2, 4, 3, 4, 6
    rng = np.random.default_rng(0)
    x, dlogits = rng.normal(size=(b, t, c)), rng.normal(size=(b, t, v))

    def rank(comm, defer):
        pair = _Pair(BuildContext(0, "float64", comm, sp), c, f, v)
        tl = t // comm.size if sp else t
        lo = comm.rank * tl if sp else 0
        pair.forward(x[:, lo:lo + tl].copy())
        cols = v // comm.size
        dy = dlogits[..., comm.rank * cols:(comm.rank + 1) * cols]  # (b, t, v/tp)
        if not defer:
            return pair.backward(dy.copy()), [p.grad for p in pair.params()]
        deferred = DeferredWeightGrads()
        with deferred.collect(pair, 0):
            dx = pair.backward(dy.copy())
        assert all(p.grad is None for p in (pair.col.w, pair.col.b, pair.row.w, pair.head.w))
        assert len(deferred._pending[0]) == 3
        assert not any("weight_grads" in vars(m) for m in (pair.col, pair.row, pair.head))
        comm.stats.reset()
        deferred.run(0)
        assert comm.stats.as_dict() == {} and deferred._pending == {}
        return dx, [p.grad for p in pair.params()]

    now = run_threads(lambda comm: rank(comm, False), tp)
    later = run_threads(lambda comm: rank(comm, True), tp)
    for (dx0, g0), (dx1, g1) in zip(now, later):
        np.testing.assert_array_equal(dx1, dx0)
        for a, g in zip(g1, g0):
            np.testing.assert_array_equal(a, g)


# -------------------------------------------------------------- vocab-parallel loss, argmax
def _vocab_slices(full, tp, junk):
    """Each rank's (B, T, V/tp) slice of the padded logits, padding filled with ``junk``."""
    v = full.shape[-1]
    vp = padded_vocab(v, tp)
    out = []
    for r in range(tp):
        local = Sharding(axis=2, parts=tp, index=r, padded=vp).local(full)
        start = r * (vp // tp)
        local[..., max(v - start, 0):] = junk  # columns at or past the real vocabulary
        out.append(local)
    return out


@settings(max_examples=20, deadline=None)
@given(tp=st.integers(1, 4), vocab=st.integers(2, 13), b=st.integers(1, 3), t=st.integers(1, 4),
       ignore=st.floats(0.0, 1.0), norm=st.sampled_from([None, 7.0]),
       dloss=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 1000))
def test_vocab_parallel_cross_entropy_equals_serial(tp, vocab, b, t, ignore, norm, dloss, seed):
    """Loss and dlogits equal ``functional.cross_entropy_fwd/bwd``, with ignored targets, a
    vocabulary tp does not divide, and large junk in the padding (never seen by the loss)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, vocab)) * 3
    targets = rng.integers(0, vocab, (b, t))
    targets[rng.random((b, t)) < ignore] = -100
    loss_ref, cache = F.cross_entropy_fwd(logits.reshape(-1, vocab), targets.reshape(-1),
                                          normalizer=norm)
    dref = F.cross_entropy_bwd(dloss, cache).reshape(b, t, vocab)
    slices = _vocab_slices(logits, tp, junk=100.0)

    def rank(comm):
        ce = VocabParallelCrossEntropy(BuildContext(0, "float64", comm), vocab)
        loss = ce.forward(dev.up(slices[comm.rank].copy()), dev.up(targets), norm)
        return float(loss), dev.down(ce.backward(dloss))

    out = run_threads(rank, tp)
    for loss, _ in out:
        assert loss == pytest.approx(float(loss_ref), rel=RTOL, abs=1e-15)
    dfull = np.concatenate([d for _, d in out], axis=-1)
    np.testing.assert_allclose(dfull[..., :vocab], dref, rtol=RTOL, atol=1e-15)
    assert not dfull[..., vocab:].any()  # padding gets no gradient


@settings(max_examples=20, deadline=None)
@given(tp=st.integers(1, 4), vocab=st.integers(1, 13), b=st.integers(1, 3), t=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_vocab_parallel_argmax_equals_argmax_ties_included(tp, vocab, b, t, seed):
    """Small integer logits make ties common: the first maximum wins, as in a serial argmax;
    padding holds the largest value of all and is never chosen."""
    logits = np.random.default_rng(seed).integers(0, 3, (b, t, vocab)).astype("float64")
    slices = _vocab_slices(logits, tp, junk=9.0)
    out = run_threads(lambda comm: dev.down(vocab_parallel_argmax(dev.up(slices[comm.rank]),
                                                                  comm, vocab)), tp)
    for preds in out:
        np.testing.assert_array_equal(preds, logits.argmax(axis=-1))


# ------------------------------------------------------------------------ activation memory
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_block_activation_bytes_are_the_formula_tensor_by_tensor(tp, sp):
    cfg = ModelConfig(vocab_size=7, seq_len=8, n_layers=2, d_model=16, n_heads=4)
    want = block_activation_terms(cfg, 3, tp, sp, **MINIPAR)
    for got in measure_block_activations(cfg, tp, sp, rows=3):
        assert got == want


@settings(max_examples=10, deadline=None)
@given(tp=st.sampled_from([1, 2, 4]), heads_per=st.integers(1, 2), d_head=st.integers(1, 4),
       seq_per=st.integers(1, 3), rows=st.integers(1, 3), d_ff_per=st.integers(0, 3))
def test_activation_formula_holds_over_shapes_and_sp_divides_everything(tp, heads_per, d_head,
                                                                         seq_per, rows, d_ff_per):
    """Measured == formula for drawn shapes (any MLP width); with sequence parallelism a rank
    keeps exactly the serial layer's bytes / tp (the paper's 34/t + 5as/(ht)); without it
    the difference is the replicated 4 sbh + 2 sb, stored tp times instead of once."""
    heads = heads_per * tp
    cfg = ModelConfig(vocab_size=7, seq_len=seq_per * tp, n_layers=1, d_model=heads * d_head,
                      n_heads=heads, d_ff=d_ff_per * tp)
    s, h = cfg.seq_len, cfg.d_model
    serial = activation_bytes_per_layer(cfg, rows, 1, False, **MINIPAR)
    with_sp = activation_bytes_per_layer(cfg, rows, tp, True, **MINIPAR)
    without = activation_bytes_per_layer(cfg, rows, tp, False, **MINIPAR)
    assert with_sp * tp == serial
    assert (without - with_sp) * tp == (4 * s * rows * h + 2 * s * rows) * E * (tp - 1)
    for sp in (False, True):
        for got in measure_block_activations(cfg, tp, sp, rows):
            assert sum(got.values()) == (with_sp if sp else without)


def test_breakdown_counts_each_buffer_once_and_no_parameters():
    """Views of one buffer count as that buffer once; a weight named in a cache is not counted."""
    from minipar.nn.module import Param

    class Holder(Module):
        def __init__(self):
            super().__init__()
            self.w = Param("w", np.zeros((5, 5)))

    m, child = Holder(), Holder()
    m.child = child
    buf = np.zeros((4, 6))
    m.save(0, (buf[:, :2], buf[:, 2:], m.w.data.T, 3.0))
    child.save(0, (buf.reshape(6, 4), np.ones(3)))
    assert activation_breakdown(m) == {"": buf.nbytes, "child": 3 * 8}


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("model, par, flags", [
    (ModelConfig(n_heads=4, d_model=16), ParallelConfig(tp=3), ["--tp"]),
    (ModelConfig(n_heads=4, d_model=16, d_ff=6), ParallelConfig(tp=4), ["--tp"]),
    (ModelConfig(n_heads=4, d_model=16, seq_len=6), ParallelConfig(tp=4, sequence_parallel=True),
     ["--sequence-parallel", "--tp"]),
    (ModelConfig(n_heads=4, d_model=16), ParallelConfig(tp=0), ["--tp"]),
])
def test_bad_tp_layouts_are_errors_that_name_the_flag(model, par, flags):
    with pytest.raises(ConfigError) as info:
        par.validate(model)
    assert all(flag in str(info.value) for flag in flags), str(info.value)


def test_world_size_mismatch_names_tp():
    with pytest.raises(ConfigError, match="--tp 2"):
        ParallelConfig(dp=2, tp=2).validate(ModelConfig(), world_size=2)


def test_sequence_parallel_with_divisible_length_is_valid():
    ParallelConfig(tp=4, sequence_parallel=True).validate(ModelConfig(seq_len=8, n_heads=4))
