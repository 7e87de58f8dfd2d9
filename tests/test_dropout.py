"""Dropout's masks checked from outside (minipar.nn.dropout): each element is the hand-computed
Philox4x64-10 draw at its global index, any block is the slice of the whole tensor's mask, the
kept fraction and the mean are what P says, the kernels' backward is the chain rule, the whole
model's gradient is central differences, evaluation draws nothing, and the activation meter
counts the kept masks. The layouts' equality with the serial run is tests/test_dropout_layouts.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import backend
from minipar.compare import random_batches
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.models.blocks import Block
from minipar.nn import functional
from minipar.nn.dropout import MaskSource, keep_mask, site_key
from minipar.nn.memory import activation_breakdown
from minipar.nn.module import BuildContext
from minipar.sim.costmodel import block_activation_terms
from minipar.tasks import IGNORE
import inproc
import on_device as dev
from test_functional import check

F = dev.OnBackend(functional)
M64 = (1 << 64) - 1


# ----------------------------------------------------------- Philox4x64-10 written out by hand
def philox4x64(counter: int, key) -> list[int]:
    """Salmon et al. 2011, Philox4x64 with 10 rounds, in Python integers: four 64-bit outputs
    of one 256-bit counter under a 128-bit key (the multipliers and Weyl constants of the
    paper; the key is bumped before every round but the first)."""
    c = [(counter >> (64 * i)) & M64 for i in range(4)]
    k0, k1 = int(key[0]), int(key[1])
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B97F4A7C15) & M64, (k1 + 0xBB67AE8584CAA73B) & M64
        p0, p1 = 0xD2E7470EE14C6C93 * c[0], 0xCA5A826395121157 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k0, p1 & M64, (p0 >> 64) ^ c[3] ^ k1, p0 & M64]
    return c


def kept_by_hand(key, p: float, g: int) -> bool:
    """Element g: 32-bit word g of the stream (low half of output 0 first), >= floor(P 2^32)."""
    out = philox4x64(g // 8, key)[(g % 8) // 2]
    return (out >> (32 * (g % 2))) & 0xFFFFFFFF >= math.floor(p * 2 ** 32)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), ndim=st.integers(2, 4), p=st.floats(0.05, 0.95),
       seed=st.integers(0, 2 ** 31), step=st.integers(0, 10 ** 6))
def test_each_element_is_the_hand_built_philox_draw(data, ndim, p, seed, step):
    """Any element of any block: its global C-order index, computed here by hand, gives the
    word the mask was cut at."""
    full = [data.draw(st.integers(1, 6)) for _ in range(ndim)]  # full[0]: the global rows
    start = [data.draw(st.integers(0, n - 1)) for n in full]
    shape = [data.draw(st.integers(1, n - s)) for n, s in zip(full, start)]
    key = site_key(seed, step, "blocks.3.attn.probs")
    mask = keep_mask(key, p, tuple(shape), tuple(start), tuple(full[1:]))
    for _ in range(4):
        local = [data.draw(st.integers(0, n - 1)) for n in shape]
        g = 0
        for axis in range(ndim):  # global index = sum (start + local) x (sizes of later axes)
            g = g * full[axis] + start[axis] + local[axis]
        assert bool(mask[tuple(local)]) == kept_by_hand(key, p, g)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), ndim=st.integers(1, 4), p=st.floats(0.0, 0.99))
def test_a_block_is_its_slice_of_the_whole_mask(data, ndim, p):
    """What a rank draws for its heads, tokens or rows equals cutting the serial mask."""
    full = tuple(data.draw(st.integers(1, 7)) for _ in range(ndim))
    start = tuple(data.draw(st.integers(0, n - 1)) for n in full)
    shape = tuple(data.draw(st.integers(1, n - s)) for n, s in zip(full, start))
    key = site_key(1, 2, "embed.out")
    whole = keep_mask(key, p, full, (0,) * ndim, full[1:])
    part = keep_mask(key, p, shape, start, full[1:])
    cut = tuple(slice(s, s + n) for s, n in zip(start, shape))
    np.testing.assert_array_equal(part, whole[cut])


def sigmas(count: int, n: int, prob: float) -> float:
    return abs(count - n * prob) / math.sqrt(n * prob * (1 - prob))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_and_the_mean_are_what_p_says(p):
    """2^20 draws: the kept count is within 5 binomial standard deviations of n (1 - P); two
    sites (and two steps) agree as often as independent masks do, (1-P)^2 + P^2; and the
    output's mean is the input's (E[y] = x), every element 0 or x / (1 - P)."""
    n = 1 << 20
    a = keep_mask(site_key(0, 0, "a"), p, (n,), (0,), ())
    assert sigmas(int(a.sum()), n, 1 - p) < 5
    same = (1 - p) ** 2 + p ** 2
    for other in (site_key(0, 0, "b"), site_key(0, 1, "a")):
        b = keep_mask(other, p, (n,), (0,), ())
        assert sigmas(int((a == b).sum()), n, same) < 5
    x = np.full(n, 3.0)
    y = F.dropout_fwd(x, a, p)
    assert set(np.unique(y).tolist()) <= {0.0, 3.0 * (1.0 / (1 - p))}  # the kernel's scale
    sd = 3.0 * math.sqrt(p / (1 - p) / n)  # standard deviation of the mean of y
    assert abs(y.mean() - 3.0) < 5 * sd


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 4), d=st.integers(1, 3),
       p=st.floats(0.1, 0.7), seed=st.integers(0, 2 ** 16))
def test_attention_with_dropped_probabilities_is_the_chain_rule(b, h, t, d, p, seed):
    """y = (softmax(s) * keep / (1-P)) v, written out here, and dq, dk, dv by central
    differences, for a fixed mask."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, h, t, d)) for _ in range(3))
    keep = rng.random((b, h, t, t)) >= p
    r = rng.normal(size=(b, h, t, d))
    y, cache = F.attention_fwd(q, k, v, keep, p)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(d)
    s = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, s)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(y, (probs * keep / (1 - p)) @ v, rtol=1e-10, atol=1e-12)
    loss = lambda: float((F.attention_fwd(q, k, v, keep, p)[0] * r).sum())  # noqa: E731
    dq, dk, dv = F.attention_bwd(r, cache)
    check(dq, loss, q)
    check(dk, loss, k)
    check(dv, loss, v)


