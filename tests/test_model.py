"""The whole model's backward against central differences; optimizer and schedule arithmetic."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minipar.config import ModelConfig
from minipar.dist.comm import local_comm
from minipar.nn.memory import live_microbatches
from minipar.nn.module import BuildContext
from minipar.models.gpt import build_chunks
from minipar.nn.optim import AdamW, SGD, clip_coefficient, lr_at
from minipar.sim.costmodel import param_count
import on_device as dev


def build(cfg, dtype="float64", seed=0):
    return build_chunks(cfg, BuildContext(seed, dtype, local_comm("tp")))[0]


def loss_of(model, x, y):
    value = float(model.forward(x, "probe", y))
    _drop(model)
    return value


def _drop(module):
    module._cache.pop("probe", None)
    for child in module.children():
        _drop(child)


def derivative(f, h: float = 1e-5) -> float:
    """f'(0) by the five-point central difference: error O(h^4), so a very curved loss (a
    LayerNorm over few features) is measured far better than by the two-point rule, whose O(h^2)
    error was 1e-2 at h = 1e-3."""
    return (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 5), heads=st.integers(1, 3), d_head=st.integers(1, 3),
       layers=st.integers(1, 2), tie=st.booleans(), pos=st.sampled_from(["learned", "sinusoidal"]),
       seed=st.integers(0, 1000))
def test_model_gradients_match_central_differences(b, t, heads, d_head, layers, tie, pos, seed):
    # LayerNorm over 2 or 3 features is nearly a sign function (its output is +-1 for two):
    # so curved that no finite difference measures it; the kernel tests check LayerNorm alone.
    assume(heads * d_head >= 4)
    cfg = ModelConfig(vocab_size=7, seq_len=t, n_layers=layers, d_model=heads * d_head,
                      n_heads=heads, tie_weights=tie, pos=pos)
    model = build(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 7, (b, t))
    y = rng.integers(0, 7, (b, t))
    y[rng.random((b, t)) < 0.3] = -100
    x, y = dev.up((x, y))
    model.forward(x, 0, y)
    model.backward(None, 0)
    assert live_microbatches(model) == 0  # every cache freed by backward
    params = model.params()
    assert sum(p.data.size for p in params) == param_count(cfg)
    # Directional derivative along a random direction over all parameters at once...
    dirs = dev.up([rng.normal(size=p.data.shape) for p in params])
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, dirs))

    def along(s: float) -> float:  # the loss at params + s * dirs
        for p, d in zip(params, dirs):
            p.data += s * d
        value = loss_of(model, x, y)
        for p, d in zip(params, dirs):
            p.data -= s * d
        return value

    numeric = derivative(along)
    assert abs(numeric - analytic) <= 1e-6 * max(abs(numeric), 1e-3)
    # ...and entry by entry for a few entries of every parameter.
    for p in params:
        flat, gflat = p.data.reshape(-1), p.grad.reshape(-1)
        for i in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            old = flat[i]

            def at(s: float) -> float:
                flat[i] = old + s
                return loss_of(model, x, y)

            num = derivative(at)
            flat[i] = old
            g = float(gflat[i])
            assert abs(num - g) <= 1e-6 * max(abs(num), abs(g)) + 1e-9, p.name


def test_gradients_accumulate_over_microbatches():
    cfg = ModelConfig(vocab_size=5, seq_len=4, n_layers=1, d_model=8, n_heads=2)
    rng = np.random.default_rng(0)
    x, y = dev.up((rng.integers(0, 5, (4, 4)), rng.integers(0, 5, (4, 4))))
    whole = build(cfg)
    whole.forward(x, 0, y)
    whole.backward(None, 0)
    split = build(cfg)
    for mb in range(2):  # two halves, each normalised by the whole batch's token count
        split.forward(x[2 * mb:2 * mb + 2], mb, y[2 * mb:2 * mb + 2], normalizer=16)
    for mb in (1, 0):  # backward in any order
        split.backward(None, mb)
    for p, q in zip(whole.params(), split.params()):
        np.testing.assert_allclose(*dev.down((p.grad, q.grad)), rtol=1e-10, atol=1e-14)


def test_float32_model_runs_and_keeps_dtype():
    cfg = ModelConfig(vocab_size=11, seq_len=6, n_layers=2, d_model=16, n_heads=4)
    model = build(cfg, dtype="float32")
    x = dev.up(np.zeros((2, 6), dtype=np.int64))
    loss = model.forward(x, 0, x)
    model.backward(None, 0)
    assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32
               for p in model.params())
    assert math.isfinite(float(loss))


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = ModelConfig(vocab_size=5, seq_len=4, n_layers=1, d_model=8, n_heads=2)
    a, b, c = build(cfg, seed=1), build(cfg, seed=1), build(cfg, seed=2)
    for p, q, r in zip(a.params(), b.params(), c.params()):
        np.testing.assert_array_equal(*dev.down((p.data, q.data)))
        if p.data.std() > 0:
            assert not np.array_equal(p.data, r.data)


def test_adamw_matches_a_hand_computed_step():
    from minipar.nn.module import Param

    p = Param("w", dev.up(np.array([1.0, -2.0])))
    p.grad = dev.up(np.array([0.5, 0.25]))
    opt = AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt.step()
    # step 1: m = 0.1 g, v = 0.01 g^2, so the bias-corrected mhat = g and vhat = g^2
    mhat, vhat = np.array([0.5, 0.25]), np.array([0.25, 0.0625])
    expect = np.array([1.0, -2.0]) - 0.1 * (mhat / (np.sqrt(vhat) + 1e-8)
                                            + 0.1 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(dev.down(p.data), expect, rtol=1e-12)
    # step 2 with a zero gradient: m decays, v decays, bias corrections change
    p.grad = dev.up(np.zeros(2))
    before = dev.down(p.data).copy()
    opt.step()
    m = 0.9 * 0.1 * np.array([0.5, 0.25])
    v = 0.99 * 0.01 * np.array([0.25, 0.0625])
    upd = (m / (1 - 0.81)) / (np.sqrt(v / (1 - 0.99**2)) + 1e-8) + 0.1 * before
    np.testing.assert_allclose(dev.down(p.data), before - 0.1 * upd, rtol=1e-12)


def test_sgd_momentum_step_and_no_decay_params():
    from minipar.nn.module import Param

    w = Param("w", dev.up(np.array([1.0])))
    b = Param("b", dev.up(np.array([1.0])), decay=False)
    opt = SGD([w, b], lr=0.5, momentum=0.9, weight_decay=0.2)
    for _ in range(2):
        w.grad, b.grad = dev.up((np.array([1.0]), np.array([1.0])))
        opt.step()
    # w: step 1 buf=1 -> 1 - 0.5 (1 + 0.2) = 0.4; step 2 buf=1.9 -> 0.4 - 0.5 (1.9 + 0.08)
    np.testing.assert_allclose(dev.down(w.data), [0.4 - 0.5 * (1.9 + 0.2 * 0.4)])
    np.testing.assert_allclose(dev.down(b.data), [1.0 - 0.5 - 0.5 * 1.9])


def test_clip_coefficient():
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(0.25, rel=1e-6)
    assert clip_coefficient(4.0, 0.0) == 1.0  # 0 disables clipping


def test_lr_schedule_endpoints():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    mid = lr_at(55, 1.0, 10, 100)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(lr_at(s, 1.0, 10, 100) >= lr_at(s + 1, 1.0, 10, 100) for s in range(10, 100))
