"""The encoder-decoder Transformer of Vaswani et al. 2017 ("Attention Is All You Need").

An encoder reads the whole source with bidirectional self-attention; a decoder writes the target
one token at a time with causal self-attention, and between the two, in every decoder layer,
cross-attention: queries from the decoder, keys and values from the encoder's output (the
"memory"). Built from the GPT's parts: the same column/row-parallel linears, the same causal
``Attention`` and ``MLP`` (``minipar.models.blocks``), the same ``Embedding`` and ``Head``
(``minipar.models.gpt``), and one new kernel pair, ``functional.cross_attention_fwd/bwd``.

Each sublayer sits in a ``Residual``: pre-LN, x + f(LN(x)), as the GPT (the default, which
trains without warmup tricks), or post-LN, LN(x + f(x)), the paper's own arrangement (section
5.4 of the paper; the pre-LN alternative is Xiong et al. 2020). The encoder ends in a LayerNorm
under pre-LN (its layers' outputs are not normalised); the decoder ends in the Head's LayerNorm
in both arrangements (under post-LN one more than the paper has).

Inputs are one (B, S + T) array of token ids: the source (S tokens, ``PAD`` on the right of a
short one) and the decoder's input (T tokens, the target shifted right behind a start token).
Packed this way, a batch is an ordinary (B, columns) array, so data parallelism, ZeRO and the
engine's microbatches cut it by rows exactly as the GPT's. Source padding is masked out of
every attention over the source (the encoder's and each cross-attention); the target needs no
mask beyond causality, since positions after the answer are only scored as padding.

The backward pass runs the units in exactly the reverse of their forward order. The memory's
gradient is the sum over decoder layers of each cross-attention's key/value input gradient; it
enters the encoder's backward only after the last decoder layer's (the first run backward).
Under tensor parallelism each cross-attention's key/value projection is column-parallel, so its
``f`` (or the sequence-parallel gather) sums that layer's memory gradient over the tp group.
"""

from __future__ import annotations

from contextlib import nullcontext

from minipar import backend
from minipar.config import ModelConfig
from minipar.models.blocks import MLP, Attention, weight_std
from minipar.models.gpt import Embedding, Head, _drop_caches
from minipar.nn import functional as F
from minipar.nn.module import BuildContext, Hooks, LayerNorm, Module, Sharding, make_param
from minipar.parallel.deferral import DeferredWeightGrads
from minipar.parallel.tensor import ColumnParallelLinear, RowParallelLinear

PAD = 0  # token id of source padding: masked out of every attention over the source
# The encoder's position bias is this times its parameter (SourceAttention); a power of two, so
# that scaling the bias and its gradient is exact in every precision, fp16 and bf16 included.
POS_BIAS_GAIN = 16.0


class Residual(Module):
    """One sublayer f with its LayerNorm and skip connection: pre-LN x + f(LN(x)) or post-LN
    LN(x + f(x)). ``f`` is a module whose backward returns dx, or (dx, d_memory) for
    cross-attention; the residual adds the skip's gradient to dx and passes the rest on."""

    def __init__(self, ctx, name: str, cfg: ModelConfig, sub: Module):
        super().__init__()
        self.ln = LayerNorm(ctx, f"{name}.ln", cfg.d_model)
        self.sub = sub
        self.post = cfg.norm == "post"
        if ctx.sequence_parallel:  # LayerNorm sees only this rank's tokens: partial gradients
            for p in self.ln.params():
                p.tp_partial_grad = True

    def apply(self, x, mb, f):
        """The residual around any function of the (normalised) input: decoding calls it with
        cached attention in place of ``sub.forward``."""
        if self.post:
            return self.ln.forward(x + f(x), mb)  # (B, T, C)
        return x + f(self.ln.forward(x, mb))  # (B, T, C)

    def forward(self, x, mb=0, *args):
        return self.apply(x, mb, lambda h: self.sub.forward(h, mb, *args))

    def backward(self, dy, mb=0):
        if self.post:
            ds = self.ln.backward(dy, mb)  # (B, T, C): gradient of x + f(x)
            dx, rest = _split(self.sub.backward(ds, mb))
            return (ds + dx, *rest) if rest else ds + dx
        dh, rest = _split(self.sub.backward(dy, mb))
        dx = dy + self.ln.backward(dh, mb)  # (B, T, C)
        return (dx, *rest) if rest else dx


