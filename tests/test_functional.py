"""Every kernel's hand-written backward equals central differences (float64), over drawn shapes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.nn import functional
from on_device import OnBackend

F = OnBackend(functional)  # host arrays in and out, on whichever backend the suite runs

SETTINGS = settings(max_examples=15, deadline=None)


def numeric_grad(fn, x, eps=1e-6):
    """Central differences of the scalar fn() w.r.t. every entry of x (x modified in place)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = fn()
        flat[i] = old - eps
        down = fn()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


def rel_err(a, b):
    """Norm-wise relative error, with a floor of 1e-3 under the norms: central differences carry
    ~1e-16 / eps = 1e-10 of rounding noise per entry (a loss near 0 computed as log(1 + tiny)
    rounds at 1e-16 absolute; measured: 9e-11 on a 1e-6 gradient), so a gradient below ~1e-3
    is checked to 1e-9 absolute, which is what 1e-6 x the floor asks."""
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-3)


def check(analytic, fn, x):
    num = numeric_grad(fn, x)
    assert rel_err(analytic, num) < 1e-6, (rel_err(analytic, num), analytic, num)


dims = st.integers(1, 4)


@SETTINGS
@given(b=dims, t=dims, cin=dims, cout=dims, seed=st.integers(0, 2**16))
def test_linear(b, t, cin, cout, seed):
    rng = np.random.default_rng(seed)
    x, w, bias = rng.normal(size=(b, t, cin)), rng.normal(size=(cin, cout)), rng.normal(size=cout)
    r = rng.normal(size=(b, t, cout))
    loss = lambda: float((F.linear_fwd(x, w, bias)[0] * r).sum())  # noqa: E731
    y, cache = F.linear_fwd(x, w, bias)
    np.testing.assert_allclose(y, x @ w + bias)
    dx, dw, db = F.linear_bwd(r, cache)
    check(dx, loss, x)
    check(dw, loss, w)
    check(db, loss, bias)


@SETTINGS
@given(b=dims, t=dims, c=st.integers(3, 6), seed=st.integers(0, 2**16))
def test_layernorm(b, t, c, seed):
    rng = np.random.default_rng(seed)
    x, g, beta = rng.normal(size=(b, t, c)), rng.normal(size=c), rng.normal(size=c)
    r = rng.normal(size=(b, t, c))
    loss = lambda: float((F.layernorm_fwd(x, g, beta)[0] * r).sum())  # noqa: E731
    y, cache = F.layernorm_fwd(x, g, beta)
    xhat = (y - beta) / g
    np.testing.assert_allclose(xhat.mean(-1), 0, atol=1e-9)
    dx, dg, db = F.layernorm_bwd(r, cache)
    check(dx, loss, x)
    check(dg, loss, g)
    check(db, loss, beta)


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_gelu(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2
    r = rng.normal(size=shape)
    loss = lambda: float((F.gelu_fwd(x)[0] * r).sum())  # noqa: E731
    y, cache = F.gelu_fwd(x)
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    # 1 + tanh(z) cancels for z << 0: an ulp of tanh (1e-16) there is 0.5 |x| 1e-16 absolute,
    # which CuPy's tanh on an H200 showed (2.7e-16 on an output of -5e-7, relative 5e-10).
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=4e-15)
    check(F.gelu_bwd(r, cache), loss, x)


@SETTINGS
@given(b=dims, h=dims, t=dims, d=dims, seed=st.integers(0, 2**16))
def test_attention(b, h, t, d, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, h, t, d)) for _ in range(3))
    r = rng.normal(size=(b, h, t, d))
    loss = lambda: float((F.attention_fwd(q, k, v)[0] * r).sum())  # noqa: E731
    y, cache = F.attention_fwd(q, k, v)
    # reference: explicit causal softmax, row by row
    s = q @ k.swapaxes(-1, -2) / np.sqrt(d)
    s = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(y, p @ v, rtol=1e-10, atol=1e-12)
    dq, dk, dv = F.attention_bwd(r, cache)
    check(dq, loss, q)
    check(dk, loss, k)
    check(dv, loss, v)


