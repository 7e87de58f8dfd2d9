"""Greedy and beam-search decoding for the encoder-decoder, with a key/value cache.

Without a cache, step t runs the whole decoder over the t tokens written so far and keeps the
prediction at position t: the prefix is recomputed every step, O(T^2) token-layers in all.
With the cache, the source is encoded once, each cross-attention's keys and values are projected
from the memory once, and each decoder self-attention keeps the keys and values of the tokens
already written, so step t runs one new token through the decoder: O(T) token-layers. The
attention of that token over the cache is ``cross_attention_fwd`` with no mask (the cache holds
only the past); both decoders write the same tokens (``tests/test_encdec.py``).

Decoding uses the model's own layers, forward only, under a private microbatch key whose caches
are dropped after each step; it needs the parameters present (not ZeRO-3's shards) and works on
any tp group without sequence parallelism (a single new token cannot be split along T).
"""

from __future__ import annotations

from minipar import backend
from minipar.models.encdec import PAD, EncoderDecoder
from minipar.models.gpt import _drop_caches
from minipar.nn import functional as F

MB = "_decode"  # the microbatch key of decoding's forward passes


def _drop(model: EncoderDecoder) -> None:
    for unit in model.units:
        _drop_caches(unit, MB)


def greedy_uncached(model: EncoderDecoder, src, bos: int, steps: int):
    """(B, steps) greedy tokens for sources (B, S), recomputing the prefix at every step."""
    xp = backend.xp()
    b, t_max = src.shape[0], model.cfg.seq_len
    tgt = xp.zeros((b, t_max), dtype=src.dtype)  # (B, T): later positions are never seen
    tgt[:, 0] = bos
    out = xp.zeros((b, steps), dtype=src.dtype)  # (B, steps)
    for t in range(steps):
        preds, _ = model.evaluate(xp.concatenate([src, tgt], axis=1))  # (B, T) causal argmax
        out[:, t] = preds[:, t]
        if t + 1 < t_max:
            tgt[:, t + 1] = preds[:, t]
    return out


class CachedDecoder:
    """The decoder's state for decoding rows of sources (B, S) one token at a time: the memory's
    cross-attention keys/values (computed once) and each layer's self-attention cache."""

    def __init__(self, model: EncoderDecoder, src):
        if model.tgt_embed.sp:
            raise ValueError("cached decoding needs a model without sequence parallelism")
        self.model = model
        self.bias = F.padding_bias(src != PAD, model.dtype)  # (B, 1, S): source padding masked
        memory = model.encode(src, self.bias, MB)  # (B, S, C), once
        self.cross_kv = [layer.cross.sub.kv.forward(memory, MB) for layer in model.decoder]
        _drop(model)
        self.self_kv = [None] * len(model.decoder)  # per layer (B, t, 2C/tp): the past [K | V]
        self.t = 0  # tokens written so far

    def step(self, tok):
        """The decoder's output (B, 1, C) for the next tokens (B, 1); extends the caches."""
        model = self.model
        h = model.tgt_embed.at_position(tok, self.t, MB)  # (B, 1, C)
        for i, layer in enumerate(model.decoder):
            h = layer.self_attn.apply(h, MB, lambda a: _self_step(layer.self_attn.sub, a,
                                                                     self.self_kv, i))
            cross = layer.cross.sub
            h = layer.cross.apply(h, MB, lambda a: cross.attend(cross.q.forward(a, MB),
                                                                self.cross_kv[i], self.bias, MB))
            h = layer.mlp.forward(h, MB)  # (B, 1, C)
        self.t += 1
        return h

    def reorder(self, rows) -> None:
        """Keep the rows ``rows`` (B',) of every cache, in that order (beam search's parents)."""
        self.bias = self.bias[rows]
        self.cross_kv = [kv[rows] for kv in self.cross_kv]
        self.self_kv = [kv if kv is None else kv[rows] for kv in self.self_kv]


