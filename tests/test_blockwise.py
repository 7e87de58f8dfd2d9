"""Blockwise attention (minipar.nn.blockwise) equals the plain kernel and central differences
(float64, drawn shapes and block sizes); its per-block steps compose in any order, as a ring of
ranks would feed them; causal blocks above the diagonal cost nothing; its cache is O(T)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.nn import blockwise, flops, functional
from on_device import OnBackend, down, up
from test_functional import check

F = OnBackend(functional)
BW = OnBackend(blockwise)
SETTINGS = settings(max_examples=15, deadline=None)
dims = st.integers(1, 4)


def _reference(q, k, v):
    """softmax(q k^T / sqrt(D) + causal) v written out in NumPy, independent of both kernels."""
    t = q.shape[-2]
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    s = np.where(np.triu(np.ones((t, t), dtype=bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@SETTINGS
@given(b=dims, h=dims, t=st.integers(1, 9), d=dims, block=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_blockwise_equals_plain_attention_forward_and_backward(b, h, t, d, block, seed):
    rng = np.random.default_rng(seed)
    q, k, v, dy = (rng.normal(size=(b, h, t, d)) for _ in range(4))
    y, cache = BW.attention_fwd(q, k, v, block)
    y_plain, cache_plain = F.attention_fwd(q, k, v)
    np.testing.assert_allclose(y, _reference(q, k, v), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(y, y_plain, rtol=1e-12, atol=1e-13)
    for got, want in zip(BW.attention_bwd(dy, y, cache), F.attention_bwd(dy, cache_plain)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@SETTINGS
@given(b=dims, h=dims, t=st.integers(1, 6), d=dims, block=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_blockwise_backward_equals_central_differences(b, h, t, d, block, seed):
    rng = np.random.default_rng(seed)
    q, k, v, r = (rng.normal(size=(b, h, t, d)) for _ in range(4))
    loss = lambda: float((BW.attention_fwd(q, k, v, block)[0] * r).sum())  # noqa: E731
    y, cache = BW.attention_fwd(q, k, v, block)
    dq, dk, dv = BW.attention_bwd(r, y, cache)
    check(dq, loss, q)
    check(dk, loss, k)
    check(dv, loss, v)


@SETTINGS
@given(b=dims, t=st.integers(1, 7), heads=st.integers(1, 3), d=dims, block=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_blockwise_mha_equals_plain_mha(b, t, heads, d, block, seed):
    """The fused [Q|K|V] drop-in: same output, same dqkv, with y read in the merged layout."""
    rng = np.random.default_rng(seed)
    qkv, dy = rng.normal(size=(b, t, 3 * heads * d)), rng.normal(size=(b, t, heads * d))
    y, cache = BW.mha_fwd(qkv, heads, block)
    y_plain, cache_plain = F.mha_fwd(qkv, heads)
    np.testing.assert_allclose(y, y_plain, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(BW.mha_bwd(dy, y, cache), F.mha_bwd(dy, cache_plain),
                               rtol=1e-11, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(2, 10), cuts=st.lists(st.integers(1, 9), max_size=4), q_lo=st.integers(0, 9),
       order=st.randoms(use_true_random=False), seed=st.integers(0, 2**16))
def test_steps_compose_in_any_order_like_a_ring(t, cuts, q_lo, order, seed):
    """A query block meets the key/value blocks of arbitrary, unaligned cuts, in a shuffled
    order (as a ring delivers them); a row may see only masked keys in a block (its m stays
    -inf). The result and the summed backward steps equal the plain kernel on that query
    block's rows."""
    rng = np.random.default_rng(seed)
    q, k, v, dy = (rng.normal(size=(2, t, 3)) for _ in range(4))  # n = 2 pairs
    q_lo = min(q_lo, t - 1)
    bounds = sorted({0, t, *[c for c in cuts if c < t]})
    blocks = list(zip(bounds[:-1], bounds[1:]))
    order.shuffle(blocks)
    qb = slice(q_lo, t)
    y_full, cache = F.attention_fwd(q[None], k[None], v[None])
    dq_full, dk_full, dv_full = (g[0] for g in F.attention_bwd(
        np.pad(dy[:, qb], ((0, 0), (q_lo, 0), (0, 0)))[None], cache))  # dy only on the rows

    def run(q, k, v, dy):
        state = blockwise.init_state(q[:, qb])
        for ka, kb in blocks:
            blockwise.forward_step(q[:, qb], k[:, ka:kb], v[:, ka:kb], state, 3 ** -0.5,
                                   q_lo, ka)
        y, lse = blockwise.finish(state)
        delta = (dy[:, qb] * y).sum(-1, keepdims=True)
        dq = q[:, qb] * 0
        dk, dv = k * 0, v * 0
        for ka, kb in blocks:
            blockwise.backward_step(q[:, qb], k[:, ka:kb], v[:, ka:kb], dy[:, qb], lse, delta,
                                    3 ** -0.5, (dq, dk[:, ka:kb], dv[:, ka:kb]), q_lo, ka)
        return y, dq, dk, dv

    y, dq, dk, dv = down(run(*up((q, k, v, dy))))
    np.testing.assert_allclose(y, y_full[0, :, qb], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dq, dq_full[:, qb], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dk, dk_full, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dv, dv_full, rtol=1e-11, atol=1e-12)