@settings(max_examples=20, deadline=None)
@given(b=dims, h=dims, t=st.integers(1, 9), d=dims, block=st.integers(1, 4),
       drop=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_in_causal_blocks_is_the_plain_form(b, h, t, d, block, drop, seed):
    """Query blocks that skip the masked scores: the same p and y as the explicit causal softmax
    (dropped out or not) and gradients equal to central differences, for blocks that do not
    divide T too."""
    saved, functional.ATTENTION_BLOCK = functional.ATTENTION_BLOCK, block
    try:
        _check_attention(b, h, t, d, drop, seed)
    finally:
        functional.ATTENTION_BLOCK = saved


def _check_attention(b, h, t, d, drop, seed):
    rng = np.random.default_rng(seed)
    q, k, v, r = (rng.normal(size=(b, h, t, d)) for _ in range(4))
    keep, p_drop = (rng.random((b, h, t, t)) > 0.3, 0.3) if drop else (None, 0.0)
    y, cache = F.attention_fwd(q, k, v, keep, p_drop)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(d)
    s = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(cache[3].reshape(p.shape), p, rtol=1e-12, atol=1e-15)
    pd = p if keep is None else np.where(keep, p / (1 - p_drop), 0.0)
    np.testing.assert_allclose(y, pd @ v, rtol=1e-10, atol=1e-12)
    loss = lambda: float((F.attention_fwd(q, k, v, keep, p_drop)[0] * r).sum())  # noqa: E731
    for analytic, x in zip(F.attention_bwd(r, cache), (q, k, v)):
        check(analytic, loss, x)


def test_attention_is_causal():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 2, 5, 3)) for _ in range(3))
    y1, _ = F.attention_fwd(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 3:], v2[:, :, 3:] = 9.0, -9.0  # changing the future must not change the past
    y2, _ = F.attention_fwd(q, k2, v2)
    np.testing.assert_allclose(y1[:, :, :3], y2[:, :, :3])


@SETTINGS
@given(b=dims, t=dims, heads=st.integers(1, 3), d=dims, seed=st.integers(0, 2**16))
def test_mha_fused_qkv(b, t, heads, d, seed):
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(b, t, 3 * heads * d))
    r = rng.normal(size=(b, t, heads * d))
    loss = lambda: float((F.mha_fwd(qkv, heads)[0] * r).sum())  # noqa: E731
    _, cache = F.mha_fwd(qkv, heads)
    check(F.mha_bwd(r, cache), loss, qkv)


@SETTINGS
@given(n=st.integers(1, 6), v=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_cross_entropy(n, v, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, v)) * 3
    targets = rng.integers(0, v, n)
    targets[rng.random(n) < 0.3] = -100
    loss = lambda: float(F.cross_entropy_fwd(logits, targets)[0])  # noqa: E731
    value, cache = F.cross_entropy_fwd(logits, targets)
    valid = targets != -100
    if valid.any():
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        expect = -logp[np.arange(n), np.where(valid, targets, 0)][valid].mean()
        assert value == pytest.approx(expect, rel=1e-12)
    check(F.cross_entropy_bwd(1.0, cache), loss, logits)


def test_cross_entropy_large_logits_are_stable():
    logits = np.array([[1000.0, 0.0, -1000.0]])
    value, cache = F.cross_entropy_fwd(logits, np.array([0]))
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(F.cross_entropy_bwd(1.0, cache)).all()


@SETTINGS
@given(b=dims, t=dims, vocab=st.integers(2, 6), c=dims, seed=st.integers(0, 2**16))
def test_embedding(b, t, vocab, c, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t))
    w = rng.normal(size=(vocab, c))
    r = rng.normal(size=(b, t, c))
    loss = lambda: float((F.embedding_fwd(ids, w)[0] * r).sum())  # noqa: E731
    y, cache = F.embedding_fwd(ids, w)
    np.testing.assert_array_equal(y, w[ids])
    check(F.embedding_bwd(r, cache), loss, w)


def test_embedding_valid_mask_gives_zero_rows():
    w = np.arange(6.0).reshape(3, 2)
    ids = np.array([[0, 5, 2]])
    y, cache = F.embedding_fwd(ids, w, valid=ids < 3)
    np.testing.assert_array_equal(y[0, 1], 0.0)
    dw = F.embedding_bwd(np.ones_like(y), cache)
    np.testing.assert_array_equal(dw, [[1, 1], [0, 0], [1, 1]])