def greedy_cached(model: EncoderDecoder, src, bos: int, steps: int):
    """(B, steps) greedy tokens for sources (B, S): one new token per step through the decoder,
    the cross-attention keys/values computed once, the self-attention's kept per layer."""
    xp = backend.xp()
    dec = CachedDecoder(model, src)
    tok = xp.full((src.shape[0], 1), bos, dtype=src.dtype)  # (B, 1)
    out = []
    for _ in range(steps):
        tok, _ = model.head.evaluate(dec.step(tok))  # (B, 1)
        _drop(model)
        out.append(tok)
    return xp.concatenate(out, axis=1)  # (B, steps)


def log_probs(model: EncoderDecoder, h):
    """Log-probabilities (B, T, V) of the next token from decoder outputs (B, T, C), on a
    model whose head holds the whole vocabulary (tp 1)."""
    if model.head.tp.size != 1:
        raise ValueError("beam search scores the whole vocabulary: decode with a tp-1 copy")
    xp = backend.xp()
    logits = model.head.logits(h, MB)[..., :model.cfg.vocab_size]  # (B, T, V)
    _drop(model)
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))  # (B, T, V)


def beam_search(model: EncoderDecoder, src, bos: int, eos: int, steps: int, width: int):
    """(B, steps) tokens of the best of ``width`` beams per source (``beams``)."""
    return beams(model, src, bos, eos, steps, width)[0][:, 0]


def beams(model: EncoderDecoder, src, bos: int, eos: int, steps: int, width: int):
    """(tokens (B, width, steps), scores (B, width)): the ``width`` best outputs per source by
    summed log-probability, best first.

    Every step extends each live beam by every token, and keeps the ``width`` best of the
    width x V candidates; a beam that has written ``eos`` is finished and extends only by
    ``PAD`` at no cost, so finished and live beams compete on their total score (no length
    penalty). The decoder's caches follow the kept beams' parents. Width 1 is greedy decoding;
    a width of at least V^(steps - 1) keeps every prefix, so it finds the most probable output.
    """
    xp = backend.xp()
    b, v = src.shape[0], model.cfg.vocab_size
    dec = CachedDecoder(model, xp.repeat(src, width, axis=0))  # rows (B * width)
    score = xp.full((b, width), -xp.inf)  # (B, width): only beam 0 is live at first
    score[:, 0] = 0.0
    seqs = xp.zeros((b, width, 0), dtype=src.dtype)  # (B, width, t)
    done = xp.zeros((b, width), dtype=bool)
    tok = xp.full((b * width, 1), bos, dtype=src.dtype)
    for _ in range(steps):
        lp = log_probs(model, dec.step(tok))[:, 0].reshape(b, width, v)  # (B, width, V)
        lp = xp.where(done[..., None], -xp.inf, lp)
        lp[..., PAD] = xp.where(done, 0.0, lp[..., PAD])  # finished: PAD at no cost
        cand = (score[..., None] + lp).reshape(b, width * v)  # (B, width * V)
        best = xp.argsort(-cand, axis=1, kind="stable")[:, :width]  # (B, width)
        parent, new = best // v, best % v  # (B, width)
        score = xp.take_along_axis(cand, best, axis=1)
        seqs = xp.concatenate([xp.take_along_axis(seqs, parent[..., None], axis=1),
                               new[..., None]], axis=2)  # (B, width, t + 1)
        done = xp.take_along_axis(done, parent, axis=1) | (new == eos)
        dec.reorder((parent + xp.arange(b)[:, None] * width).reshape(-1))
        tok = new.reshape(-1, 1).astype(src.dtype)
    return seqs, score  # sorted by score: the best beam first


def _self_step(attn, a, self_kv: list, i: int):
    """The causal self-attention of one new token over layer i's cache, which it extends."""
    xp = backend.xp()
    qkv = attn.qkv.forward(a, MB)  # (B, 1, 3C/tp) laid out [Q | K | V]
    c = qkv.shape[-1] // 3
    new = qkv[..., c:]  # (B, 1, 2C/tp)
    self_kv[i] = new if self_kv[i] is None else xp.concatenate([self_kv[i], new], axis=1)
    past = self_kv[i].shape[1]
    no_mask = xp.zeros((a.shape[0], 1, past), dtype=a.dtype)  # (B, 1, t): all past visible
    y, _ = F.cross_attention_fwd(qkv[..., :c], self_kv[i], attn.local_heads, no_mask)
    return attn.proj.forward(y, MB)  # (B, 1, C)
