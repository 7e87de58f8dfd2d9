"""Greedy decoding for the encoder-decoder, with and without a key/value cache.

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


def greedy_cached(model: EncoderDecoder, src, bos: int, steps: int):
    """(B, steps) greedy tokens for sources (B, S): one new token per step through the decoder,
    the cross-attention keys/values computed once, the self-attention's kept per layer."""
    if model.tgt_embed.sp:
        raise ValueError("cached decoding needs a model without sequence parallelism")
    xp = backend.xp()
    bias = F.padding_bias(src != PAD, model.dtype)  # (B, 1, S): source padding masked
    memory = model.encode(src, bias, MB)  # (B, S, C), once
    cross_kv = [layer.cross.sub.kv.forward(memory, MB) for layer in model.decoder]
    _drop(model)
    self_kv = [None] * len(model.decoder)  # per layer (B, t, 2C/tp): [K | V] of the past
    emb = model.tgt_embed
    table = emb.pos.data if emb.pos is not None else emb.table  # (T, C)
    tok = xp.full((src.shape[0], 1), bos, dtype=src.dtype)  # (B, 1)
    out = []
    for t in range(steps):
        h = emb.tok.forward(tok, MB) + table[t]  # (B, 1, C)
        for i, layer in enumerate(model.decoder):
            h = layer.self_attn.apply(h, MB, lambda a: _self_step(layer.self_attn.sub, a,
                                                                     self_kv, i))
            cross = layer.cross.sub
            h = layer.cross.apply(h, MB, lambda a: cross.attend(cross.q.forward(a, MB),
                                                                cross_kv[i], bias, MB))
            h = layer.mlp.forward(h, MB)  # (B, 1, C)
        tok, _ = model.head.evaluate(h)  # (B, 1)
        _drop(model)
        out.append(tok)
    return xp.concatenate(out, axis=1)  # (B, steps)


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