# --------------------------------------------------------------------------- the whole model
CFG = ModelConfig(vocab_size=7, seq_len=4, n_layers=2, d_model=8, n_heads=2, dropout=0.3)


def serial_engine(cfg: ModelConfig, seed: int = 0) -> Engine:
    return Engine(cfg, ParallelConfig(), Mesh.serial(), seed=seed, dtype="float64")


def set_entry(param, host, i: int, value: float) -> None:
    """Entry i of ``param`` set to ``value``, in place (on any backend, through a host copy)."""
    host.flat[i] = value
    param.data[...] = dev.up(host)


def test_model_gradient_with_dropout_is_central_differences():
    """The model's backward with every dropout site on, against central differences of its
    loss (the masks are fixed by the step, so the loss is a function of the weights): an
    independent check that backward multiplies by the forward's masks and scale."""
    engine = serial_engine(CFG)
    (x, y), = random_batches(CFG, 1, 3, seed=1)
    norm = int((y != IGNORE).sum())
    loss = lambda: engine.gradients(x, y, norm, step=5)  # noqa: E731
    loss()
    grads = {p.name: dev.down(p.grad).copy() for p in engine.params}  # before any perturbation
    for p in engine.params:
        if p.name not in ("embed.w", "pos", "blocks.0.attn.qkv.w", "blocks.1.mlp.fc.w",
                          "blocks.1.attn.proj.w"):
            continue
        grad, host = grads[p.name], dev.down(p.data).copy()
        for i in np.random.default_rng(0).choice(host.size, 6, replace=False):
            old = host.flat[i]
            up, down = (set_entry(p, host, i, old + d) or loss() for d in (1e-6, -1e-6))
            set_entry(p, host, i, old)
            assert abs((up - down) / 2e-6 - grad.flat[i]) < 1e-7 + 1e-6 * abs(grad.flat[i]), \
                (p.name, i)


