"""Blockwise causal attention: the flash-attention idea in NumPy, never forming the (T, T) matrix.

The plain kernel (``functional.attention_fwd``) computes, for each (batch, head),

    s = q k^T / sqrt(D) + causal     (T, T)
    p = softmax(s)                   (T, T)   kept for backward: O(T^2) memory per head
    y = p v                          (T, D)

This file computes the same y one key/value block at a time (Dao et al. 2022, FlashAttention),
with the online softmax of Milakov & Gimelshein 2018: a query row keeps a running maximum m, a
running normaliser l = sum exp(s - m) and an unnormalised output acc = sum exp(s - m) v. A new
block of scores s_j changes them to

    m' = max(m, rowmax(s_j));   l' = exp(m - m') l + rowsum(exp(s_j - m'))
    acc' = exp(m - m') acc + exp(s_j - m') v_j

and after the last block y = acc / l and the log-sum-exp lse = m + log(l). Backward keeps only
q, k, v, y and lse (O(T) per head beyond the inputs) and rebuilds each block's probabilities
exactly, p_j = exp(s_j - lse), with delta = rowsum(dy * y) standing in for softmax's row sum:

    dv_j += p_j^T dy;   dp_j = dy v_j^T;   ds_j = p_j (dp_j - delta) / sqrt(D)
    dq += ds_j k_j;     dk_j += ds_j^T q

Causality by blocks: a key block entirely after a query block is skipped (no FLOPs), a key block
entirely before it needs no mask, and only tiles on the diagonal are masked. Here each key block
meets all the queries at or after its first key in one product (fewer, larger GEMMs than square
tiles), so the kernel does about half the products of the plain one, which multiplies the full
(T, T) and masks afterwards.

``forward_step`` and ``backward_step`` are that per-block update and its gradient, on blocks
given with their positions in the sequence: a ring of ranks (context parallelism) can call them
with key/value blocks arriving from other ranks; ``attention_fwd``/``attention_bwd`` are the
loop over one sequence's blocks. Shapes: n = (batch, head) pairs, Tq/Tk the block lengths.

Dropout of the attention probabilities (as ``functional.attention_fwd``: y = (keep * a / (1 - P))
v, with a the softmax and P the drop probability, as in ``dropout.py``) goes inside the block
update: the normaliser l sums the *undropped* exp(s - m), acc sums the dropped ones times v, so
y = acc / l is exactly the plain kernel's output. Each tile's keep mask is the serial run's
slice, addressed by the tile's global query rows and keys (``dropout.TileMasks``), and backward
asks for it again instead of storing it:

    dv_j += (keep_j a_j / (1 - P))^T dy;   da_j = keep_j (dy v_j^T) / (1 - P)

and delta = rowsum(dy * y) still stands in for rowsum(a * da), because
rowsum_k(a_ik da_ik) = sum_k (keep_ik a_ik / (1 - P)) (dy_i . v_k) = dy_i . y_i.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from minipar import backend
from minipar.nn import flops, threads
from minipar.nn.functional import dropout_bwd, dropout_fwd, merge_heads, split_heads

BLOCK = 64  # key tokens per block: (n, T, 64) scores per product instead of (n, T, T)


class State(NamedTuple):
    """Running softmax statistics of a query block: m, l (n, Tq, 1) and acc (n, Tq, D)."""

    m: object
    l: object  # noqa: E741 - the paper's name for the normaliser
    acc: object


def init_state(q) -> State:
    """Before any key: m = -inf, l = 0, acc = 0 for the queries q (n, Tq, D)."""
    xp = backend.xp()
    n, tq, d = q.shape
    return State(xp.full((n, tq, 1), -xp.inf, dtype=q.dtype), xp.zeros((n, tq, 1), dtype=q.dtype),
                 xp.zeros((n, tq, d), dtype=q.dtype))


def relation(q_start: int, tq: int, k_start: int, tk: int) -> str:
    """How a key block relates to a query block under the causal mask (key pos <= query pos):
    "skip" (every key after every query), "full" (every key at or before every query), or
    "diagonal" (some pairs masked)."""
    if k_start > q_start + tq - 1:
        return "skip"
    if k_start + tk - 1 <= q_start:
        return "full"
    return "diagonal"


def _scores(q, k, scale, q_start: int, k_start: int):
    """s = q k^T * scale (n, Tq, Tk), with -inf where a key comes after its query."""
    xp = backend.xp()
    s = q @ k.swapaxes(-1, -2)  # (n, Tq, Tk)
    s *= scale
    tq, tk = q.shape[1], k.shape[1]
    if relation(q_start, tq, k_start, tk) == "diagonal":
        rows = min(tq, k_start + tk - 1 - q_start)  # queries before the block's last key
        qpos = xp.arange(q_start, q_start + rows)[:, None]  # (r, 1)
        kpos = xp.arange(k_start, k_start + tk)[None, :]  # (1, Tk)
        s[:, :rows] += xp.where(kpos > qpos, -xp.inf, 0.0).astype(s.dtype)  # (r, Tk) mask
    return s


def forward_step(q, k, v, state: State, scale: float, q_start: int = 0,
                 k_start: int = 0, keep=None, p_drop: float = 0.0) -> None:
    """Fold one key/value block into the queries' running softmax, in place.

    q (n, Tq, D) at sequence positions q_start.., k, v (n, Tk, D) at k_start..; ``state`` from
    ``init_state`` or earlier steps. Blocks may come in any order (a ring delivers them
    rotated): the update is the same rescaling whichever block set the maximum. ``keep``
    (n, Tq, Tk) drops out this tile's probabilities where they weight v, not in l."""
    xp = backend.xp()
    if relation(q_start, q.shape[1], k_start, k.shape[1]) == "skip":
        return
    s = _scores(q, k, scale, q_start, k_start)  # (n, Tq, Tk)
    m_new = xp.maximum(state.m, s.max(axis=-1, keepdims=True))  # (n, Tq, 1)
    # A row that has seen only masked keys keeps m = -inf; shift it by 0 so exp gives 0, not nan.
    shift = xp.where(m_new == -xp.inf, 0.0, m_new)  # (n, Tq, 1)
    alpha = xp.exp(state.m - shift)  # (n, Tq, 1): rescales what earlier blocks summed
    s -= shift
    p = xp.exp(s, out=s)  # (n, Tq, Tk): exp(s - m'), the block's unnormalised probabilities
    m, l, acc = state  # updated in place: the caller's state arrays change
    l *= alpha
    l += p.sum(axis=-1, keepdims=True)
    acc *= alpha
    acc += (p if keep is None else dropout_fwd(p, keep, p_drop)) @ v  # (n, Tq, D)
    m[...] = m_new