def _split(grads):
    """(dx, other gradients) of a sublayer's backward, which returns dx or a tuple."""
    return (grads[0], grads[1:]) if isinstance(grads, tuple) else (grads, ())


class SourceAttention(Module):
    """Multi-head attention of queries from ``x`` over keys/values, with an additive mask.

    Self-attention in the encoder (one fused [Q|K|V] projection of the source, like the GPT's)
    or, with ``cross=True``, the decoder's cross-attention: Q projected from the decoder stream,
    [K|V] from the memory. Heads split over tp: projections column-, output row-parallel.

    With ``cfg.pos_bias`` the encoder's self-attention also learns a position bias: one number
    per head and (query position, key position) of the source, added to the scores
    (``functional.cross_attention_fwd``'s ``head_bias``), zero at the start. A head can then
    learn "look one place to my left" directly, which content and added position vectors teach
    only slowly: ``--task qa`` needs it (``minipar.seq2seq``). Split over tp with the heads.
    The parameter holds the bias divided by ``POS_BIAS_GAIN``: AdamW moves a parameter by about
    the learning rate a step whatever its gradient, and a bias must reach a few units to steer a
    softmax, so stored this way it gets there in tens of steps instead of hundreds. (Under SGD
    the same storage multiplies its learning rate by the gain squared, and its gradient counts
    the gain times in the global norm that --grad-clip bounds.)
    """

    def __init__(self, ctx, name: str, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        c = cfg.d_model
        std = weight_std(cfg, c)
        self.local_heads = cfg.n_heads // ctx.tp.size
        self.cross = cross
        self.pos_bias = None
        if cfg.pos_bias and not cross:
            s, tp = cfg.src_len, ctx.tp
            self.pos_bias = make_param(ctx, f"{name}.pos_bias", (cfg.n_heads, s, s), "zeros",
                                       Sharding(0, tp.size, tp.rank), decay=False)
        if cross:
            self.q = ColumnParallelLinear(ctx, f"{name}.q", c, c, std)
            self.kv = ColumnParallelLinear(ctx, f"{name}.kv", c, 2 * c, std, blocks=2)
        else:
            self.qkv = ColumnParallelLinear(ctx, f"{name}.qkv", c, 3 * c, std, blocks=3)
        self.proj = RowParallelLinear(ctx, f"{name}.proj", c, c, weight_std(cfg, c, True))

    def project(self, x, mb, memory=None):
        """(q (B, Tq, C/tp), kv (B, Tk, 2C/tp)) of this rank's heads."""
        if self.cross:
            return self.q.forward(x, mb), self.kv.forward(memory, mb)
        qkv = self.qkv.forward(x, mb)  # (B, S, 3C/tp) laid out [Q | K | V]
        c = qkv.shape[-1] // 3
        return qkv[..., :c], qkv[..., c:]

    def attend(self, q, kv, bias, mb):
        head_bias = None if self.pos_bias is None else POS_BIAS_GAIN * self.pos_bias.data
        y, cache = F.cross_attention_fwd(q, kv, self.local_heads, bias, head_bias)  # (B,Tq,C/tp)
        self.save(mb, cache)
        return self.proj.forward(y, mb)  # (B, Tq, C)

    def forward(self, x, mb=0, bias=None, memory=None):
        q, kv = self.project(x, mb, memory)
        return self.attend(q, kv, bias, mb)

    def backward(self, dy, mb=0):
        """dx, or (dx, d_memory) for cross-attention (d_memory summed over tp by f)."""
        dy = self.proj.backward(dy, mb)  # (B, Tq, C/tp)
        # (B, Tq, C/tp), (B, Tk, 2C/tp), and the position bias's (H/tp, S, S) when there is one
        dq, dkv, *d_head_bias = F.cross_attention_bwd(dy, self.pop(mb))
        if self.pos_bias is not None:
            self.pos_bias.accumulate(POS_BIAS_GAIN * d_head_bias[0])  # (H/tp, S, S)
        if self.cross:
            return self.q.backward(dq, mb), self.kv.backward(dkv, mb)
        dqkv = backend.xp().concatenate([dq, dkv], axis=-1)  # (B, S, 3C/tp) as [Q | K | V]
        return self.qkv.backward(dqkv, mb)  # (B, S, C)


class EncoderLayer(Module):
    """Bidirectional self-attention over the source (padding masked), then the MLP."""

    def __init__(self, ctx, name: str, cfg: ModelConfig):
        super().__init__()
        self.attn = Residual(ctx, f"{name}.attn", cfg, SourceAttention(ctx, f"{name}.attn", cfg))
        self.mlp = Residual(ctx, f"{name}.mlp", cfg, MLP(ctx, f"{name}.mlp", cfg))

    def forward(self, x, mb, bias):
        return self.mlp.forward(self.attn.forward(x, mb, bias), mb)  # (B, S, C)

    def backward(self, dy, mb=0):
        return self.attn.backward(self.mlp.backward(dy, mb), mb)  # (B, S, C)


class DecoderLayer(Module):
    """Causal self-attention, cross-attention over the memory, then the MLP."""

    def __init__(self, ctx, name: str, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Residual(ctx, f"{name}.self_attn", cfg,
                                  Attention(ctx, f"{name}.self_attn", cfg))
        self.cross = Residual(ctx, f"{name}.cross", cfg,
                              SourceAttention(ctx, f"{name}.cross", cfg, cross=True))
        self.mlp = Residual(ctx, f"{name}.mlp", cfg, MLP(ctx, f"{name}.mlp", cfg))

    def forward(self, x, mb, memory, bias):
        h = self.self_attn.forward(x, mb)  # (B, T, C)
        h = self.cross.forward(h, mb, bias, memory)  # (B, T, C)
        return self.mlp.forward(h, mb)  # (B, T, C)

    def backward(self, dy, mb=0):
        """(dx (B, T, C), d_memory (B, S, C)): this layer's share of the memory's gradient."""
        dh = self.mlp.backward(dy, mb)
        dh, dmemory = self.cross.backward(dh, mb)
        return self.self_attn.backward(dh, mb), dmemory


class EncoderDecoder(Module):
    """The whole model as one chunk of units (the engine's interface for a 1-stage pipeline):
    source embedding, encoder layers, [encoder LayerNorm], target embedding, decoder layers,
    head. ``--tie-weights`` shares one token table among both embeddings and the head, as the
    paper does (section 3.4), which needs one vocabulary for source and target."""

    def __init__(self, cfg: ModelConfig, ctx: BuildContext):
        super().__init__()
        self.cfg = cfg
        self.dtype = ctx.dtype
        self.src_embed = Embedding(ctx, cfg, "src_embed", "src_pos", cfg.src_len)
        self.encoder = [EncoderLayer(ctx, f"encoder.{i}", cfg) for i in range(cfg.n_layers)]
        self.enc_norm = LayerNorm(ctx, "enc_norm", cfg.d_model) if cfg.norm == "pre" else None
        if self.enc_norm is not None and ctx.sequence_parallel:
            for p in self.enc_norm.params():
                p.tp_partial_grad = True
        self.tgt_embed = Embedding(ctx, cfg, "tgt_embed", "tgt_pos", cfg.seq_len)
        tied = self.src_embed.tok.w if cfg.tie_weights else None
        if tied is not None:
            self.tgt_embed.tok.w = tied
        self.decoder = [DecoderLayer(ctx, f"decoder.{i}", cfg) for i in range(cfg.n_layers)]
        self.head = Head(ctx, cfg, tied)
        self.units = [u for u in [self.src_embed, *self.encoder, self.enc_norm, self.tgt_embed,
                                  *self.decoder, self.head] if u is not None]
        self.deferred = DeferredWeightGrads()  # zero-bubble W passes waiting to run
        self.hooks = Hooks()

    def _run(self, unit, mb, *args):
        """One unit's forward between the data-parallel hooks (ZeRO-3 gathers, overlap)."""
        self.hooks.pre_forward(unit, mb)
        out = unit.forward(*args)
        self.hooks.post_forward(unit, mb)
        return out

    def _back(self, unit, mb, g):
        self.hooks.pre_backward(unit, mb)
        out = unit.backward(g, mb)
        self.hooks.post_backward(unit, mb)
        return out

    def split(self, x):
        """Packed ids (B, S + T) -> source (B, S), decoder input (B, T), source mask (B, 1, S)."""
        src, tgt = x[:, :self.cfg.src_len], x[:, self.cfg.src_len:]
        return src, tgt, F.padding_bias(src != PAD, self.dtype)

    def encode(self, src, bias, mb):
        """The memory (B, S, C), or (B, S/tp, C) under sequence parallelism."""
        h = self._run(self.src_embed, mb, src, mb)
        for layer in self.encoder:
            h = self._run(layer, mb, h, mb, bias)
        return h if self.enc_norm is None else self._run(self.enc_norm, mb, h, mb)

    def hidden(self, x, mb):
        """The decoder's output (B, T, C) for packed ids x: encoder, then decoder."""
        src, tgt, bias = self.split(x)
        memory = self.encode(src, bias, mb)
        h = self._run(self.tgt_embed, mb, tgt, mb)
        for layer in self.decoder:
            h = self._run(layer, mb, h, mb, memory, bias)
        return h

    def forward(self, x, mb=0, targets=None, normalizer=None):
        """Packed ids (B, S + T) and targets (B, T) -> the loss (scalar)."""
        return self._run(self.head, mb, self.hidden(x, mb), mb, targets, normalizer)

    def backward(self, dy=None, mb=0, defer_weight_grads: bool = False):
        """Every parameter's gradient; the memory's gradient summed over the decoder layers."""
        with self.deferred.collect(self, mb) if defer_weight_grads else nullcontext():
            g = self._back(self.head, mb, 1.0)
            dmemory = None
            for layer in reversed(self.decoder):
                g, dm = self._back(layer, mb, g)
                dmemory = dm if dmemory is None else dmemory + dm  # (B, S, C)
            self._back(self.tgt_embed, mb, g)
            g = dmemory if self.enc_norm is None else self._back(self.enc_norm, mb, dmemory)
            for layer in reversed(self.encoder):
                g = self._back(layer, mb, g)
            self._back(self.src_embed, mb, g)
        return None

    def backward_weights(self, mb=0) -> None:
        """The deferred weight-gradient pass of microbatch ``mb`` (zero-bubble "W")."""
        self.deferred.run(mb)

    def evaluate(self, x, targets=None):
        """Teacher-forced greedy predictions (B, T) and the summed loss; keeps no caches."""
        h = self.hidden(x, "_eval")
        for unit in self.units[:-1]:
            _drop_caches(unit, "_eval")
        self.hooks.pre_forward(self.head, "_eval")
        out = self.head.evaluate(h, targets)
        self.hooks.post_forward(self.head, "_eval")
        return out


def build_encdec(cfg: ModelConfig, ctx: BuildContext, pp: int = 1, virtual: int = 1,
                 stage: int = 0) -> list[EncoderDecoder]:
    """This rank's model chunks: the whole encoder-decoder (pipelines are not supported yet)."""
    if pp * virtual != 1:
        raise NotImplementedError("the encoder-decoder runs on one pipeline stage (--pp 1)")
    return [EncoderDecoder(cfg, ctx)]