def test_blocks_above_the_diagonal_are_skipped_and_flops_halve(monkeypatch):
    """With nb key blocks of B tokens the scores computed cover nb (nb + 1) / 2 tiles of B x B,
    each key block only against the queries at or after its first key (recorded as the kernel
    runs), and the FLOPs counted while it runs are exactly those tiles'."""
    t, d, block = 256, 8, 32
    nb = t // block
    seen = []
    real = blockwise._scores

    def recording(q, k, scale, q_start, k_start):
        seen.append((q_start, q.shape[1], k_start, k.shape[1], q.shape[0]))
        return real(q, k, scale, q_start, k_start)

    monkeypatch.setattr(blockwise, "_scores", recording)
    q = np.zeros((1, 2, t, d))
    with flops.counting() as plain:
        F.attention_fwd(q, q, q)
    with flops.counting() as blocked:
        BW.attention_fwd(q, q, q, block)
    assert all(q0 == k0 and q0 + tq == t and tk == block for q0, tq, k0, tk, _ in seen)
    assert sum(n * tq * tk for _, tq, _, tk, n in seen) == 2 * nb * (nb + 1) // 2 * block ** 2
    assert blockwise.pair_flops(t, d, block) == nb * (nb + 1) // 2 * 4 * block * block * d
    assert plain[0] == 2 * 4 * t * t * d
    assert blocked[0] == 2 * blockwise.pair_flops(t, d, block)
    assert blocked[0] / plain[0] == (nb + 1) / (2 * nb)


def test_cache_is_linear_in_the_sequence_length():
    """What backward keeps is q, k, v and the log-sum-exp: no array grows as T^2."""
    for t in (16, 64):
        q = np.ones((1, 2, t, 4))
        _, (q3, k3, v3, lse, _, _) = blockwise.attention_fwd(*up((q, q, q)))
        assert all(a.size <= 2 * t * 4 for a in (q3, k3, v3, lse))
        assert lse.shape == (2, t, 1)


def test_blockwise_keeps_dtype():
    q = np.ones((1, 1, 5, 2), dtype="float32")
    y, cache = BW.attention_fwd(q, q, q, 2)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in BW.attention_bwd(q, y, cache))


@pytest.mark.parametrize("block", [1, 3, 64])
def test_blockwise_is_causal(block):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 2, 5, 3)) for _ in range(3))
    y1, _ = BW.attention_fwd(q, k, v, block)
    k[:, :, 3:], v[:, :, 3:] = 9.0, -9.0  # changing the future must not change the past
    y2, _ = BW.attention_fwd(q, k, v, block)
    np.testing.assert_allclose(y1[:, :, :3], y2[:, :, :3])
