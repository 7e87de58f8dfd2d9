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
their inputs (float32 or float64; given bfloat16 or float16 arrays, ``@fp32_math`` runs them in
fp32 and rounds the results to 16 bits once, see ``minipar.nn.precision``). Temporaries are
updated in place where that is safe, because on a CPU memory traffic, not arithmetic, is what
these elementwise ops cost.

Speed on a CPU (``minipar.nn.threads``). Row-wise kernels (LayerNorm, GELU, attention's softmax
over each (batch, head)) are written for a slice of rows, ``_..._rows(...)``, and the public
kernel runs that slice function over pieces of the rows on the rank's worker threads, a few
rows at a time so each pass stays in cache. Rows are independent, so the result is the same bit
for bit as one call over all rows; the reductions over rows (dg, db) are taken over the whole
array, as before. Attention's batched small products run with one BLAS thread each, and the
linear layers' GEMMs in row blocks that the workers take as they come free
(``threads.matmul``).
"""

from __future__ import annotations

import math

from minipar import backend
from minipar.nn import flops, threads
from minipar.nn.precision import fp32_math

GELU_K = math.sqrt(2.0 / math.pi)  # tanh-approximation constant (Hendrycks & Gimpel 2016)
GELU_A = 0.044715


# ---------------------------------------------------------------------------------------------
# Linear: y = x W + b, with W stored (in, out) so the forward is one GEMM over all tokens.


@fp32_math
def linear_fwd(x, w, b=None):
    """(..., in) @ (in, out) + (out,) -> (..., out). Flattens leading dims into one GEMM."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    flops.add(2 * x2.shape[0] * x2.shape[1] * w.shape[1])
    y = threads.matmul(x2, w)  # (N, out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_bwd(dy, cache):
    """Returns dx (..., in), dw (in, out), db (out,) or None."""
    dx = linear_bwd_input(dy, cache)
    dw, db = linear_bwd_weight(dy, cache)
    return dx, dw, db


@fp32_math
def linear_bwd_input(dy, cache):
    """The input-gradient half, dx = dy W^T (zero-bubble pipelines run it first)."""
    x, w, _ = cache
    return threads.matmul(dy.reshape(-1, dy.shape[-1]), w.T).reshape(x.shape)  # (..., in)


@fp32_math
def linear_bwd_weight(dy, cache):
    """The weight-gradient half, dW = x^T dy and db (may run later, off the critical path)."""
    x, _, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dw = threads.matmul(x.reshape(-1, x.shape[-1]).T, dy2)  # (in, out)
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


@fp32_math
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


@fp32_math
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


@fp32_math
def layernorm_fwd(x, g, b, eps: float = 1e-5):
    """(..., C) -> (..., C): normalise each token to zero mean, unit variance, then scale+shift.

    Plain form: mu = mean(x); xhat = (x - mu) / sqrt(var(x) + eps); y = xhat g + b."""
    xp = backend.xp()
    c = x.shape[-1]
    x2 = x.reshape(-1, c)  # (N, C)
    xhat = xp.empty(x2.shape, dtype=x.dtype)  # (N, C)
    rstd = xp.empty((len(x2), 1), dtype=x.dtype)  # (N, 1)
    y = xp.empty(x2.shape, dtype=x.dtype)  # (N, C)

    def rows(r):
        _layernorm_rows(x2[r], g, b, eps, xhat[r], rstd[r], y[r])

    threads.map_rows(rows, len(x2), x2.size, threads.cache_rows(c))
    lead = x.shape[:-1]
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(*lead, 1), g)


def _layernorm_rows(x, g, b, eps, xhat, rstd, y) -> None:
    """LayerNorm of the rows x (n, C) into xhat, rstd (n, 1) and y (means by ``row_sums``,
    with no x^2 temporary)."""
    xp = backend.xp()
    c = x.shape[-1]
    mu = row_sums(x)  # (n, 1)
    mu /= c
    xp.subtract(x, mu, out=xhat)  # (n, C)
    var = row_sums(xhat, xhat)  # (n, 1), times C
    var /= c
    var += eps
    xp.sqrt(var, out=var)
    xp.divide(1.0, var, out=rstd)
    xhat *= rstd
    xp.multiply(xhat, g, out=y)
    y += b


