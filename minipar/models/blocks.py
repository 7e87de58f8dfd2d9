"""Attention, MLP and the Transformer block, built from tensor-parallel layers.

One code for every layout: on a tp group of one rank the column/row-parallel layers are plain
linears and their collectives are no-ops, so the serial model is exactly this code. Dropout
(attention probabilities, and each block's output before the residual add) draws this rank's
slice of the serial run's masks (``minipar.nn.dropout``); with P = 0 it is not there at all.

Activation recomputation (Korthikanti et al. 2022, ``BuildContext.recompute``) trades compute
for memory and changes no number, since a rerun forward gives the same bits (dropout masks too:
they are addressed, not drawn in sequence): "selective" keeps
the attention's [Q|K|V] but not its core (scores, softmax, their use on V), rerun in backward
(``Attention``); "full" keeps only each block's input and reruns the whole block's forward in
backward (``Block``). The attention kernel is the plain one (``functional.mha_fwd``) or the
blockwise one (``minipar.nn.blockwise``), which keeps O(T) per head instead of the (T, T) softmax.
Under context parallelism (``ctx.cp`` of two or more ranks) it is ring attention
(``minipar.parallel.context``) over this rank's T/cp tokens, whichever kernel was named: the
ring is blockwise by construction.
"""

from __future__ import annotations

import math

from minipar.nn import blockwise, flops
from minipar.nn import functional as F
from minipar.nn.dropout import Dropout
from minipar.nn.module import LayerNorm, Module, walk
from minipar.parallel import context
from minipar.parallel.tensor import ColumnParallelLinear, RowParallelLinear

INIT_STD = 0.02  # GPT-2's weight scale (Radford et al. 2019)


def weight_std(cfg, fan_in: int, residual: bool = False) -> float:
    """The standard deviation a linear's weight is drawn with (its bias starts at 0).

    "gpt2" (Radford et al. 2019): 0.02 for every matrix, and 0.02 / sqrt(2 L) for the residual
    projections (the last linear of each sublayer), so that the residual stream keeps its size
    over L blocks. "fan-in" (LeCun et al. 1998): 1 / sqrt(fan_in), which carries a unit-scale
    input through the linear at unit scale; the encoder-decoder's default in the train command,
    with token embeddings at unit scale (``embed_scale``). Its attention scores start at O(1),
    not at nearly 0, so a head can tell its keys apart from the first step; ``--task qa``
    learns only so."""
    if cfg.weight_init == "fan-in":
        return 1.0 / math.sqrt(fan_in)
    return INIT_STD / math.sqrt(2 * cfg.n_layers) if residual else INIT_STD


def embed_std(cfg) -> float:
    """Token tables: 0.02 ("gpt2"), or 1 / sqrt(d_model) ("fan-in": the head's fan-in scale, so
    a table tied to the head starts as an untied head would)."""
    return weight_std(cfg, cfg.d_model) if cfg.weight_init == "fan-in" else INIT_STD


def embed_scale(cfg) -> float | None:
    """What the embedding multiplies its table's rows by: sqrt(d_model) under "fan-in", as the
    paper does (Vaswani et al. 2017, section 3.4), so that tokens enter at unit scale; None
    (no multiplier) under "gpt2"."""
    return math.sqrt(cfg.d_model) if cfg.weight_init == "fan-in" else None


class Attention(Module):
    """Causal multi-head self-attention; heads split over tp (QKV column-, output row-parallel)."""

    def __init__(self, ctx, name: str, cfg):
        super().__init__()
        c = cfg.d_model
        self.local_heads = cfg.n_heads // ctx.tp.size
        self.n_heads, self.tp, self.masks = cfg.n_heads, ctx.tp, ctx.dropout
        self.site = f"{name}.probs"  # the attention-probability dropout's stream
        self.qkv = ColumnParallelLinear(ctx, f"{name}.qkv", c, 3 * c, weight_std(cfg, c),
                                        blocks=3)
        self.proj = RowParallelLinear(ctx, f"{name}.proj", c, c, weight_std(cfg, c, True))
        self.blockwise = ctx.attention == "blockwise"
        self.selective = ctx.recompute == "selective"
        cp = ctx.cp
        self.ring = context.Ring(cp, ctx.cp_split, cfg.seq_len) if cp and cp.size > 1 else None

    def core(self, qkv, mb):
        """The attention core, (B, T, 3 C / tp) -> (B, T, C / tp) and its cache."""
        if self.ring is not None:  # the ring draws each tile's mask by its global tokens
            return context.mha_fwd(qkv, self.local_heads, self.ring,
                                   self._probs_tiles(self.ring.seq_len, mb))
        if self.blockwise:  # each tile's mask drawn in the kernel, again in backward
            return blockwise.mha_fwd(qkv, self.local_heads,
                                     drop=self._probs_tiles(qkv.shape[1], mb))
        keep = self._probs_keep(qkv.shape[0], qkv.shape[1], mb)  # (B, H / tp, T, T) or None
        p = 0.0 if keep is None else self.masks.p
        return F.mha_fwd(qkv, self.local_heads, keep, p)

    def forward(self, x, mb=0):
        qkv = self.qkv.forward(x, mb)  # (B, T, 3 C / tp)
        y, cache = self.core(qkv, mb)  # (B, T, C / tp)
        self.save(mb, qkv if self.selective else cache)  # selective: [Q|K|V] only
        return self.proj.forward(y, mb)  # (B, T, C)

    def _probs_keep(self, b: int, t: int, mb):
        """This rank's heads' slice of the (B, H, T, T) mask, or None when dropout is off."""
        if self.masks is None:
            return None
        h0 = self.tp.rank * self.local_heads  # this rank's first head of all H
        return self.masks.keep(self.site, mb, (b, self.local_heads, t, t), (h0, 0, 0),
                               (self.n_heads, t, t))  # (B, H / tp, T, T)

    def _probs_tiles(self, t: int, mb):
        """The same mask as ``_probs_keep``, addressed by tile for a blockwise kernel or the
        ring (``dropout.TileMasks``; sequence length t), or None when dropout is off."""
        if self.masks is None:
            return None
        h0 = self.tp.rank * self.local_heads
        return self.masks.tiles(self.site, mb, self.local_heads, h0, self.n_heads, t)

    def backward(self, dy, mb=0):
        y = self.proj.peek(mb)  # (B, T, C / tp): the core's output, kept as proj's input
        dy = self.proj.backward(dy, mb)  # (B, T, C / tp)
        cache = self.pop(mb)
        if self.selective:
            with flops.recomputing():
                _, cache = self.core(cache, mb)  # the core's forward again: the same bits
        if self.ring is not None:
            dqkv = context.mha_bwd(dy, y, cache, self.ring)  # (B, T, 3 C / tp)
        elif self.blockwise:
            dqkv = blockwise.mha_bwd(dy, y, cache)  # (B, T, 3 C / tp)
        else:
            dqkv = F.mha_bwd(dy, cache)  # (B, T, 3 C / tp)
        return self.qkv.backward(dqkv, mb)  # (B, T, C)