def test_dropout_acts_in_training_and_never_in_evaluation():
    """The same weights with P = 0.5 and P = 0: training losses differ (the masks act), the
    evaluation is the same bits, and evaluating twice gives the same result."""
    cfg_on, cfg_off = (ModelConfig(**{**CFG.__dict__, "dropout": p}) for p in (0.5, 0.0))
    on, off = serial_engine(cfg_on), serial_engine(cfg_off)
    batches = random_batches(CFG, 2, 4, seed=2)
    assert on.evaluate(batches) == off.evaluate(batches) == on.evaluate(batches)
    x, y = batches[0]
    norm = int((y != IGNORE).sum())
    assert on.gradients(x, y, norm) != off.gradients(x, y, norm)
    assert on.gradients(x, y, norm) == on.gradients(x, y, norm)  # a step's masks are fixed
    assert on.gradients(x, y, norm, step=1) != on.gradients(x, y, norm, step=2)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_the_activation_meter_counts_the_kept_masks(tp, sp):
    """A block with dropout keeps, besides what it keeps without: the attention mask, one byte
    per score of its heads, and one byte per element of each residual-stream mask (its T/tp
    tokens under SP). Korthikanti et al.'s table also keeps the dropped probabilities (e bytes a
    score); minipar recomputes them from p and the mask, so it keeps exactly that much less."""
    cfg, b, e = ModelConfig(vocab_size=7, seq_len=8, n_layers=2, d_model=16, n_heads=4), 3, 8
    full = np.random.default_rng(0).normal(size=(b, cfg.seq_len, cfg.d_model))

    def rank(comm):
        masks = MaskSource(0, 0.2)
        masks.begin_step(0, [0])
        block = Block(BuildContext(0, "float64", comm, sp, masks), "blocks.0", cfg)
        t = cfg.seq_len // tp if sp else cfg.seq_len
        block.forward(dev.up(full[:, comm.rank * t if sp else 0:][:, :t].copy()))
        return activation_breakdown(block)

    tokens = cfg.seq_len // tp if sp else cfg.seq_len
    scores = b * (cfg.n_heads // tp) * cfg.seq_len ** 2
    want = block_activation_terms(cfg, b, tp, sp, value_bytes=e, dropout=False,
                                  layernorm_rstd=True)
    want["attn"] += scores
    want["drop_attn"] = want["drop_mlp"] = b * tokens * cfg.d_model
    paper = block_activation_terms(cfg, b, tp, sp, value_bytes=e, dropout=True,
                                   layernorm_rstd=True)
    for got in run_threads(rank, tp):
        assert got == want
        assert sum(got.values()) == sum(paper.values()) - e * scores


# ------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "1.5"])
def test_a_bad_dropout_is_one_line_on_every_rank(value):
    codes, out, err = inproc.train(["--dropout", value, "--steps", "1", "--quiet"], n=2)
    assert codes == [2, 2]
    assert err.strip().splitlines() == [
        f"minipar.train: error: --dropout must be a probability in [0, 1), got {float(value)}"]


def test_the_command_trains_with_dropout_in_a_layout():
    codes, out, err = inproc.train(["--dropout", "0.1", "--model", "tiny", "--tp", "2",
                                    "--sequence-parallel", "--steps", "3", "--batch-size", "8",
                                    "--eval-every", "3", "--quiet"], n=2)
    assert codes == [0, 0], err
    assert "exact match" in out


def test_resume_with_dropout_continues_the_uninterrupted_losses(tmp_path):
    """The masks are keyed by the step, which a checkpoint restores: 2 steps at tp 2 + SP,
    saved, then 2 more at dp 2 give the losses of 4 uninterrupted serial steps. A checkpoint
    also resumes with another P (dropout is how a run trains, not what the weights are)."""
    import json

    base = ["--quiet", "--dtype", "float64", "--model", "tiny", "--eval-every", "100",
            "--batch-size", "8", "--dropout", "0.2"]
    full, first, second = (tmp_path / f"{n}.json" for n in ("full", "a", "b"))
    ckpt = str(tmp_path / "run")
    assert inproc.train([*base, "--steps", "4", "--summary", str(full)])[0] == [0]
    codes, _, err = inproc.train([*base, "--tp", "2", "--sequence-parallel", "--steps", "2",
                                  "--save", ckpt, "--summary", str(first)], n=2)
    assert codes == [0, 0], err
    codes, _, err = inproc.train([*base, "--dp", "2", "--steps", "4", "--resume", ckpt,
                                  "--summary", str(second)], n=2)
    assert codes == [0, 0], err
    got = [json.loads(p.read_text())["losses"] for p in (first, second, full)]
    np.testing.assert_allclose(got[0] + got[1], got[2], rtol=1e-9)
    codes, _, err = inproc.train([*base[:-1], "0", "--steps", "3", "--resume", ckpt])
    assert codes == [0], err
