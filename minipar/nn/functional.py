"""Pure kernel pairs: ``y, cache = op_fwd(...)`` and ``grads = op_bwd(dy, cache)``.

No autograd and no hidden state: every backward is written by hand from the forward's cache, so a
reader can check each line against the chain rule. Parallel layers (``minipar.parallel.tensor``)
are these same kernels with named collectives around them.

Dimension legend, used in the shape comments on every tensor line:

    B  batch (sequences in a microbatch)      T  sequence length (tokens per sequence)
    C  model width (d_model)                  H  attention heads (local to this tp rank)
    D  head width (d_head = C / H_total)      F  MLP inner width (local to this tp rank)
    V  vocabulary (local to this tp rank)     N  tokens, B * T, when flattened

Kernels take the array module from ``minipar.backend`` (NumPy or CuPy) and keep the dtype of
their inputs (float32 or float64). Temporaries are updated in place where that is safe, because
on a CPU memory traffic, not arithmetic, is what these elementwise ops cost.
"""

from __future__ import annotations

import math

from minipar import backend

GELU_K = math.sqrt(2.0 / math.pi)  # tanh-approximation constant (Hendrycks & Gimpel 2016)
GELU_A = 0.044715


# ---------------------------------------------------------------------------------------------
# Linear: y = x W + b, with W stored (in, out) so the forward is one GEMM over all tokens.


def linear_fwd(x, w, b=None):
    """(..., in) @ (in, out) + (out,) -> (..., out). Flattens leading dims into one GEMM."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = x2 @ w  # (N, out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_bwd(dy, cache):
    """Returns dx (..., in), dw (in, out), db (out,) or None."""
    dx = linear_bwd_input(dy, cache)
    dw, db = linear_bwd_weight(dy, cache)
    return dx, dw, db


def linear_bwd_input(dy, cache):
    """The input-gradient half, dx = dy W^T (zero-bubble pipelines run it first)."""
    x, w, _ = cache
    return (dy.reshape(-1, dy.shape[-1]) @ w.T).reshape(x.shape)  # (..., in)


def linear_bwd_weight(dy, cache):
    """The weight-gradient half, dW = x^T dy and db (may run later, off the critical path)."""
    x, _, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dw = x.reshape(-1, x.shape[-1]).T @ dy2  # (in, out)
    db = dy2.sum(axis=0) if has_bias else None  # (out,)
    return dw, db


# ---------------------------------------------------------------------------------------------
# Embedding lookup and positional encodings.


def embedding_fwd(ids, w, valid=None):
    """Rows of ``w`` picked by ``ids``: (B, T) int -> (B, T, C).

    ``valid`` (B, T) bool marks the ids this table holds; other positions give zeros. The
    vocabulary-parallel embedding uses it: each tp rank holds a slice of the rows.
    """
    xp = backend.xp()
    if valid is None:
        return w[ids], (ids, None, w.shape)  # (B, T, C)
    safe = xp.where(valid, ids, 0)  # (B, T)
    y = w[safe]  # (B, T, C)
    y *= valid[..., None]
    return y, (safe, valid, w.shape)


def embedding_bwd(dy, cache):
    """dW (rows, C): each token's gradient added to its row (repeated ids accumulate).

    Deterministic on every backend, so runs repeat bit for bit on a GPU too: tokens are sorted
    by id (stably), and each id's run of gradients is summed as a fixed pairwise tree, in
    log2(longest run) passes (on a GPU each pass waits for its index list). One ``xp.add.at``
    would do, but on a GPU it is a scatter of atomic adds, whose float sums depend on the order
    the threads happen to run in. Measured on this CPU it is also 2-3x faster than add.at.
    """
    xp = backend.xp()
    ids, valid, (v, c) = cache
    dy2 = dy.reshape(-1, c)  # (N, C)
    flat = ids.reshape(-1)  # (N,)
    if valid is not None:  # ids this table does not hold go to row v, a scratch row
        flat = xp.where(valid.reshape(-1), flat, v)  # (N,)
    order = xp.argsort(flat, kind="stable")  # (N,)
    key = flat[order]  # (N,) ids, sorted; each id is one run
    rows = dy2[order]  # (N, C) gradients in that order
    start = xp.searchsorted(key, key, side="left")  # (N,) where each token's run starts
    length = xp.searchsorted(key, key, side="right") - start  # (N,) and how long it is
    pos = xp.arange(key.shape[0]) - start  # (N,) each token's place in its run
    step, longest = 1, int(length.max())
    while step < longest:  # each place 0 mod 2*step of a run adds the partial sum step on
        adds = xp.flatnonzero((pos % (2 * step) == 0) & (pos + step < length))  # (M,) distinct
        rows[adds] += rows[adds + step]  # (M, C)
        step *= 2
    dw = xp.zeros((v + 1, c), dtype=dy.dtype)  # (V + 1, C)
    dw[xp.where(pos == 0, key, v)] = rows  # each run's sum is at its start; the rest: row v
    return dw[:v]  # (V, C)


def sinusoidal_positions(t: int, c: int, dtype="float64"):
    """Fixed encodings of Vaswani et al. 2017: sin on even, cos on odd channels. (T, C)."""
    xp = backend.xp()
    pos = xp.arange(t, dtype="float64")[:, None]  # (T, 1)
    freq = xp.exp(-math.log(10000.0) * xp.arange(0, c, 2, dtype="float64") / c)  # (C/2,)
    pe = xp.zeros((t, c), dtype="float64")  # (T, C)
    pe[:, 0::2] = xp.sin(pos * freq)
    pe[:, 1::2] = xp.cos(pos * freq[: c // 2])
    return pe.astype(dtype)


def add_positions_fwd(x, pos):
    """x (B, T, C) + pos (T, C): the learned positional embedding is a broadcast add."""
    return x + pos, None


def add_positions_bwd(dy, cache=None):
    """dx = dy; dpos = dy summed over the batch."""
    return dy, dy.sum(axis=0)


def residual_fwd(a, b):
    """y = a + b: the skip connection. Its backward copies the gradient to both branches."""
    return a + b, None


def residual_bwd(dy, cache=None):
    return dy, dy


# ---------------------------------------------------------------------------------------------
# LayerNorm (Ba et al. 2016) over the last axis.


def layernorm_fwd(x, g, b, eps: float = 1e-5):
    """(..., C) -> (..., C): normalise each token to zero mean, unit variance, then scale+shift."""
    xp = backend.xp()
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xhat = x - mu  # (..., C)
    var = xp.mean(xhat * xhat, axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat *= rstd
    y = xhat * g  # (..., C)
    y += b
    return y, (xhat, rstd, g)


def layernorm_bwd(dy, cache):
    """Returns dx, dg, db. dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    xhat, rstd, g = cache
    c = xhat.shape[-1]
    lead = tuple(range(dy.ndim - 1))
    dg = (dy * xhat).sum(axis=lead)  # (C,)
    db = dy.sum(axis=lead)  # (C,)
    dxhat = dy * g  # (..., C)
    m1 = dxhat.sum(axis=-1, keepdims=True) / c  # (..., 1)
    m2 = (dxhat * xhat).sum(axis=-1, keepdims=True) / c  # (..., 1)
    dxhat -= m1
    dxhat -= xhat * m2
    dxhat *= rstd
    return dxhat, dg, db


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation: 0.5 x (1 + tanh(k (x + a x^3))).


