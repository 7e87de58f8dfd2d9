"""Cross-attention (queries from one stream, keys/values from another, a padding mask): the
hand-written backward against central differences in float64, and the forward against the
plain formula written out here (Vaswani et al. 2017, eq. 1)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.nn import functional
from on_device import OnBackend
from test_functional import check

F = OnBackend(functional)
SETTINGS = settings(max_examples=15, deadline=None)


def plain(q, kv, heads, valid, head_bias=None):
    """softmax(q k^T / sqrt(D) + mask [+ head_bias[h]]) v per batch row and head, with loops."""
    b, tq, c = q.shape
    d = c // heads
    k, v = kv[..., :c], kv[..., c:]
    y = np.zeros_like(q)
    for i in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            s = q[i, :, cols] @ k[i, :, cols].T / np.sqrt(d)  # (Tq, Tk)
            if head_bias is not None:
                s += head_bias[h]
            s[:, ~valid[i]] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            y[i, :, cols] = (p / p.sum(-1, keepdims=True)) @ v[i, :, cols]
    return y


def _inputs(seed, b, tq, tk, heads, d):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, tq, heads * d))
    kv = rng.normal(size=(b, tk, 2 * heads * d))
    valid = rng.random((b, tk)) < 0.7
    valid[:, 0] = True  # a source is never all padding
    return rng, q, kv, valid


@SETTINGS
@given(b=st.integers(1, 3), tq=st.integers(1, 4), tk=st.integers(1, 5), heads=st.integers(1, 3),
       d=st.integers(1, 3), with_head_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_cross_attention_forward_and_gradients(b, tq, tk, heads, d, with_head_bias, seed):
    """And with a per-head bias (the encoder's position bias): its gradient too."""
    rng, q, kv, valid = _inputs(seed, b, tq, tk, heads, d)
    bias = F.padding_bias(valid, "float64")  # (B, 1, Tk)
    hb = rng.normal(size=(heads, tq, tk)) if with_head_bias else None  # (H, Tq, Tk)
    r = rng.normal(size=q.shape)
    y, cache = F.cross_attention_fwd(q, kv, heads, bias, hb)
    np.testing.assert_allclose(y, plain(q, kv, heads, valid, hb), rtol=1e-12, atol=1e-12)

    def loss():
        return float((F.cross_attention_fwd(q, kv, heads, bias, hb)[0] * r).sum())

    dq, dkv, *dhb = F.cross_attention_bwd(r, cache)
    assert dq.shape == q.shape and dkv.shape == kv.shape
    check(dq, loss, q)
    check(dkv, loss, kv)
    assert len(dhb) == with_head_bias
    if with_head_bias:
        assert dhb[0].shape == hb.shape
        check(dhb[0], loss, hb)
    # A padding key gets no gradient: no query ever saw it.
    c = heads * d
    assert np.all(dkv[..., :c][~valid] == 0) and np.all(dkv[..., c:][~valid] == 0)


def test_cross_attention_with_a_causal_mask_is_the_causal_kernel():
    """With Tq = Tk, keys = the queries' own stream and a causal bias, the kernel equals
    ``mha_fwd``: the decoder's self-attention and the cross kernel are one algebra."""
    rng = np.random.default_rng(3)
    b, t, heads, d = 2, 5, 2, 3
    qkv = rng.normal(size=(b, t, 3 * heads * d))
    c = heads * d
    causal = np.where(np.triu(np.ones((t, t), dtype=bool), 1), -np.inf, 0.0)[None]  # (1, T, T)
    y, _ = F.cross_attention_fwd(qkv[..., :c], qkv[..., c:], heads, np.repeat(causal, b, 0))
    ref, _ = F.mha_fwd(qkv, heads)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