def test_positions_and_residual():
    pe = F.sinusoidal_positions(7, 6)
    assert pe.shape == (7, 6)
    np.testing.assert_allclose(pe[0, 0::2], 0.0)
    np.testing.assert_allclose(pe[0, 1::2], 1.0)
    rng = np.random.default_rng(1)
    x, pos, r = rng.normal(size=(2, 7, 6)), rng.normal(size=(7, 6)), rng.normal(size=(2, 7, 6))
    dx, dpos = F.add_positions_bwd(r)
    check(dpos, lambda: float((F.add_positions_fwd(x, pos)[0] * r).sum()), pos)
    da, db = F.residual_bwd(r)
    np.testing.assert_array_equal(da, r)
    np.testing.assert_array_equal(db, r)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_keep_dtype(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6)).astype(dtype)
    w = rng.normal(size=(6, 6)).astype(dtype)
    g, b = np.ones(6, dtype), np.zeros(6, dtype)
    assert F.linear_fwd(x, w)[0].dtype == dtype
    assert F.layernorm_fwd(x, g, b)[0].dtype == dtype
    assert F.gelu_fwd(x)[0].dtype == dtype
    q = x.reshape(2, 2, 4, 3)
    assert F.attention_fwd(q, q, q)[0].dtype == dtype
    y, cache = F.gelu_fwd(x)
    assert F.gelu_bwd(x, cache).dtype == dtype


# ---------------------------------------------------------------------------------------------
# Row-parallel kernels (minipar.nn.threads): the same numbers whatever the worker count, equal
# to the plain algebra written out here, and BLAS threads restored after every use.