class MLP(Module):
    """Two linears with GELU between: the first column-parallel, the second row-parallel."""

    def __init__(self, ctx, name: str, cfg):
        super().__init__()
        self.fc = ColumnParallelLinear(ctx, f"{name}.fc", cfg.d_model, cfg.ffn,
                                       weight_std(cfg, cfg.d_model))
        self.proj = RowParallelLinear(ctx, f"{name}.proj", cfg.ffn, cfg.d_model,
                                      weight_std(cfg, cfg.ffn, True))

    def forward(self, x, mb=0):
        h = self.fc.forward(x, mb)  # (B, T, F / tp)
        a, cache = F.gelu_fwd(h)  # (B, T, F / tp); the cache is GELU's input, h
        self.save(mb, cache)
        return self.proj.forward(a, mb)  # (B, T, C)

    def backward(self, dy, mb=0):
        da = self.proj.backward(dy, mb)  # (B, T, F / tp)
        dh = F.gelu_bwd(da, self.pop(mb))  # (B, T, F / tp), its tanh recomputed from h
        return self.fc.backward(dh, mb)  # (B, T, C)


class Block(Module):
    """Pre-LayerNorm Transformer block: x + drop(attn(ln1(x))), then + drop(mlp(ln2(.)))."""

    def __init__(self, ctx, name: str, cfg):
        super().__init__()
        self.ln1 = LayerNorm(ctx, f"{name}.ln1", cfg.d_model)
        self.attn = Attention(ctx, f"{name}.attn", cfg)
        self.ln2 = LayerNorm(ctx, f"{name}.ln2", cfg.d_model)
        self.mlp = MLP(ctx, f"{name}.mlp", cfg)
        tokens = context.dropout_tokens(ctx, cfg.seq_len)  # this cp rank's global positions
        self.drop_attn = Dropout(ctx, f"{name}.attn.out", tokens)  # before each residual add
        self.drop_mlp = Dropout(ctx, f"{name}.mlp.out", tokens)
        if ctx.sequence_parallel:  # LayerNorm sees only this rank's tokens: partial gradients
            for p in self.ln1.params() + self.ln2.params():
                p.tp_partial_grad = True
        self.full = ctx.recompute == "full"

    def forward(self, x, mb=0):
        y = self._forward(x, mb)  # (B, T, C)
        if self.full:  # keep only the input (T/tp tokens under SP); backward reruns the rest
            for m in walk(self):
                m._cache.pop(mb, None)
            self.save(mb, x)
        return y

    def _forward(self, x, mb):
        a = self.drop_attn.forward(self.attn.forward(self.ln1.forward(x, mb), mb), mb)
        h = x + a  # (B, T, C)
        return h + self.drop_mlp.forward(self.mlp.forward(self.ln2.forward(h, mb), mb), mb)

    def backward(self, dy, mb=0):
        if self.full:  # the block's forward again, its collectives included: every cache back
            with flops.recomputing():
                self._forward(self.pop(mb), mb)
        dm = self.mlp.backward(self.drop_mlp.backward(dy, mb), mb)  # (B, T, C)
        dh = dy + self.ln2.backward(dm, mb)  # (B, T, C)
        da = self.attn.backward(self.drop_attn.backward(dh, mb), mb)  # (B, T, C)
        return dh + self.ln1.backward(da, mb)  # (B, T, C)