def gelu_fwd(x):
    xp = backend.xp()
    u = x * x  # (..., F)
    u *= GELU_A
    u += 1.0
    u *= x
    u *= GELU_K  # k (x + a x^3)
    t = xp.tanh(u, out=u)  # (..., F), reuses u's memory
    y = t + 1.0
    y *= x
    y *= 0.5
    return y, (x, t)


def gelu_bwd(dy, cache):
    """d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2)."""
    x, t = cache
    inner = x * x  # (..., F)
    inner *= 3.0 * GELU_A * GELU_K
    inner += GELU_K  # k (1 + 3 a x^2)
    sech2 = t * t
    sech2 *= -1.0
    sech2 += 1.0  # 1 - t^2
    inner *= sech2
    inner *= x
    inner += t
    inner += 1.0
    inner *= 0.5
    inner *= dy
    return inner


# ---------------------------------------------------------------------------------------------
# Softmax over the last axis, with the row maximum subtracted so exp never overflows.


def softmax_fwd(s, inplace: bool = False):
    xp = backend.xp()
    p = s if inplace else s.copy()
    p -= p.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p, p


def softmax_bwd(dp, p):
    """ds = p * (dp - sum(dp * p)): the Jacobian of softmax applied without forming it."""
    ds = dp * p
    ds -= p * ds.sum(axis=-1, keepdims=True)
    return ds


# ---------------------------------------------------------------------------------------------
# Causal scaled dot-product attention over heads (Vaswani et al. 2017).