def finish(state: State):
    """(y (n, Tq, D), lse (n, Tq, 1)) from the final statistics: y = acc / l, lse = m + log l."""
    xp = backend.xp()
    return state.acc / state.l, state.m + xp.log(state.l)


def backward_step(q, k, v, dy, lse, delta, scale: float, grads, q_start: int = 0,
                  k_start: int = 0, keep=None, p_drop: float = 0.0) -> None:
    """Add one (query block, key block) pair's gradients into grads = (dq, dk, dv), in place.

    q, dy (n, Tq, D), lse and delta = rowsum(dy * y) (n, Tq, 1) for the queries; k, v and the
    dk, dv accumulators (n, Tk, D) for the key block (a ring passes dk, dv on with it);
    ``keep`` (n, Tq, Tk) is the tile's dropout mask, the forward's again."""
    xp = backend.xp()
    dq, dk, dv = grads
    if relation(q_start, q.shape[1], k_start, k.shape[1]) == "skip":
        return
    s = _scores(q, k, scale, q_start, k_start)  # (n, Tq, Tk)
    s -= lse
    p = xp.exp(s, out=s)  # (n, Tq, Tk): the softmax probabilities of this block, exactly
    pd = p if keep is None else dropout_fwd(p, keep, p_drop)  # (n, Tq, Tk): what weighted v
    dv += pd.swapaxes(-1, -2) @ dy  # (n, Tk, D)
    ds = dy @ v.swapaxes(-1, -2)  # dp (n, Tq, Tk)
    if keep is not None:
        ds = dropout_bwd(ds, keep, p_drop)  # (n, Tq, Tk) through the same mask
    ds -= delta
    ds *= p
    ds *= scale  # softmax's backward, with delta in place of rowsum(dp * p)
    dq += ds @ k  # (n, Tq, D)
    dk += ds.swapaxes(-1, -2) @ q  # (n, Tk, D)


