"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) and sequence parallelism
(Korthikanti et al. 2022), as the serial kernels plus named collectives.

Megatron splits each MLP and attention block into a column-parallel linear (every tp rank owns
some output columns: some MLP units, some heads) followed by a row-parallel linear (every rank
owns the matching input rows and produces a partial sum). Two conjugate operators glue them:

    f: identity forward, allreduce backward   (before the column-parallel linear)
    g: allreduce forward, identity backward   (after the row-parallel linear)

so a block costs exactly 2 allreduces forward and 2 backward. Sequence parallelism notices that
the allreduce after g is immediately followed by work (LayerNorm, residual) that every rank repeats
on the full sequence; it replaces

    g  by a reduce-scatter along T   (each rank keeps T/tp tokens of the sum)
    f  by an allgather along T       (the column-parallel linear needs every token)

which moves the same bytes but stores the LayerNorm/residual activations once, not tp times.
A column-parallel linear under sequence parallelism caches only this rank's T/tp tokens of its
input and allgathers them again in backward for the weight gradient (Korthikanti et al. 2022,
section 4.2.2): one extra allgather per column-parallel linear in backward buys a layer whose
every cached activation is divided by tp, the paper's sbh (34/t + 5as/(ht)).

With a tp group of one rank every collective is a no-op: the serial model is this code on a
1 x 1 x 1 mesh.
"""

from __future__ import annotations

from minipar import backend
from minipar.nn import functional as F
from minipar.nn.module import Module, Param, Sharding, make_param

SEQ_AXIS = 1  # activations are (B, T, C); sequence parallelism splits T


# --------------------------------------------------------------------------------------------
# The conjugate operators, as kernel pairs (forward, backward).


def f_fwd(x, tp):
    """Megatron's f, forward: identity. Every tp rank already holds the full input."""
    return x


def f_bwd(dx, tp):
    """Megatron's f, backward: allreduce. Each rank's column slice contributed part of dx."""
    return tp.allreduce(dx)


def g_fwd(y, tp):
    """Megatron's g, forward: allreduce the row-parallel partial sums into the full output."""
    return tp.allreduce(y)


def g_bwd(dy, tp):
    """Megatron's g, backward: identity. The output gradient is already whole on every rank."""
    return dy


def f_sp_fwd(x, tp):
    """Sequence-parallel f, forward: allgather the T/tp token shards into the full sequence."""
    return tp.allgather(x, axis=SEQ_AXIS)


def f_sp_bwd(dx, tp):
    """Sequence-parallel f, backward: reduce-scatter, each rank keeps the sum for its tokens."""
    return tp.reduce_scatter(dx, axis=SEQ_AXIS)


def g_sp_fwd(y, tp):
    """Sequence-parallel g, forward: reduce-scatter the partial sums along the sequence."""
    return tp.reduce_scatter(y, axis=SEQ_AXIS)


def g_sp_bwd(dy, tp):
    """Sequence-parallel g, backward: allgather the token shards of the gradient."""
    return tp.allgather(dy, axis=SEQ_AXIS)


def _enter(ctx):
    """The (forward, backward) pair in front of a column-parallel linear."""
    return (f_sp_fwd, f_sp_bwd) if ctx.sequence_parallel else (f_fwd, f_bwd)


def _exit(ctx):
    """The (forward, backward) pair after a row-parallel linear or the vocab-parallel lookup."""
    return (g_sp_fwd, g_sp_bwd) if ctx.sequence_parallel else (g_fwd, g_bwd)