@fp32_math
def layernorm_bwd(dy, cache):
    """Returns dx, dg, db. dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    xp = backend.xp()
    xhat, rstd, g = cache
    c = xhat.shape[-1]
    lead = tuple(range(dy.ndim - 1))
    dg = (dy * xhat).sum(axis=lead)  # (C,)
    db = dy.sum(axis=lead)  # (C,)
    dy2, xhat2, rstd2 = dy.reshape(-1, c), xhat.reshape(-1, c), rstd.reshape(-1, 1)
    dx = xp.empty(dy2.shape, dtype=dy.dtype)  # (N, C)

    def rows(r):
        _layernorm_bwd_rows(dy2[r], xhat2[r], rstd2[r], g, dx[r])

    threads.map_rows(rows, len(dy2), dy2.size, threads.cache_rows(c))
    return dx.reshape(dy.shape), dg, db


def _layernorm_bwd_rows(dy, xhat, rstd, g, dx) -> None:
    """dx of the rows dy (n, C), written into dx (means by ``row_sums``, as in the forward)."""
    xp = backend.xp()
    c = xhat.shape[-1]
    xp.multiply(dy, g, out=dx)  # dxhat (n, C)
    m1 = row_sums(dx)  # (n, 1)
    m1 /= c
    m2 = row_sums(dx, xhat)  # (n, 1)
    m2 /= c
    dx -= m1
    dx -= xhat * m2
    dx *= rstd


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation: 0.5 x (1 + tanh(k (x + a x^3))).


@fp32_math
def gelu_fwd(x):
    """y = 0.5 x (1 + tanh(k (x + a x^3))). The cache is x alone: backward recomputes the tanh
    a slice at a time, as Megatron's fused bias-GELU does, so GELU adds one (N, F) array to what
    the MLP stores, not two (sbF/t in Korthikanti et al. 2022's count), and the tanh never makes
    a trip to memory."""
    xp = backend.xp()
    y = xp.empty(x.shape, dtype=x.dtype)  # (..., F)
    f = x.shape[-1]
    x2, y2 = x.reshape(-1, f), y.reshape(-1, f)  # (N, F)

    def rows(r):
        out = _gelu_tanh(x2[r], y2[r])  # (n, F) the tanh, then y in place
        out += 1.0
        out *= x2[r]
        out *= 0.5

    threads.map_rows(rows, len(x2), x.size, threads.cache_rows(f))
    return y, x


def _gelu_tanh(x, t):
    """t = tanh(k (x + a x^3)) of the rows x, into t (each step in place, no temporaries)."""
    xp = backend.xp()
    xp.multiply(x, x, out=t)
    t *= GELU_A
    t += 1.0
    t *= x
    t *= GELU_K  # k (x + a x^3)
    return xp.tanh(t, out=t)


@fp32_math
def gelu_bwd(dy, x):
    """d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2), times dy, with t the forward's
    tanh, recomputed from ``x`` (the forward's cache)."""
    xp = backend.xp()
    dx = xp.empty(x.shape, dtype=x.dtype)  # (..., F)
    f = x.shape[-1]
    x2, dy2, dx2 = (a.reshape(-1, f) for a in (x, dy, dx))  # (N, F)

    def rows(r):
        _gelu_bwd_rows(dy2[r], x2[r], dx2[r])

    threads.map_rows(rows, len(x2), x.size, threads.cache_rows(f))
    return dx


def _gelu_bwd_rows(dy, x, inner) -> None:
    """GELU's input gradient of the rows, written into ``inner``."""
    xp = backend.xp()
    t = _gelu_tanh(x, xp.empty_like(inner))  # (n, F)
    xp.multiply(x, x, out=inner)
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


# ---------------------------------------------------------------------------------------------
# Inverted dropout (Srivastava et al. 2014) through a given keep mask; where the mask comes from,
# and why every layout draws the same one, is minipar.nn.dropout.


def dropout_fwd(x, keep, p: float):
    """y = x * keep / (1 - P), elementwise, so E[y] = x and evaluation simply skips it."""
    return backend.xp().where(keep, x * (1.0 / (1.0 - p)), 0.0).astype(x.dtype, copy=False)


def dropout_bwd(dy, keep, p: float):
    """dx = dy * keep / (1 - P): dropout is linear in x, so backward is the same product."""
    return dropout_fwd(dy, keep, p)


# ---------------------------------------------------------------------------------------------
# Softmax over the last axis, with the row maximum subtracted so exp never overflows.


def row_sums(a, b=None):
    """Sums over the last axis, kept as a (..., 1) column: of ``a``, or of a * b without forming
    the product. By einsum: NumPy's ``sum(axis=-1)`` over short rows is ~3x slower (measured: 20
    against 7 us for (8, 64, 192) scores; ~2x for LayerNorm's rows), and softmax and LayerNorm
    are most of a step's time outside its products. einsum adds a row left to right (in SIMD
    lanes) where ``sum`` adds pairwise: in float32 the last bits differ, a relative 1e-6 for
    rows of 10^4 entries, far inside every tolerance."""
    xp = backend.xp()
    sums = xp.einsum("...j->...", a) if b is None else xp.einsum("...j,...j->...", a, b)
    return sums[..., None]


def softmax_fwd(s, inplace: bool = False):
    """p = exp(s - max(s)) / sum(exp(s - max(s))) over the last axis (sums by ``row_sums``)."""
    xp = backend.xp()
    p = s if inplace else s.copy()
    p -= p.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p /= row_sums(p)
    return p, p


def softmax_bwd(dp, p, inplace: bool = False):
    """ds = p * (dp - sum(dp * p)): the Jacobian of softmax applied without forming it (the row
    sums of dp * p by ``row_sums``, no (..., T) temporary)."""
    ds = dp if inplace else dp.copy()
    ds -= row_sums(dp, p)
    ds *= p
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


@fp32_math
def attention_fwd(q, k, v, keep=None, p_drop: float = 0.0):
    """q, k, v (B, H, T, D) -> (B, H, T, D): softmax(q k^T / sqrt(D) + causal) v.

    Plain form, over all heads at once:
        s = q @ k.swapaxes(-1, -2) * scale + causal;  p = softmax(s);  y = p @ v
    computed here a few (batch, head) pairs at a time (``_causal_rows``) on the worker
    threads, each product with one BLAS thread (see ``minipar.nn.threads``). With ``keep``
    (B, H, T, T) the probabilities are dropped out first, y = dropout(p) @ v
    (``minipar.nn.dropout``); the cache keeps p and the mask, not the dropped p."""
    xp = backend.xp()
    b, h, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    q3, k3, v3 = (_pairs(a) for a in (q, k, v))  # (B*H, T, D) each, contiguous
    p = xp.empty((b * h, t, t), dtype=q.dtype)  # (B*H, T, T)
    y = xp.empty_like(q3)  # (B*H, T, D)
    bias = causal_bias(t, q.dtype)
    keep3 = None if keep is None else keep.reshape(b * h, t, t)  # (B*H, T, T) bool
    flops.add(4 * b * h * t * t * d)  # q k^T and p v over the full (T, T), as the cost model counts

    def rows(r):
        drop = None if keep3 is None else (keep3[r], p_drop)
        _causal_rows(q3[r], k3[r], v3[r], bias, scale, p[r], y[r], drop)

    with threads.one_blas_thread():
        threads.map_rows(rows, b * h, b * h * t * t, threads.cache_rows(t * t, ATTENTION_SLICE))
    if keep3 is None:
        return y.reshape(q.shape), (q3, k3, v3, p, scale)
    return y.reshape(q.shape), (q3, k3, v3, p, scale, (keep3, p_drop))


def _pairs(x):
    """(B, H, T, D) -> (B*H, T, D), contiguous (a copy only when x is a strided view)."""
    return backend.xp().ascontiguousarray(x).reshape(-1, *x.shape[-2:])


ATTENTION_BLOCK = 64  # query rows per causal block: small enough to skip work, big for BLAS
# Scores per slice of (batch, head) pairs: a slice's products run as one batched NumPy call,
# so several pairs per slice save Python calls (the small preset's attention forward, per
# layer: 10.5 ms at 2^16, one pair a slice, against 5.9 ms at 2^19, eight).
ATTENTION_SLICE = 1 << 19


def causal_blocks(t: int, block: int | None = None) -> list[tuple[int, int]]:
    """The query blocks (lo, hi) covering range(t). Block i's queries see keys [0, hi) only:
    the scores right of it are masked (p = 0), so they are never computed."""
    block = block or ATTENTION_BLOCK
    return [(lo, min(lo + block, t)) for lo in range(0, t, block)]


def _causal_rows(q, k, v, bias, scale, p, y, drop=None) -> None:
    """Causal attention of n (batch, head) pairs: q, k, v (n, T, D) -> p (n, T, T), y (n, T, D);
    ``drop`` = (keep (n, T, T), P) drops out the probabilities before they weight v.

    Plain form (``_attention_rows`` with the causal bias): p = softmax(q k^T * scale + causal);
    y = dropout(p) v. Here one query block at
    a time, over the keys it can see: with blocks of T/4 rows this computes 5/8 of the scores,
    and the entries skipped are exactly those where p is 0 (they are set to 0)."""
    xp = backend.xp()
    for lo, hi in causal_blocks(q.shape[1]):
        s = p[:, lo:hi, :hi]  # (n, bq, hi) the visible scores of this block
        xp.matmul(q[:, lo:hi], k[:, :hi].swapaxes(-1, -2), out=s)
        s *= scale
        s[:, :, lo:] += bias[lo:hi, lo:hi]  # the mask is all 0 left of the diagonal block
        softmax_fwd(s, inplace=True)
        p[:, lo:hi, hi:] = 0.0
        pd = s if drop is None else dropout_fwd(s, drop[0][:, lo:hi, :hi], drop[1])
        xp.matmul(pd, v[:, :hi], out=y[:, lo:hi])  # (n, bq, D)


@fp32_math
def attention_bwd(dy, cache):
    """Returns dq, dk, dv, each (B, H, T, D).

    Plain form: dv = p^T dy;  dp = dy v^T;  ds = softmax_bwd(dp, p) * scale;
    dq = ds k;  dk = ds^T q. Run a few (batch, head) pairs at a time, like the forward."""
    grads = _attention_grads(dy, cache)  # (3, B*H, T, D)
    return tuple(g.reshape(dy.shape) for g in grads)


def _attention_grads(dy, cache):
    """dq, dk, dv stacked in one (3, B*H, T, D) array."""
    xp = backend.xp()
    q, k, v, p, scale, *dropped = cache
    keep, p_drop = dropped[0] if dropped else (None, 0.0)
    n, t, _ = q.shape
    dy3 = _pairs(dy)  # (B*H, T, D)
    grads = xp.empty((3, *q.shape), dtype=q.dtype)  # (3, B*H, T, D)

    def rows(r):
        drop = None if keep is None else (keep[r], p_drop)
        _causal_bwd_rows(dy3[r], q[r], k[r], v[r], p[r], scale, grads[:, r], drop)

    with threads.one_blas_thread():
        threads.map_rows(rows, n, n * t * t, threads.cache_rows(t * t, ATTENTION_SLICE))
    return grads


def _causal_bwd_rows(dy, q, k, v, p, scale, out, drop=None) -> None:
    """Gradients of n causal (batch, head) pairs, written into out = (dq, dk, dv) (3, n, T, D);
    with ``drop`` = (keep, P) the dropped probabilities are recomputed from p and the mask.

    Plain form (``_attention_bwd_rows``, which scales dq and dk instead of ds):
    dv = dropout(p)^T dy;  ds = softmax_bwd(dropout_bwd(dy v^T), p) * scale;  dq = ds k;
    dk = ds^T q.
    Only the causal blocks where p can be non-zero are computed: query block [lo, hi) sees keys
    [0, hi), so key block [lo, hi) is seen by queries [lo, T) (elsewhere p = ds = 0)."""
    xp = backend.xp()
    dq, dk, dv = out
    t = q.shape[1]
    ds = xp.empty(p.shape, dtype=p.dtype)  # (n, T, T), filled on and below the diagonal blocks
    for lo, hi in causal_blocks(t):  # query blocks: rows of ds, then dq
        dp = ds[:, lo:hi, :hi]  # (n, bq, hi)
        xp.matmul(dy[:, lo:hi], v[:, :hi].swapaxes(-1, -2), out=dp)
        if drop is not None:  # through the same mask
            dp[...] = dropout_bwd(dp, drop[0][:, lo:hi, :hi], drop[1])
        softmax_bwd(dp, p[:, lo:hi, :hi], inplace=True)  # ds, in place
        dp *= scale
        xp.matmul(dp, k[:, :hi], out=dq[:, lo:hi])  # (n, bq, D)
    for lo, hi in causal_blocks(t):  # key blocks: columns of p and ds, then dv and dk
        pd = p[:, lo:, lo:hi]  # (n, T - lo, bk)
        if drop is not None:  # what weighted v
            pd = dropout_fwd(pd, drop[0][:, lo:, lo:hi], drop[1])
        xp.matmul(pd.swapaxes(-1, -2), dy[:, lo:], out=dv[:, lo:hi])  # (n, bk, D)
        xp.matmul(ds[:, lo:, lo:hi].swapaxes(-1, -2), q[:, lo:], out=dk[:, lo:hi])  # (n, bk, D)


def _attention_rows(q, k, v, bias, scale, p, y) -> None:
    """Attention of n (batch, head) pairs under any additive mask ``bias`` (cross-attention):
    q (n, Tq, D), k, v (n, Tk, D) -> p (n, Tq, Tk), y (n, Tq, D)."""
    xp = backend.xp()
    xp.matmul(q, k.swapaxes(-1, -2), out=p)  # (n, Tq, Tk) scores
    p *= scale
    p += bias
    softmax_fwd(p, inplace=True)
    xp.matmul(p, v, out=y)  # (n, Tq, D)


def _attention_bwd_rows(dy, q, k, v, p, scale, out, ds=None) -> None:
    """Gradients of ``_attention_rows``, written into out = (dq, dk, dv); the scores' gradient
    (n, Tq, Tk) is also written into ``ds`` when one is given (a learned bias needs it)."""
    xp = backend.xp()
    xp.matmul(p.swapaxes(-1, -2), dy, out=out[2])  # dv (n, Tk, D)
    if ds is None:
        ds = dy @ v.swapaxes(-1, -2)  # (n, Tq, Tk)
    else:
        xp.matmul(dy, v.swapaxes(-1, -2), out=ds)
    softmax_bwd(ds, p, inplace=True)  # (n, Tq, Tk); 0 where masked
    dq, dk, _ = out
    xp.matmul(ds, k, out=dq)  # (n, Tq, D), times the scale below (ds is the bias's gradient)
    dq *= scale
    xp.matmul(ds.swapaxes(-1, -2), q, out=dk)  # (n, Tk, D)
    dk *= scale


def split_heads(x, n_heads: int):
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, c = x.shape
    return x.reshape(b, t, n_heads, c // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D), contiguous for the next GEMM."""
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


@fp32_math
def mha_fwd(qkv, n_heads: int, keep=None, p_drop: float = 0.0):
    """Fused projection (B, T, 3*H*D) laid out [Q | K | V] -> attention output (B, T, H*D);
    ``keep`` (B, H, T, T) drops out the attention probabilities (see ``attention_fwd``).

    Plain form: q, k, v = (split_heads(part, H) for part in the three thirds of qkv). Here one
    transposing copy makes all three contiguous per (batch, head) at once."""
    xp = backend.xp()
    b, t, c3 = qkv.shape
    d = c3 // (3 * n_heads)
    qkv5 = xp.ascontiguousarray(
        qkv.reshape(b, t, 3, n_heads, d).transpose(2, 0, 3, 1, 4))  # (3, B, H, T, D)
    y, cache = attention_fwd(qkv5[0], qkv5[1], qkv5[2], keep, p_drop)  # (B, H, T, D)
    return merge_heads(y), (cache, n_heads)


@fp32_math
def mha_bwd(dy, cache):
    """dy (B, T, H*D) -> dqkv (B, T, 3*H*D).

    Plain form: concatenate(merge_heads(dq), merge_heads(dk), merge_heads(dv)), here one
    transposing copy of the stacked (dq, dk, dv)."""
    att_cache, n_heads = cache
    b, t, c = dy.shape
    grads = _attention_grads(split_heads(dy, n_heads), att_cache)  # (3, B*H, T, D)
    grads = grads.reshape(3, b, n_heads, t, c // n_heads)  # (3, B, H, T, D)
    return grads.transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * c)  # (B, T, 3C)


# ---------------------------------------------------------------------------------------------
# Attention of one stream over another, with a mask: the encoder-decoder Transformer (Vaswani et
# al. 2017, section 3.2.3). Its decoder's cross-attention takes queries from the decoder and keys
# and values from the encoder's output, so Tq and Tk differ; the encoder's self-attention is the
# case where both come from the source (and a key/value cache the case of one new query). The
# mask is additive: 0 where a query may look, -inf where it may not (padding of the source). The
# per-pair row functions are the causal kernel's own: only the layout around them is new.


def padding_bias(valid, dtype):
    """(B, Tk) bool, True on real tokens -> (B, 1, Tk) additive mask (-inf on padding keys)."""
    xp = backend.xp()
    return xp.where(valid, 0.0, -xp.inf).astype(dtype)[:, None, :]


@fp32_math
def cross_attention_fwd(q, kv, n_heads: int, bias, head_bias=None):
    """q (B, Tq, H*D), kv (B, Tk, 2*H*D) laid out [K | V], bias (B, 1 or Tq, Tk) -> (B, Tq, H*D);
    ``head_bias`` (H, Tq, Tk), when given, is added to every batch row's scores of each head
    (the encoder's learned position bias, ``minipar.models.encdec``).

    Plain form, per batch row b and head h: y = softmax(q k^T / sqrt(D) + bias[b] +
    head_bias[h]) v. Every query row must see at least one key (a source is never all padding),
    else its softmax is 0/0."""
    xp = backend.xp()
    b, tq, c = q.shape
    tk, d = kv.shape[1], c // n_heads
    q3 = _pairs(split_heads(q, n_heads))  # (B*H, Tq, D)
    kv5 = xp.ascontiguousarray(
        kv.reshape(b, tk, 2, n_heads, d).transpose(2, 0, 3, 1, 4))  # (2, B, H, Tk, D)
    k3, v3 = kv5[0].reshape(b * n_heads, tk, d), kv5[1].reshape(b * n_heads, tk, d)
    if head_bias is None:
        bias3 = xp.repeat(bias, n_heads, axis=0)  # (B*H, 1 or Tq, Tk): each head its row's mask
    else:  # (B, 1, ., Tk) + (1, H, Tq, Tk) -> (B*H, Tq, Tk)
        bias3 = (bias[:, None] + head_bias[None]).reshape(b * n_heads, tq, tk)
    p = xp.empty((b * n_heads, tq, tk), dtype=q.dtype)  # (B*H, Tq, Tk)
    y = xp.empty_like(q3)  # (B*H, Tq, D)
    scale = 1.0 / math.sqrt(d)

    def rows(r):
        _attention_rows(q3[r], k3[r], v3[r], bias3[r], scale, p[r], y[r])

    with threads.one_blas_thread():
        threads.map_rows(rows, b * n_heads, b * n_heads * tq * tk,
                         threads.cache_rows(tq * tk, ATTENTION_SLICE))
    cache = (q3, k3, v3, p, scale, n_heads, head_bias is not None)
    return merge_heads(y.reshape(b, n_heads, tq, d)), cache


@fp32_math
def cross_attention_bwd(dy, cache):
    """dy (B, Tq, H*D) -> dq (B, Tq, H*D), dkv (B, Tk, 2*H*D) laid out [dK | dV], and third,
    when the forward had a ``head_bias``, its gradient (H, Tq, Tk).

    Plain form: dv = p^T dy;  dp = dy v^T;  ds = softmax_bwd(dp, p);  dq = ds k / sqrt(D);
    dk = ds^T q / sqrt(D); d head_bias[h] = the sum over batch rows of head h's ds (a bias added
    to the scores has the scores' gradient). A key or value feeds every query that sees it, so
    its gradient sums over them; masked entries have p = 0, so padding keys get no gradient."""
    xp = backend.xp()
    q3, k3, v3, p, scale, n_heads, has_head_bias = cache
    b, tq, c = dy.shape
    tk, d = k3.shape[1], c // n_heads
    dy3 = _pairs(split_heads(dy, n_heads))  # (B*H, Tq, D)
    dq = xp.empty_like(q3)  # (B*H, Tq, D)
    dkv = xp.empty((2, *k3.shape), dtype=k3.dtype)  # (2, B*H, Tk, D)
    ds = xp.empty_like(p) if has_head_bias else None  # (B*H, Tq, Tk): the scores' gradient

    def rows(r):
        out = (dq[r], dkv[0, r], dkv[1, r])  # (dq, dk, dv) of these pairs
        _attention_bwd_rows(dy3[r], q3[r], k3[r], v3[r], p[r], scale, out,
                            None if ds is None else ds[r])

    with threads.one_blas_thread():
        threads.map_rows(rows, len(q3), len(q3) * tq * tk,
                         threads.cache_rows(tq * tk, ATTENTION_SLICE))
    dkv = dkv.reshape(2, b, n_heads, tk, d).transpose(1, 3, 0, 2, 4)  # (B, Tk, 2, H, D)
    grads = merge_heads(dq.reshape(b, n_heads, tq, d)), dkv.reshape(b, tk, 2 * c)
    if ds is None:
        return grads
    return (*grads, ds.reshape(b, n_heads, tq, tk).sum(axis=0))  # (H, Tq, Tk)


# ---------------------------------------------------------------------------------------------
# Cross-entropy over the vocabulary (serial form; the model uses the vocabulary-parallel form in
# minipar.parallel.tensor, which equals this one on a single rank and is tested against it).


@fp32_math
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


@fp32_math
def cross_entropy_bwd(dloss, cache):
    """dlogits = (softmax - onehot) * valid / normalizer * dloss."""
    xp = backend.xp()
    shifted, lse, safe, valid, norm = cache
    dlogits = xp.exp(shifted - lse[:, None])  # (N, V)
    dlogits[xp.arange(len(safe)), safe] -= 1.0
    dlogits *= (valid * (dloss / max(norm, 1.0)))[:, None]
    return dlogits