_causal_cache: dict = {}


def causal_bias(t: int, dtype):
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (a token sees its past)."""
    xp = backend.xp()
    # Per device too: in the in-process world each rank's thread may run on its own GPU.
    key = (t, str(dtype), backend.name(), backend.device().current())
    if key not in _causal_cache:
        mask = xp.triu(xp.ones((t, t), dtype=bool), k=1)
        _causal_cache[key] = xp.where(mask, -xp.inf, 0.0).astype(dtype)
    return _causal_cache[key]


def attention_fwd(q, k, v):
    """q, k, v (B, H, T, D) -> (B, H, T, D): softmax(q k^T / sqrt(D) + causal) v."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = q @ k.swapaxes(-1, -2)  # (B, H, T, T)
    s *= scale
    s += causal_bias(q.shape[-2], s.dtype)
    p, _ = softmax_fwd(s, inplace=True)  # (B, H, T, T)
    y = p @ v  # (B, H, T, D)
    return y, (q, k, v, p, scale)


def attention_bwd(dy, cache):
    """Returns dq, dk, dv, each (B, H, T, D)."""
    q, k, v, p, scale = cache
    dv = p.swapaxes(-1, -2) @ dy  # (B, H, T, D)
    dp = dy @ v.swapaxes(-1, -2)  # (B, H, T, T)
    ds = softmax_bwd(dp, p)  # (B, H, T, T); masked entries have p = 0 so ds = 0 there
    ds *= scale
    dq = ds @ k  # (B, H, T, D)
    dk = ds.swapaxes(-1, -2) @ q  # (B, H, T, D)
    return dq, dk, dv


def split_heads(x, n_heads: int):
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, c = x.shape
    return x.reshape(b, t, n_heads, c // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D), contiguous for the next GEMM."""
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def mha_fwd(qkv, n_heads: int):
    """Fused projection (B, T, 3*H*D) laid out [Q | K | V] -> attention output (B, T, H*D)."""
    c = qkv.shape[-1] // 3
    q = split_heads(qkv[..., :c], n_heads)  # (B, H, T, D)
    k = split_heads(qkv[..., c: 2 * c], n_heads)  # (B, H, T, D)
    v = split_heads(qkv[..., 2 * c:], n_heads)  # (B, H, T, D)
    y, cache = attention_fwd(q, k, v)  # (B, H, T, D)
    return merge_heads(y), (cache, n_heads)


def mha_bwd(dy, cache):
    """dy (B, T, H*D) -> dqkv (B, T, 3*H*D)."""
    xp = backend.xp()
    att_cache, n_heads = cache
    dq, dk, dv = attention_bwd(split_heads(dy, n_heads), att_cache)
    return xp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


# ---------------------------------------------------------------------------------------------
# Cross-entropy over the vocabulary (serial form; the model uses the vocabulary-parallel form in
# minipar.parallel.tensor, which equals this one on a single rank and is tested against it).


def cross_entropy_fwd(logits, targets, ignore_index: int = -100, normalizer=None):
    """logits (N, V), targets (N,) -> scalar loss.

    The loss is the sum of -log p(target) over scored tokens divided by ``normalizer`` (default:
    the number of scored tokens, i.e. the mean). Passing the global token count lets data and
    pipeline parallel runs add microbatch losses and match the serial mean exactly.
    """
    xp = backend.xp()
    valid = targets != ignore_index  # (N,)
    count = int(valid.sum())
    norm = float(count if normalizer is None else normalizer)
    safe = xp.where(valid, targets, 0)  # (N,)
    m = logits.max(axis=-1, keepdims=True)  # (N, 1)
    shifted = logits - m  # (N, V)
    lse = xp.log(xp.exp(shifted).sum(axis=-1))  # (N,)
    nll = lse - shifted[xp.arange(len(safe)), safe]  # (N,)
    loss = (nll * valid).sum() / max(norm, 1.0)
    return loss, (shifted, lse, safe, valid, norm)


def cross_entropy_bwd(dloss, cache):
    """dlogits = (softmax - onehot) * valid / normalizer * dloss."""
    xp = backend.xp()
    shifted, lse, safe, valid, norm = cache
    dlogits = xp.exp(shifted - lse[:, None])  # (N, V)
    dlogits[xp.arange(len(safe)), safe] -= 1.0
    dlogits *= (valid * (dloss / max(norm, 1.0)))[:, None]
    return dlogits
