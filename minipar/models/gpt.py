"""A decoder-only GPT, built as pipeline chunks of units: embedding, blocks, head.

The serial model is one chunk holding every unit. A pipeline stage holds a contiguous range of
blocks (the first also the embedding, the last also the head and loss); with interleaving a rank
holds several such chunks. Units are the granularity at which hooks run (ZeRO-3 gathers a unit's
parameters before it runs; overlapped data parallelism syncs a unit's gradients as soon as its
backward is done).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from minipar import backend
from minipar.config import ModelConfig, chunk_blocks
from minipar.nn import functional as F
from minipar.models.blocks import INIT_STD, Block, embed_scale, embed_std, weight_std
from minipar.nn.dropout import Dropout
from minipar.nn.module import BuildContext, Hooks, LayerNorm, Module, make_param, walk
from minipar.nn.precision import sum_fp32
from minipar.parallel.context import dropout_tokens, token_indices
from minipar.parallel.deferral import DeferredWeightGrads
from minipar.parallel.tensor import (
    SEQ_AXIS, VocabParallelCrossEntropy, VocabParallelEmbedding, VocabParallelHead,
    vocab_parallel_argmax,
)


class Embedding(Module):
    """Token embedding (vocab-parallel) plus learned or sinusoidal positions, then dropout."""

    def __init__(self, ctx: BuildContext, cfg: ModelConfig, name: str = "embed",
                 pos_name: str = "pos", length: int | None = None):
        # name, pos_name, length: the encoder-decoder embeds a source and a target this way
        super().__init__()
        self.tp = ctx.tp
        self.sp = ctx.sequence_parallel
        length = cfg.seq_len if length is None else length
        # Under context parallelism this rank's tokens sit at these global positions.
        self.cp_index = None if ctx.cp is None or ctx.cp.size == 1 else backend.from_host(
            token_indices(length, ctx.cp.size, ctx.cp.rank, ctx.cp_split))
        self.tok = VocabParallelEmbedding(ctx, name, cfg.vocab_size, cfg.d_model, embed_std(cfg))
        self.scale = embed_scale(cfg)  # None, or sqrt(d_model) for the fan-in initialisation
        if cfg.pos == "learned":
            self.pos = make_param(ctx, pos_name, (length, cfg.d_model), INIT_STD / 2)
            self.pos.tp_partial_grad = ctx.sequence_parallel
            self.table = None
        else:
            self.pos = None
            self.table = backend.from_host(
                backend.to_host(F.sinusoidal_positions(length, cfg.d_model, ctx.dtype)))
        self.drop = Dropout(ctx, f"{name}.out", dropout_tokens(ctx, length))

    def _rows(self, t_local: int):
        """Which rows of the position table this rank's tokens use: a slice (all of them
        without SP), or global indices under context parallelism."""
        start = self.tp.rank * t_local if self.sp else 0
        if self.cp_index is None:
            return slice(start, start + t_local)
        return self.cp_index[start:start + t_local]

    def _table(self):
        """The position table (T, C): learned or sinusoidal."""
        return self.pos.data if self.pos is not None else self.table

    def _positions(self, t_local: int):
        """The rows of the position table for this rank's tokens."""
        return self._table()[self._rows(t_local)]

    def _tokens(self, ids, mb):
        h = self.tok.forward(ids, mb)  # (B, T, C), or (B, T/tp, C) under sequence parallelism
        if self.scale is not None:
            h *= self.scale
        return h

    def at_position(self, ids, t: int, mb):
        """Decoding's embedding (B, 1, C) of (B, 1) ids that all sit at position t: no dropout,
        and the token table's cache under ``mb`` is left for the decoder to drop."""
        return self._tokens(ids, mb) + self._table()[t]  # (B, 1, C)

    def forward(self, ids, mb=0):
        h = self._tokens(ids, mb)  # (B, T, C), or (B, T/tp, C) under sequence parallelism
        h += self._positions(h.shape[SEQ_AXIS])
        self.save(mb, h.shape[SEQ_AXIS])
        return self.drop.forward(h, mb)  # (B, T, C) or (B, T/tp, C)

    def backward(self, dh, mb=0):
        dh = self.drop.backward(dh, mb)  # (B, T, C) or (B, T/tp, C)
        t_local = self.pop(mb)
        if self.pos is not None:
            dpos = self.pos.data * 0  # (T, C)
            dpos[self._rows(t_local)] = sum_fp32(dh, axis=0)  # distinct rows: a sum
            self.pos.accumulate(dpos)
        self.tok.backward(dh if self.scale is None else dh * self.scale, mb)
        return None


