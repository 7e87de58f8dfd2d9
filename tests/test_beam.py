"""Beam search against an independent brute force: every output of a tiny vocabulary scored by
the uncached model, the most probable one found by exhaustive search."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.config import ModelConfig
from minipar.models.decoding import beam_search, beams, greedy_cached
from minipar.models.encdec import PAD
from minipar.models.gpt import _drop_caches
from minipar.nn.memory import live_microbatches
from test_encdec import build
import on_device as dev

BOS, EOS = 1, 2


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def forward_log_probs(model, src, ys):
    """Log-probabilities (N, steps) of outputs ys (N, steps) for one source row (S,) or sources
    (N, S), by one full teacher-forced forward pass (no cache)."""
    n, steps = ys.shape
    src = np.broadcast_to(src, (n, src.shape[-1]))
    dec_in = np.zeros((n, model.cfg.seq_len), dtype=np.int64)  # <s>, ys but its last, padding
    dec_in[:, 0], dec_in[:, 1:steps] = BOS, ys[:, :-1]
    h = model.hidden(dev.up(np.concatenate([src, dec_in], axis=1)), "brute")
    logits = dev.down(model.head.logits(h, "brute"))[:, :steps, :model.cfg.vocab_size]
    for unit in model.units:
        _drop_caches(unit, "brute")
    return np.take_along_axis(log_softmax(logits), ys[..., None], axis=2)[..., 0]


def scores(model, src, ys, eos=EOS):
    """Each output's score: its log-probabilities summed up to and including its first eos."""
    steps = ys.shape[1]
    first = np.where((ys == eos).any(axis=1), (ys == eos).argmax(axis=1), steps - 1)
    return (forward_log_probs(model, src, ys) * (np.arange(steps) <= first[:, None])).sum(1)


def brute_outputs(v: int, steps: int, eos: int):
    """Every output (N, steps) whose tokens after its first eos are PAD."""
    return np.array([y for y in itertools.product(range(v), repeat=steps)
                     if all(t == PAD for t in (y[y.index(eos) + 1:] if eos in y else ()))])


def brute_force(model, src, v: int, steps: int, eos=EOS):
    """(best outputs (B, steps), their scores (B,)): the exhaustive argmax over every output
    whose tokens after its first eos are PAD."""
    ys = brute_outputs(v, steps, eos)
    best, best_score = [], []
    for row in dev.down(src):
        total = scores(model, row, ys, eos)  # (N,)
        best.append(ys[total.argmax()])
        best_score.append(total.max())
    return np.array(best), np.array(best_score)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["pre", "post"]),
       eos=st.sampled_from([EOS, -1]))
def test_full_width_beam_finds_the_exhaustive_argmax(seed, norm, eos):
    """eos -1 (no token ends a row) makes every output as long as it can be, so the last step
    reads a self-attention cache that beam search must have reordered."""
    v, steps = 4, 3
    cfg = ModelConfig(vocab_size=v, seq_len=4, n_layers=2, d_model=16, n_heads=4,
                      arch="encdec", src_len=3, norm=norm)
    model = build(cfg, seed=seed)
    for p in model.params():  # larger weights: peaked, varied next-token distributions
        p.data *= 6
    rng = np.random.default_rng(seed)
    src = dev.up(rng.integers(1, v, size=(3, 3)))
    want, want_score = brute_force(model, src, v, steps, eos)
    got = dev.down(beam_search(model, src, BOS, eos, steps, width=v ** steps))
    np.testing.assert_allclose(scores(model, dev.down(src), got, eos), want_score, rtol=1e-9)
    np.testing.assert_array_equal(got, want)
    assert live_microbatches(model) == 0
    every, every_score = beams(model, src, BOS, eos, steps, width=v ** steps)  # (B, W, steps)
    for row, outs, score in zip(dev.down(src), dev.down(every), dev.down(every_score)):
        live = np.isfinite(score)  # all outputs that end in PAD after eos, each scored once
        assert live.sum() == len(brute_outputs(v, steps, eos))
        np.testing.assert_allclose(score[live], scores(model, row, outs[live], eos), rtol=1e-9)
    narrow = dev.down(beam_search(model, src, BOS, eos, steps, width=2))
    assert (scores(model, dev.down(src), narrow, eos) <= want_score + 1e-9).all()


def test_width_one_is_greedy_decoding():
    cfg = ModelConfig(vocab_size=7, seq_len=5, n_layers=2, d_model=16, n_heads=4,
                      arch="encdec", src_len=4)
    model = build(cfg, seed=3)
    for p in model.params():
        p.data *= 6
    src = dev.up(np.random.default_rng(3).integers(1, 7, size=(8, 4)))
    greedy = dev.down(greedy_cached(model, src, BOS, 5))
    after_eos = np.cumsum(greedy == EOS, axis=1) - (greedy == EOS) > 0
    np.testing.assert_array_equal(dev.down(beam_search(model, src, BOS, EOS, 5, 1)),
                                  np.where(after_eos, PAD, greedy))
