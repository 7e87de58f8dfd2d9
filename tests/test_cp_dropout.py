"""Attention dropout inside the blockwise kernel and the ring of context parallelism.

Each tile of a blockwise kernel or of the ring draws its slice of the serial run's (B, H, T, T)
attention-dropout mask (``dropout.TileMasks``) and backward draws it again. Checked here: a
tile is exactly that slice of the mask the plain kernel uses (``MaskSource.keep``); the
blockwise kernel and the ring with dropout equal the plain kernel with the whole mask, forward
and backward (float64); a whole serial model with ``--attention blockwise`` and dropout equals
the plain one over several key blocks, recomputation none/selective/full; and cp 2 and cp 4
(both cuts, composed with dp, tp + sp, pp, ZeRO) with dropout equal the serial plain run with
dropout, losses, gradients and weights. ``tests/mpi/test_cp_mpi.py`` repeats cp with dropout
under mpirun.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import layout_mismatches, mismatches, random_batches, serial_reference
from minipar.compare import train_layout
from minipar.config import ModelConfig, ParallelConfig, replace
from minipar.dist.comm import local_comm, run_threads
from minipar.nn import blockwise, functional
from minipar.nn.dropout import MaskSource
from minipar.parallel import context
from on_device import OnBackend, down, up
from test_context_parallel import check_ring_equals_plain

F = OnBackend(functional)
BW = OnBackend(blockwise)
P = 0.3


def _masks(seed: int, row0: int = 0, step: int = 4) -> MaskSource:
    src = MaskSource(seed, P)
    src.begin_step(step, [row0])
    return src


# ------------------------------------------------------------------------ a tile is the slice
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), t=st.integers(1, 9), data=st.data(),
       seed=st.integers(0, 1000))
def test_a_tile_is_the_slice_of_the_serial_mask(b, h, t, data, seed):
    """TileMasks(pairs, rows, keys) == the whole (B, H, T, T) mask cut there, for a tp rank's
    heads and a microbatch that starts at a later global row, however many rows it draws at
    once."""
    row0 = data.draw(st.integers(0, 5))
    hl = data.draw(st.sampled_from([d for d in range(1, h + 1) if h % d == 0]))
    h0 = hl * data.draw(st.integers(0, h // hl - 1))
    src = _masks(seed, row0)
    whole = down(src.keep("s", 0, (b, h, t, t)))[:, h0:h0 + hl].reshape(b * hl, t, t)
    tiles = src.tiles("s", 0, hl, h0, h, t)
    tiles.ROW_WORDS = data.draw(st.sampled_from([1, t, 2 * t + 1, 1 << 16]))  # rows at a time
    r0 = data.draw(st.integers(0, b * hl - 1))
    r1 = data.draw(st.integers(r0 + 1, b * hl))
    qa, ka = data.draw(st.integers(0, t - 1)), data.draw(st.integers(0, t - 1))
    tq, tk = data.draw(st.integers(1, t - qa)), data.draw(st.integers(1, t - ka))
    got = down(tiles(slice(r0, r1), qa, tq, ka, tk))
    np.testing.assert_array_equal(got, whole[r0:r1, qa:qa + tq, ka:ka + tk])
    assert src.tiles("s", "_eval", hl, h0, h, t) is None  # evaluation draws nothing


# ------------------------------------------------------------------- the kernels with dropout
@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 11), d=st.integers(1, 3),
       block=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_blockwise_with_dropout_equals_plain_with_the_whole_mask(b, h, t, d, block, seed):
    rng = np.random.default_rng(seed)
    q, k, v, dy = (rng.normal(size=(b, h, t, d)) for _ in range(4))
    src = _masks(seed)
    keep = down(src.keep("a", 0, (b, h, t, t)))  # (B, H, T, T)
    y, cache = BW.attention_fwd(q, k, v, block, src.tiles("a", 0, h, 0, h, t))
    y_plain, cache_plain = F.attention_fwd(q, k, v, keep, P)
    no_drop, _ = F.attention_fwd(q, k, v)
    assert t == 1 or keep.all() or not np.allclose(y_plain, no_drop)  # the mask does something
    np.testing.assert_allclose(y, y_plain, rtol=1e-12, atol=1e-13)
    for got, want in zip(BW.attention_bwd(dy, y, cache), F.attention_bwd(dy, cache_plain)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(cp=st.sampled_from([2, 3, 4]), split=st.sampled_from(["zigzag", "contiguous"]),
       chunk=st.integers(1, 3), n=st.integers(1, 3), d=st.sampled_from([2, 4]),
       seed=st.integers(0, 10_000))
def test_ring_with_dropout_equals_plain_with_the_whole_mask(cp, split, chunk, n, d, seed):
    check_ring_equals_plain(cp, split, chunk, n, d, seed, _masks(seed))


# ------------------------------------------------------------ the serial model, blockwise
LONG = ModelConfig(vocab_size=7, seq_len=136, n_layers=2, d_model=8, n_heads=2, dropout=P)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_blockwise_model_with_dropout_equals_plain(recompute):
    """136 tokens: key blocks of 64, 64 and 8 (``blockwise.BLOCK``), each with its own tiles."""
    assert LONG.seq_len > 2 * blockwise.BLOCK
    batches = random_batches(LONG, 2, 2, seed=2)
    ref = serial_reference(LONG, batches, seed=2)
    par = ParallelConfig(attention="blockwise", recompute=recompute)
    got = train_layout(local_comm(), LONG, par, batches, seed=2)
    bad = mismatches(got, ref, rtol=1e-9)
    assert not bad, bad[:4]
    plain_off = serial_reference(replace(LONG, dropout=0.0), batches, seed=2)
    assert mismatches(ref, plain_off, rtol=1e-6)  # dropout did change the run


# ------------------------------------------------------------------ cp layouts with dropout
CFG = ModelConfig(vocab_size=11, seq_len=16, n_layers=2, d_model=16, n_heads=4, dropout=P)
# Three heads over tp 3: a tp rank's T/(cp tp) sequence-parallel tokens straddle the two
# zig-zag chunks of its cp rank, so its residual-dropout mask is drawn as two runs.
ODD = ModelConfig(vocab_size=11, seq_len=24, n_layers=1, d_model=12, n_heads=3, dropout=P)

LAYOUTS = [
    (CFG, ParallelConfig(cp=2)),
    (CFG, ParallelConfig(cp=4)),
    (CFG, ParallelConfig(cp=2, cp_split="contiguous")),
    (CFG, ParallelConfig(cp=4, cp_split="contiguous", attention="blockwise")),
    (CFG, ParallelConfig(cp=2, dp=2, zero=1)),
    (CFG, ParallelConfig(cp=2, dp=2, zero=3, microbatches=2)),
    (CFG, ParallelConfig(cp=2, tp=2, sequence_parallel=True)),
    (CFG, ParallelConfig(cp=2, tp=2)),
    (CFG, ParallelConfig(cp=2, pp=2, microbatches=2)),
    (CFG, ParallelConfig(cp=2, recompute="selective")),
    (CFG, ParallelConfig(cp=4, recompute="full", cp_split="contiguous")),
    (CFG, ParallelConfig(cp=2, dp=2, tp=2, sequence_parallel=True, recompute="full")),
    (ODD, ParallelConfig(cp=2, tp=3, sequence_parallel=True)),
]


def _name(x) -> str:
    if isinstance(x, ModelConfig):
        return f"h{x.n_heads}"
    sp = "sp" if x.sequence_parallel else ""
    return f"dp{x.dp}cp{x.cp}tp{x.tp}pp{x.pp}{sp}z{x.zero}-{x.cp_split}-{x.recompute}-{x.attention}"


@pytest.mark.parametrize("cfg, par", LAYOUTS, ids=_name)
def test_cp_with_dropout_equals_serial(cfg, par):
    bad = layout_mismatches(cfg, par, rows=2, seed=3)
    assert not bad, (par, bad)


@settings(max_examples=8, deadline=None)
@given(cp=st.sampled_from([2, 4]), dp=st.sampled_from([1, 2]), tp=st.sampled_from([1, 2]),
       sp=st.booleans(), split=st.sampled_from(["zigzag", "contiguous"]),
       recompute=st.sampled_from(["none", "selective", "full"]),
       attention=st.sampled_from(["plain", "blockwise"]), seed=st.integers(0, 1000))
def test_drawn_cp_layouts_with_dropout_equal_serial(cp, dp, tp, sp, split, recompute, attention,
                                                    seed):
    if cp * dp * tp > 8:
        dp = 1
    par = ParallelConfig(cp=cp, dp=dp, tp=tp, sequence_parallel=sp and tp > 1, cp_split=split,
                         recompute=recompute, attention=attention)
    assert not layout_mismatches(CFG, par, rows=1, seed=seed, steps=1)


# ------------------------------------------------ what a block keeps, and recomputation
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("cp, tp, sp", [(1, 1, False), (1, 2, True), (2, 1, False),
                                        (2, 2, True), (4, 1, False)])
def test_blockwise_and_ring_keep_no_attention_mask(cp, tp, sp, recompute):
    """With dropout a blockwise or ring block keeps what it keeps without, plus the two
    residual-stream masks (one byte per element of its tokens), and no (T, T) attention mask:
    the measured bytes equal ``block_activation_terms(dropout=True, attention="blockwise")``."""
    from minipar import backend
    from minipar.dist.mesh import Mesh
    from minipar.models.blocks import Block
    from minipar.nn.memory import activation_breakdown
    from minipar.nn.module import BuildContext
    from minipar.sim import costmodel as cm

    cfg, b = replace(CFG, seq_len=32), 3
    full = np.random.default_rng(0).normal(size=(b, cfg.seq_len, cfg.d_model))

    def rank(world):
        mesh = Mesh(world, tp=tp, cp=cp)
        ctx = BuildContext(0, "float64", mesh.tp, sp, _masks(0), attention="blockwise",
                           recompute=recompute, cp=mesh.cp)
        block = Block(ctx, "blocks.0", cfg)
        mine = full[:, context.token_indices(cfg.seq_len, cp, mesh.cp_rank)]  # (B, T/cp, C)
        t = mine.shape[1] // tp if sp else mine.shape[1]
        lo = mesh.tp_rank * t if sp else 0
        block.forward(backend.from_host(np.ascontiguousarray(mine[:, lo:lo + t])), mb=0)
        return sum(activation_breakdown(block).values())

    want = cm.activation_bytes_per_layer(cfg, b, tp, sp, recompute, value_bytes=8, dropout=True,
                                         layernorm_rstd=True, attention="blockwise", cp=cp)
    without = cm.activation_bytes_per_layer(cfg, b, tp, sp, recompute, value_bytes=8,
                                            dropout=False, layernorm_rstd=True,
                                            attention="blockwise", cp=cp)
    assert run_threads(rank, tp * cp) == [want] * (tp * cp)
    tokens = cfg.seq_len // cp // (tp if sp else 1)
    assert want - without == (0 if recompute == "full" else 2 * b * tokens * cfg.d_model)


def _same_bits(a, b) -> bool:
    return a.losses == b.losses and all(np.array_equal(a.params[k], b.params[k])
                                        and np.array_equal(a.grads[k], b.grads[k])
                                        for k in a.params)


@pytest.mark.parametrize("par", [ParallelConfig(attention="blockwise"), ParallelConfig(cp=2),
                                 ParallelConfig(cp=2, tp=2, sequence_parallel=True)],
                         ids=["blockwise", "cp2", "cp2tp2sp"])
def test_recomputation_with_blockwise_dropout_changes_no_number(par):
    """Selective and full recomputation rerun the kernel, which redraws each tile's mask: the
    same bits as keeping everything (a wrongly addressed redraw would change them)."""
    cfg = replace(LONG, seq_len=72) if par.cp == 1 else CFG  # two key blocks when serial
    batches = random_batches(cfg, 2, 2, seed=1)

    def train(p):
        if p.world == 1:
            return train_layout(local_comm(), cfg, p, batches, seed=3)
        return run_threads(lambda w: train_layout(w, cfg, p, batches, seed=3), p.world)[0]

    runs = {rc: train(replace(par, recompute=rc)) for rc in ("none", "selective", "full")}
    assert _same_bits(runs["selective"], runs["none"])
    assert _same_bits(runs["full"], runs["none"])


def test_the_command_trains_with_dropout_under_cp(tmp_path):
    """``--cp 2 --dropout`` is no longer refused, and its losses are the serial run's."""
    import json

    from inproc import train

    common = ["--quiet", "--dtype", "float64", "--steps", "3", "--dropout", "0.2",
              "--eval-every", "100", "--batch-size", "4"]
    runs = {}
    for name, extra, n in (("cp", ["--cp", "2", "--attention", "blockwise"], 2),
                           ("serial", [], 1)):
        codes, _, err = train([*common, *extra, "--summary", str(tmp_path / name)], n=n)
        assert set(codes) == {0}, err
        runs[name] = json.loads((tmp_path / name).read_text())["losses"]
    np.testing.assert_allclose(runs["cp"], runs["serial"], rtol=1e-9)