class Head(Module):
    """Final LayerNorm, vocab-parallel projection to logits, vocab-parallel cross-entropy."""

    def __init__(self, ctx: BuildContext, cfg: ModelConfig, tied=None):
        super().__init__()
        self.tp = ctx.tp
        self.vocab = cfg.vocab_size
        self.ln_f = LayerNorm(ctx, "ln_f", cfg.d_model)
        if ctx.sequence_parallel:
            for p in self.ln_f.params():
                p.tp_partial_grad = True
        self.proj = VocabParallelHead(ctx, "head", cfg.d_model, cfg.vocab_size,
                                      weight_std(cfg, cfg.d_model), tied)
        self.loss = VocabParallelCrossEntropy(ctx, cfg.vocab_size)

    def logits(self, h, mb=0):
        return self.proj.forward(self.ln_f.forward(h, mb), mb)  # (B, T, V/tp)

    def forward(self, h, mb=0, targets=None, normalizer=None):
        return self.loss.forward(self.logits(h, mb), targets, normalizer, mb)

    def backward(self, dloss=1.0, mb=0):
        dlogits = self.loss.backward(dloss, mb)
        return self.ln_f.backward(self.proj.backward(dlogits, mb), mb)

    def evaluate(self, h, targets=None):
        """Greedy predictions (B, T) and, given targets, the summed loss; keeps no caches."""
        logits = self.logits(h, mb="_eval")
        self.ln_f.pop("_eval")
        self.proj.pop("_eval")
        preds = vocab_parallel_argmax(logits, self.tp, self.vocab)
        nll = 0.0
        if targets is not None:
            nll = float(self.loss.forward(logits, targets, normalizer=1.0, mb="_eval"))
            self.loss.pop("_eval")
        return preds, nll


@dataclass(frozen=True)
class ChunkSpec:
    """Which part of the model a chunk holds: global chunk index and its block range."""

    index: int
    n_chunks: int
    first_layer: int
    n_layers: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_chunks - 1


class GPTChunk(Module):
    """A contiguous piece of the GPT: [embedding] + blocks + [head]."""

    def __init__(self, cfg: ModelConfig, ctx: BuildContext, spec: ChunkSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.embed = Embedding(ctx, cfg) if spec.is_first else None
        self.blocks = [Block(ctx, f"blocks.{i}", cfg)
                       for i in range(spec.first_layer, spec.first_layer + spec.n_layers)]
        tied = self.embed.tok.w if (cfg.tie_weights and spec.is_first) else None
        self.head = Head(ctx, cfg, tied) if spec.is_last else None
        self.units = [u for u in [self.embed, *self.blocks, self.head] if u is not None]
        self.deferred = DeferredWeightGrads()  # zero-bubble W passes waiting to run
        self.hooks = Hooks()
        self.loss_scale = 1.0  # the seed of backward: fp16's loss scale (minipar.nn.precision)

    def forward(self, x, mb=0, targets=None, normalizer=None):
        """Token ids (first chunk) or activations in; activations or the loss (last chunk) out."""
        h = x
        for unit in self.units:
            self.hooks.pre_forward(unit, mb)
            if unit is self.head:
                h = unit.forward(h, mb, targets, normalizer)
            else:
                h = unit.forward(h, mb)
            self.hooks.post_forward(unit, mb)
        return h

    def backward(self, dy=None, mb=0, defer_weight_grads: bool = False):
        """Gradient of the loss w.r.t. this chunk's input (None for the first chunk).

        With ``defer_weight_grads`` the linears' weight GEMMs wait for ``backward_weights(mb)``:
        the B/W split of zero-bubble schedules (``minipar.parallel.deferral``; LayerNorm,
        embedding and row-parallel bias gradients are cheap and are computed at once).
        """
        g = self.loss_scale if self.head is not None else dy
        with self.deferred.collect(self, mb) if defer_weight_grads else nullcontext():
            for unit in reversed(self.units):
                self.hooks.pre_backward(unit, mb)
                g = unit.backward(g, mb)
                self.hooks.post_backward(unit, mb)
        return g

    def backward_weights(self, mb=0) -> None:
        """The deferred weight-gradient pass of microbatch ``mb`` (zero-bubble "W")."""
        self.deferred.run(mb)

    def predict(self, x):
        """This chunk's output activations with no caches kept (evaluation, not the last chunk)."""
        h = x
        for unit in self.units:
            if unit is self.head:
                break
            self.hooks.pre_forward(unit, "_eval")
            h = unit.forward(h, "_eval")
            _drop_caches(unit, "_eval")
            self.hooks.post_forward(unit, "_eval")
        return h

    def evaluate(self, x, targets=None):
        """The last chunk's greedy predictions and summed loss (see ``Head.evaluate``)."""
        h = self.predict(x)
        self.hooks.pre_forward(self.head, "_eval")
        out = self.head.evaluate(h, targets)
        self.hooks.post_forward(self.head, "_eval")
        return out


def _drop_caches(module: Module, mb) -> None:
    for m in walk(module):
        m._cache.pop(mb, None)


def chunk_specs(cfg: ModelConfig, pp: int, virtual: int, stage: int,
                partition: tuple[int, ...] = ()) -> list[ChunkSpec]:
    """The chunks pipeline rank ``stage`` holds: global chunks stage, stage + pp, ... (PTD-P).

    Global chunk g holds ``partition[g]`` consecutive blocks (``--partition``), or an equal
    share when ``partition`` is empty: the one place the split is decided.
    """
    n_chunks = pp * virtual
    blocks = chunk_blocks(cfg.n_layers, n_chunks, partition)
    firsts = [sum(blocks[:g]) for g in range(n_chunks)]
    return [ChunkSpec(g, n_chunks, firsts[g], blocks[g])
            for g in range(stage, n_chunks, pp)]


def build_chunks(cfg: ModelConfig, ctx: BuildContext, pp: int = 1, virtual: int = 1,
                 stage: int = 0, partition: tuple[int, ...] = ()) -> list[GPTChunk]:
    """This rank's model chunks. The serial model is ``build_chunks(cfg, ctx)[0]``."""
    return [GPTChunk(cfg, ctx, spec)
            for spec in chunk_specs(cfg, pp, virtual, stage, partition)]