# ---------------------------------------------------------------------------------------------
# One sequence: each key/value block folded into the queries at or after it.


def key_blocks(t: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """(k_start, k_stop) of each key block. Key block [a, b) meets the queries [a, T): the
    queries before a would see only masked keys, so those (query, key) tiles above the causal
    diagonal are never computed, and the rest is one product per block (not one per tile)."""
    return [(a, min(a + block, t)) for a in range(0, t, block)]


def pair_flops(t: int, d: int, block: int = BLOCK) -> int:
    """Forward FLOPs per (batch, head): q k^T and p v, 2 Tq Tk D each, over the tiles run."""
    return sum(4 * (t - a) * (b - a) * d for a, b in key_blocks(t, block))


def _tile(drop, r, q_start: int, tq: int, k_start: int, tk: int):
    """(keep, P) of one tile for pairs r, or (None, 0) without dropout."""
    return (None, 0.0) if drop is None else (drop(r, q_start, tq, k_start, tk), drop.p)


# Score tiles per slice of (batch, head) pairs on the worker threads: enough pairs a slice that
# the per-block NumPy calls are few, few enough that a slice's running state stays in cache.
# Measured (2 cores, forward / backward ms): T 1024, D 16, 16 pairs: 41 / 27 at 2^16 (one pair
# a slice), 19 / 19 at 2^18; T 256, D 64, 48 pairs: 8.1 / 11.5 at 2^16, 7.5 / 11.4 at 2^18,
# 9.2 / 16.3 at 2^19.
TILE_SLICE = 1 << 18


def attention_fwd(q, k, v, block: int = BLOCK, drop=None):
    """q, k, v (B, H, T, D) -> y (B, H, T, D), the same as ``functional.attention_fwd``.

    Plain form: softmax(q k^T / sqrt(D) + causal) v; here one key/value block at a time
    (``forward_step``), a few (batch, head) pairs at a time on the worker threads. The cache
    keeps q, k, v and the log-sum-exp lse (B*H, T, 1); backward also needs y, which its
    caller passes back. ``drop`` (``dropout.TileMasks``, or None) gives each tile's dropout
    mask; the cache keeps it, an address, not a mask."""
    xp = backend.xp()
    b, h, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    q3, k3, v3 = (_pairs(a) for a in (q, k, v))  # (B*H, T, D) each
    y = xp.empty_like(q3)  # (B*H, T, D)
    lse = xp.empty((b * h, t, 1), dtype=q.dtype)  # (B*H, T, 1)

    def rows(r):
        state = init_state(q3[r])  # (n, T, 1), (n, T, 1), (n, T, D)
        for ka, kb in key_blocks(t, block):
            later = State(*(a[:, ka:] for a in state))  # views: the queries at or after ka
            forward_step(q3[r, ka:], k3[r, ka:kb], v3[r, ka:kb], later, scale, ka, ka,
                         *_tile(drop, r, ka, t - ka, ka, kb - ka))
        y[r], lse[r] = finish(state)

    flops.add(b * h * pair_flops(t, d, block))
    with threads.one_blas_thread():
        threads.map_rows(rows, b * h, b * h * t * block, threads.cache_rows(t * block, TILE_SLICE))
    return y.reshape(q.shape), (q3, k3, v3, lse, scale, block, drop)


def _pairs(x):
    """(B, H, T, D) -> (B*H, T, D), contiguous (a copy only when x is a strided view)."""
    return backend.xp().ascontiguousarray(x).reshape(-1, *x.shape[-2:])


def attention_bwd(dy, y, cache):
    """dq, dk, dv (B, H, T, D) from dy and the forward's output y (B, H, T, D).

    Plain form as ``functional.attention_bwd``; here delta = rowsum(dy * y) once, then every
    block pair's ``backward_step``."""
    grads = attention_grads(_pairs(dy), (_pairs(dy) * _pairs(y)).sum(-1, keepdims=True), cache)
    return tuple(g.reshape(dy.shape) for g in grads)


def attention_grads(dy3, delta, cache):
    """dq, dk, dv stacked in one (3, B*H, T, D) array, from dy3 (B*H, T, D) and delta."""
    xp = backend.xp()
    q, k, v, lse, scale, block, drop = cache
    n, t, _ = q.shape
    grads = xp.zeros((3, *q.shape), dtype=q.dtype)  # (3, B*H, T, D)

    def rows(r):
        dq, dk, dv = grads[0, r], grads[1, r], grads[2, r]
        for ka, kb in key_blocks(t, block):  # the queries at or after ka, as in the forward
            backward_step(q[r, ka:], k[r, ka:kb], v[r, ka:kb], dy3[r, ka:], lse[r, ka:],
                          delta[r, ka:], scale, (dq[:, ka:], dk[:, ka:kb], dv[:, ka:kb]), ka, ka,
                          *_tile(drop, r, ka, t - ka, ka, kb - ka))

    with threads.one_blas_thread():
        threads.map_rows(rows, n, n * t * block, threads.cache_rows(t * block, TILE_SLICE))
    return grads


# ---------------------------------------------------------------------------------------------
# Fused [Q | K | V] in, merged heads out: the drop-in for ``functional.mha_fwd``/``mha_bwd``.


def mha_fwd(qkv, n_heads: int, block: int = BLOCK, drop=None):
    """(B, T, 3*H*D) laid out [Q | K | V] -> (B, T, H*D), as ``functional.mha_fwd``; ``drop``
    (``dropout.TileMasks``) drops out the attention probabilities."""
    xp = backend.xp()
    b, t, c3 = qkv.shape
    d = c3 // (3 * n_heads)
    qkv5 = xp.ascontiguousarray(
        qkv.reshape(b, t, 3, n_heads, d).transpose(2, 0, 3, 1, 4))  # (3, B, H, T, D)
    y, cache = attention_fwd(qkv5[0], qkv5[1], qkv5[2], block, drop)  # (B, H, T, D)
    return merge_heads(y), (cache, n_heads)


def mha_bwd(dy, y, cache):
    """dy and the forward's output y, both merged (B, T, H*D) -> dqkv (B, T, 3*H*D).

    delta = rowsum(dy * y) per head is read straight from the merged layout, so backward needs
    y only in the form the output projection already keeps as its input."""
    att_cache, n_heads = cache
    b, t, c = dy.shape
    heads = (b, t, n_heads, c // n_heads)
    delta = (dy.reshape(heads) * y.reshape(heads)).sum(-1)  # (B, T, H)
    delta = delta.transpose(0, 2, 1).reshape(b * n_heads, t, 1)  # (B*H, T, 1)
    dy3 = _pairs(split_heads(dy, n_heads))  # (B*H, T, D)
    grads = attention_grads(dy3, delta, att_cache)  # (3, B*H, T, D)
    grads = grads.reshape(3, b, n_heads, t, c // n_heads)  # (3, B, H, T, D)
    return grads.transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * c)  # (B, T, 3C)


__all__ = ["BLOCK", "State", "init_state", "relation", "forward_step", "finish", "backward_step",
           "key_blocks", "pair_flops", "attention_fwd", "attention_bwd", "attention_grads",
           "mha_fwd", "mha_bwd"]