def padded_vocab(vocab: int, tp_size: int) -> int:
    """The vocabulary rounded up so that tp divides it; padded entries are never predicted."""
    return -(-vocab // tp_size) * tp_size


# --------------------------------------------------------------------------------------------
# Linear layers.


class WeightGradMixin:
    """Lets a layer postpone its weight-gradient GEMM (the "W" pass of zero-bubble pipelines,
    Qi et al. 2023): with ``defer`` set, backward computes only dx and keeps (dy, cache) until
    ``flush(mb)`` computes dW. dW = x^T dy needs no weight, so the kept cache drops it: a
    deferred pass holds activations only, never a (ZeRO-3 gathered) weight."""

    defer = False

    def _weight_grads(self, dy, cache, mb) -> None:
        if self.defer:
            x, _, has_bias = cache
            self.__dict__.setdefault("_pending", {})[mb] = (dy, (x, None, has_bias))
        else:
            self._apply_weight_grads(*F.linear_bwd_weight(dy, cache))

    def flush(self, mb) -> None:
        pending = self.__dict__.get("_pending", {})
        if mb in pending:
            dy, cache = pending.pop(mb)
            self._apply_weight_grads(*F.linear_bwd_weight(dy, cache))

    def pending_bytes(self) -> int:
        return sum(int(dy.nbytes) for dy, _ in self.__dict__.get("_pending", {}).values())


class ColumnParallel(WeightGradMixin, Module):
    """Forward and backward of every column-parallel matrix: y = f(x) W[:, cols] (+ b[cols]).

    Subclasses say where the weight and bias live (``_weight``, ``_bias``) and where their
    gradients go (``_apply_weight_grads``). The cache keeps the input this rank was *given*:
    the whole sequence without sequence parallelism (f is the identity), only this rank's T/tp
    tokens with it; backward runs the entering collective again to rebuild the full input for
    dW = x^T dy (an allgather under SP, nothing otherwise), as Korthikanti et al. 2022 (4.2.2)
    do so that no activation of the layer is stored tp times. The cache never holds the weight:
    backward reads it from the Param again, so that ZeRO-3 (Rajbhandari et al. 2019) can free
    a unit's gathered weights between its forward and its backward (the same holds for every
    layer here: caches keep activations only).
    """

    def _enter_region(self, ctx) -> None:
        self.tp = ctx.tp
        self.enter = _enter(ctx)

    def _weight(self):
        raise NotImplementedError

    def _bias(self):
        return None

    def forward(self, x, mb=0):
        x_full = self.enter[0](x, self.tp)  # (B, T, C): whole sequence on every rank
        y, (_, _, has_bias) = F.linear_fwd(x_full, self._weight(), self._bias())  # (B, T, out/tp)
        self.save(mb, (x, has_bias))  # the input as given; the weight is read again in backward
        return y

    def backward(self, dy, mb=0):
        x, has_bias = self.pop(mb)
        # The kernel's cache, rebuilt: the full input again (allgather under SP) and the weight
        # as it is now (ZeRO-3 gathers it again before backward).
        cache = (self.enter[0](x, self.tp), self._weight(), has_bias)
        dx = F.linear_bwd_input(dy, cache)  # (B, T, C), partial over tp
        self._weight_grads(dy, cache, mb)
        return self.enter[1](dx, self.tp)


class ColumnParallelLinear(ColumnParallel):
    """y[:, cols of this rank] = f(x) W[:, cols] + b[cols]. Output stays split over tp.

    ``blocks`` cuts a fused weight block-wise (the [Q|K|V] projection: each rank takes the
    Q, K and V columns of its own heads).
    """

    def __init__(self, ctx, name: str, d_in: int, d_out: int, std: float, bias: bool = True,
                 blocks: int = 1):
        super().__init__()
        self._enter_region(ctx)
        tp = ctx.tp
        w_view = (d_in, blocks, d_out // blocks) if blocks > 1 else None
        b_view = (blocks, d_out // blocks) if blocks > 1 else None
        self.w = make_param(ctx, f"{name}.w", (d_in, d_out), std,
                            Sharding(axis=2 if blocks > 1 else 1, parts=tp.size, index=tp.rank,
                                     view=w_view))
        self.b = make_param(ctx, f"{name}.b", (d_out,), "zeros",
                            Sharding(axis=1 if blocks > 1 else 0, parts=tp.size, index=tp.rank,
                                     view=b_view), decay=False) if bias else None

    def _weight(self):
        return self.w.data  # (C, out / tp)

    def _bias(self):
        return None if self.b is None else self.b.data

    def _apply_weight_grads(self, dw, db) -> None:
        self.w.accumulate(dw)
        if self.b is not None:
            self.b.accumulate(db)


class RowParallelLinear(WeightGradMixin, Module):
    """y = g(x[:, rows of this rank] W[rows, :]) + b. Input arrives split over tp."""

    def __init__(self, ctx, name: str, d_in: int, d_out: int, std: float):
        super().__init__()
        tp = ctx.tp
        self.tp = tp
        self.exit = _exit(ctx)
        self.w = make_param(ctx, f"{name}.w", (d_in, d_out), std,
                            Sharding(axis=0, parts=tp.size, index=tp.rank))
        # The bias is added after the reduction, so it is replicated; under sequence parallelism
        # each rank adds it to its own tokens only and its gradient is a partial sum over tp.
        self.b = make_param(ctx, f"{name}.b", (d_out,), "zeros", decay=False)
        self.b.tp_partial_grad = ctx.sequence_parallel

    def forward(self, x, mb=0):
        partial, _ = F.linear_fwd(x, self.w.data)  # (B, T, C) partial sum over tp
        y = self.exit[0](partial, self.tp)  # (B, T, C) or (B, T/tp, C) under SP
        y += self.b.data
        self.save(mb, x)  # the input only: the weight is read again in backward
        return y

    def backward(self, dy, mb=0):
        self.b.accumulate(dy.sum(axis=tuple(range(dy.ndim - 1))))
        dy_full = self.exit[1](dy, self.tp)  # (B, T, C)
        cache = (self.pop(mb), self.w.data, False)  # the kernel's cache, with today's weight
        dx = F.linear_bwd_input(dy_full, cache)
        self._weight_grads(dy_full, cache, mb)
        return dx  # (B, T, in / tp)

    def _apply_weight_grads(self, dw, db) -> None:
        self.w.accumulate(dw)


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel embedding, LM head and cross-entropy.


class VocabParallelEmbedding(Module):
    """Each tp rank holds V/tp rows; a token looked up elsewhere contributes zeros here, and g
    (or the sequence-parallel reduce-scatter) sums the pieces into the full embedding."""

    def __init__(self, ctx, name: str, vocab: int, width: int, std: float):
        super().__init__()
        tp = ctx.tp
        self.tp = tp
        self.exit = _exit(ctx)
        self.vocab = vocab
        self.rows = padded_vocab(vocab, tp.size) // tp.size
        self.start = tp.rank * self.rows
        self.w = make_param(ctx, f"{name}.w", (vocab, width), std,
                            Sharding(axis=0, parts=tp.size, index=tp.rank,
                                     padded=padded_vocab(vocab, tp.size)))

    def forward(self, ids, mb=0):
        valid = None
        local = ids
        if self.tp.size > 1:
            local = ids - self.start  # (B, T)
            valid = (local >= 0) & (local < self.rows)  # (B, T)
        y, cache = F.embedding_fwd(local, self.w.data, valid)  # (B, T, C) partial over tp
        self.save(mb, cache)
        return self.exit[0](y, self.tp)

    def backward(self, dy, mb=0):
        dy_full = self.exit[1](dy, self.tp)  # (B, T, C)
        self.w.accumulate(F.embedding_bwd(dy_full, self.pop(mb)))
        return None


class VocabParallelHead(ColumnParallel):
    """Logits over this rank's slice of the vocabulary: a column-parallel linear with no bias.

    With weight tying the head reuses the embedding's (V/tp, C) rows, transposed.
    """

    def __init__(self, ctx, name: str, width: int, vocab: int, std: float,
                 tied: Param | None = None):
        super().__init__()
        self._enter_region(ctx)
        tp = ctx.tp
        self.tied = tied
        if tied is None:
            self.w = make_param(ctx, f"{name}.w", (width, vocab), std,
                                Sharding(axis=1, parts=tp.size, index=tp.rank,
                                         padded=padded_vocab(vocab, tp.size)))

    def _weight(self):
        return self.tied.data.T if self.tied is not None else self.w.data  # (C, V/tp)

    def _apply_weight_grads(self, dw, db) -> None:
        if self.tied is not None:
            self.tied.accumulate(dw.T.copy())
        else:
            self.w.accumulate(dw)

    def params(self) -> list[Param]:
        return [] if self.tied is not None else [self.w]


class VocabParallelCrossEntropy(Module):
    """Cross-entropy with the vocabulary split over tp, never gathering the full logits.

    Three small allreduces over (B, T) replace the gather of (B, T, V): the row maximum (op max),
    the sum of exponentials and the target's logit (op sum). Padded vocabulary entries are masked
    to -inf, so padding never changes the loss (Megatron-LM, Shoeybi et al. 2019, section 3).
    """

    def __init__(self, ctx, vocab: int, ignore_index: int = -100):
        super().__init__()
        self.tp = ctx.tp
        self.vocab = vocab
        self.cols = padded_vocab(vocab, self.tp.size) // self.tp.size
        self.start = self.tp.rank * self.cols
        self.ignore_index = ignore_index

    def _mask_padding(self, logits):
        pad = self.start + self.cols - self.vocab
        if pad > 0:
            logits[..., self.cols - min(pad, self.cols):] = -backend.xp().inf

    def forward(self, logits, targets, normalizer=None, mb=0):
        """logits (B, T, V/tp), targets (B, T) -> scalar loss (same on every tp rank)."""
        xp = backend.xp()
        tp = self.tp
        self._mask_padding(logits)
        valid = targets != self.ignore_index  # (B, T)
        norm = float(valid.sum() if normalizer is None else normalizer)
        gmax = tp.allreduce(logits.max(axis=-1), op="max")  # (B, T)
        logits -= gmax[..., None]  # shifted logits, in place: the head's output is not reused
        exps = xp.exp(logits)  # (B, T, V/tp)
        sumexp = tp.allreduce(exps.sum(axis=-1))  # (B, T)
        local = targets - self.start  # (B, T)
        mine = valid & (local >= 0) & (local < self.cols)  # (B, T)
        safe = xp.where(mine, local, 0)  # (B, T)
        picked = xp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # (B, T)
        # where, not a product: on a rank whose slice is all padding the pick is -inf, and
        # -inf * 0 would be nan (vocab 5 over tp 4: the last rank holds padding only).
        target_logit = tp.allreduce(xp.where(mine, picked, 0.0))  # (B, T)
        nll = xp.log(sumexp) - target_logit  # (B, T)
        loss = (nll * valid).sum() / max(norm, 1.0)
        self.save(mb, (exps, sumexp, safe, mine, valid, norm))
        return loss

    def backward(self, dloss=1.0, mb=0):
        """dlogits = (softmax - onehot(target)) * valid / normalizer, on this rank's columns."""
        xp = backend.xp()
        exps, sumexp, safe, mine, valid, norm = self.pop(mb)
        exps /= sumexp[..., None]  # softmax, in place over the cached exponentials
        b_idx, t_idx = xp.nonzero(mine)
        exps[b_idx, t_idx, safe[b_idx, t_idx]] -= 1.0
        exps *= (valid * (dloss / max(norm, 1.0)))[..., None]
        return exps  # (B, T, V/tp)


def vocab_parallel_argmax(logits, tp, vocab: int):
    """The predicted token ids (B, T) when each tp rank holds a slice of the logits."""
    xp = backend.xp()
    cols = logits.shape[-1]
    start = tp.rank * cols
    masked = logits
    pad = start + cols - vocab
    if pad > 0:
        masked = logits.copy()
        masked[..., cols - min(pad, cols):] = -xp.inf
    idx = masked.argmax(axis=-1)  # (B, T)
    if tp.size == 1:
        return idx
    best = xp.take_along_axis(masked, idx[..., None], axis=-1)[..., 0]  # (B, T)
    all_best = tp.allgather(best[None], axis=0)  # (tp, B, T)
    all_idx = tp.allgather((idx + start)[None], axis=0)  # (tp, B, T)
    winner = all_best.argmax(axis=0)  # (B, T): the first rank wins ties, as a serial argmax
    return xp.take_along_axis(all_idx, winner[None], axis=0)[0]