def _plain_attention(q, k, v):
    """softmax(q k^T / sqrt(D) + causal) v over all heads at once, written out independently."""
    t = q.shape[-2]
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    s = np.where(np.triu(np.ones((t, t), dtype=bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_parallel_kernels_are_bitwise_the_same_for_any_worker_count(monkeypatch, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 70, 400)).astype(dtype)  # large enough to be split
    g, b = rng.standard_normal(400).astype(dtype), rng.standard_normal(400).astype(dtype)
    qkv = rng.standard_normal((3, 64, 3 * 48)).astype(dtype)
    dy, dqkv_in = rng.standard_normal(x.shape).astype(dtype), rng.standard_normal(
        (3, 64, 48)).astype(dtype)

    def run_all():
        y, c = F.layernorm_fwd(x, g, b)
        a, ca = F.gelu_fwd(x)
        m, cm = F.mha_fwd(qkv, 4)
        return [y, *F.layernorm_bwd(dy, c), a, F.gelu_bwd(dy, ca), m, F.mha_bwd(dqkv_in, cm)]

    outs = {}
    for n in ("1", "2", "3"):
        monkeypatch.setenv("MINIPAR_WORKERS", n)
        outs[n] = run_all()
    for n in ("2", "3"):
        for a, c in zip(outs["1"], outs[n]):
            np.testing.assert_array_equal(a, c)
    q, k, v = (F.split_heads(qkv[..., i * 48:(i + 1) * 48], 4) for i in range(3))
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(outs["3"][6], F.merge_heads(_plain_attention(q, k, v)),
                               rtol=tol, atol=tol)
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
    np.testing.assert_allclose(outs["3"][4], 0.5 * x * (1 + np.tanh(u)), rtol=tol, atol=tol)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(outs["3"][0], (x - mu) / np.sqrt(var + 1e-5) * g + b,
                               rtol=10 * tol, atol=10 * tol)


def test_map_rows_covers_each_row_once_and_raises():
    from minipar.nn import threads

    seen = np.zeros(1000, dtype=int)

    def mark(r):
        seen[r] += 1

    threads.map_rows(mark, 1000, 1 << 20, block=7, parts=3)
    assert (seen == 1).all()
    assert [(s.start, s.stop) for s in threads.row_slices(10, 3)] == [(0, 3), (3, 6), (6, 10)]

    def boom(r):
        if r.start >= 500:
            raise ValueError("piece failed")

    with pytest.raises(ValueError, match="piece failed"):
        threads.map_rows(boom, 1000, 1 << 20, parts=2)


def test_one_blas_thread_nests_and_restores(monkeypatch):
    """One BLAS thread inside (also for the worker threads a kernel uses), the previous count
    after the outermost exit; ranks of a thread world entering and leaving concurrently leave
    the count as they found it. (OpenBLAS may ignore a count set from a non-main thread, so
    inside a rank thread only the restoring is checked.)"""
    import threading

    threadpoolctl = pytest.importorskip("threadpoolctl")
    from minipar.nn import threads

    def blas():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = blas()
        assert before and before != [1] * len(before)
        with threads.one_blas_thread():
            seen = [blas()]
            with threads.one_blas_thread():
                seen.append(blas())
            seen.append(blas())
            worker = threading.Thread(target=lambda: seen.append(blas()))
            worker.start()
            worker.join()
        assert seen == [[1] * len(before)] * 4
        assert blas() == before
        barrier = threading.Barrier(3)

        def rank():
            with threads.one_blas_thread():
                barrier.wait()  # all three inside at once
            with threads.one_blas_thread():
                pass

        ranks = [threading.Thread(target=rank) for _ in range(3)]
        for t in ranks:
            t.start()
        for t in ranks:
            t.join()
        assert blas() == before


@pytest.mark.parametrize("decay", [0.0, 0.1, "mask"])
def test_adamw_in_slices_is_the_plain_formula_bit_for_bit(monkeypatch, decay):
    from minipar.nn.optim import adamw_update

    monkeypatch.setenv("MINIPAR_WORKERS", "2")
    rng = np.random.default_rng(3)
    n = 100_003  # several slices per worker, an odd tail
    p, g = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    m = rng.standard_normal(n, dtype=np.float32)
    v = np.abs(rng.standard_normal(n, dtype=np.float32))
    wd = (rng.random(n) > 0.5).astype(np.float32) / 10 if decay == "mask" else decay
    want = [a.copy() for a in (p, g, m, v)]
    for step in (1, 2):
        adamw_update(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd,
                     step=step)
        wp, wg, wm, wv = want  # the textbook form, one whole-array operation at a time
        wm[:] = 0.9 * wm + (1 - 0.9) * wg
        wv[:] = 0.99 * wv + (1 - 0.99) * (wg * wg)
        upd = wm / (1 - 0.9 ** step) / (np.sqrt(wv / (1 - 0.99 ** step)) + 1e-8)
        wp -= 1e-2 * (upd + wd * wp)
    for got, exp in zip((p, m, v), (want[0], want[2], want[3])):
        np.testing.assert_array_equal(got, exp)


def _gelu_on_host(x):
    return F.gelu_fwd(x)[0]


def test_kernels_still_split_in_a_forked_child(monkeypatch):
    """A child forked after the pool exists gets its own pool instead of waiting on threads
    that did not survive the fork."""
    import multiprocessing as mp

    from minipar.nn import threads

    monkeypatch.setenv("MINIPAR_WORKERS", "2")
    x = np.random.default_rng(0).standard_normal((64, 2048))
    want = F.gelu_fwd(x)[0]  # the parent's pool now exists
    with mp.get_context("fork").Pool(1) as pool:  # a picklable module function in the child
        got = pool.apply_async(_gelu_on_host, (x,)).get(timeout=60)
    np.testing.assert_array_equal(got, want)
    assert threads.workers() == 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blocked_gemm_is_the_product_and_reproducible(monkeypatch, dtype):
    """The linear layers' row-blocked GEMM: the same product as ``a @ b`` (close: BLAS may
    round a block's rows differently from the whole product's, and does on OpenBLAS's AVX-512
    float32 kernels) whatever the worker count, with and without the transposed operands of
    the backward; and the same bits every time for a given worker count (the blocks depend on
    the shape and the count, never on which worker takes them)."""
    rng = np.random.default_rng(5)
    shapes = [(2048, 384, 1152), (2048, 1536, 384), (300, 70, 500)]
    for n, k, m in shapes:
        x, w = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
        dy = rng.standard_normal((n, m)).astype(dtype)
        plain = (x @ w, dy @ w.T, x.T @ dy)
        tol = 1e-5 if dtype == "float32" else 1e-12
        for workers in ("1", "2", "3"):
            monkeypatch.setenv("MINIPAR_WORKERS", workers)
            runs = []
            for _ in range(2):
                y, cache = F.linear_fwd(x, w)
                runs.append((y, F.linear_bwd_input(dy, cache), F.linear_bwd_weight(dy, cache)[0]))
            for j, want in enumerate(plain):
                np.testing.assert_allclose(runs[0][j], want, rtol=tol,
                                           atol=tol * np.abs(want).max())
                for again in runs[1:]:
                    np.testing.assert_array_equal(again[j], runs[0][j])
