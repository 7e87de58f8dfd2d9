"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) and sequence parallelism
(Korthikanti et al. 2022), as the serial kernels plus named collectives.

Megatron splits each MLP and attention block into a column-parallel linear (every tp rank owns
some output columns: some MLP units, some heads) followed by a row-parallel linear (every rank
owns the matching input rows and produces a partial sum). Two conjugate operators glue them:

    f = copy_to_tp:      identity forward, allreduce backward   (before the column-parallel linear)
    g = reduce_from_tp:  allreduce forward, identity backward   (after the row-parallel linear)

so a block costs exactly 2 allreduces forward and 2 backward. Sequence parallelism notices that
the allreduce of g is immediately followed by work (LayerNorm, residual) that every rank repeats
on the full sequence; it replaces

    g  by reduce_scatter_seq: a reduce-scatter along T (each rank keeps T/tp tokens of the sum)
    f  by gather_seq:         an allgather along T (the column-parallel linear needs every token)

which moves the same bytes but stores the LayerNorm/residual activations once, not tp times.
A column-parallel linear under sequence parallelism caches only this rank's T/tp tokens of its
input and allgathers them again in backward for the weight gradient (Korthikanti et al. 2022,
section 4.2.2): one extra allgather per column-parallel linear in backward buys a layer whose
every cached activation is divided by tp, the paper's sbh (34/t + 5as/(ht)).

Every layer here caches activations only and reads its weight from the Param again in backward,
so ZeRO-3 may free a unit's gathered weights between its passes. Each linear ends its backward
with ``weight_grads(x, dy)``, the dW = x^T dy GEMM that needs no weight; zero-bubble schedules
postpone that call (``minipar.parallel.deferral``), the layers themselves never do.

With a tp group of one rank every collective is a no-op: the serial model is this code on a
1 x 1 x 1 mesh.
"""

from __future__ import annotations

from minipar import backend
from minipar.nn import functional as F
from minipar.nn import threads
from minipar.nn.module import Module, Param, Sharding, make_param
from minipar.nn.precision import float32, sum_fp32

SEQ_AXIS = 1  # activations are (B, T, C); sequence parallelism splits T


# --------------------------------------------------------------------------------------------
# Megatron's f and g and their sequence-parallel forms, as kernel pairs (forward, backward).


def copy_to_tp_fwd(x, tp):
    """f, forward: identity. Every tp rank already holds the full input."""
    return x


def copy_to_tp_bwd(dx, tp):
    """f, backward: allreduce. Each rank's column slice contributed part of dx."""
    return tp.allreduce(dx)


def reduce_from_tp_fwd(y, tp):
    """g, forward: allreduce the row-parallel partial sums into the full output."""
    return tp.allreduce(y)


def reduce_from_tp_bwd(dy, tp):
    """g, backward: identity. The output gradient is already whole on every rank."""
    return dy


def gather_seq_fwd(x, tp):
    """f under sequence parallelism, forward: allgather the T/tp token shards along T."""
    return tp.allgather(x, axis=SEQ_AXIS)


def gather_seq_bwd(dx, tp):
    """f under sequence parallelism, backward: reduce-scatter, each rank keeps its tokens' sum."""
    return tp.reduce_scatter(dx, axis=SEQ_AXIS)


def reduce_scatter_seq_fwd(y, tp):
    """g under sequence parallelism, forward: reduce-scatter the partial sums along T."""
    return tp.reduce_scatter(y, axis=SEQ_AXIS)


def reduce_scatter_seq_bwd(dy, tp):
    """g under sequence parallelism, backward: allgather the token shards of the gradient."""
    return tp.allgather(dy, axis=SEQ_AXIS)


def padded_vocab(vocab: int, tp_size: int) -> int:
    """The vocabulary rounded up so that tp divides it; padded entries are never predicted."""
    return -(-vocab // tp_size) * tp_size


# --------------------------------------------------------------------------------------------
# Linear layers.


class ColumnParallelLinear(Module):
    """y[:, cols of this rank] = f(x) W[:, cols] + b[cols]. The output stays split over tp.

    ``blocks`` cuts a fused weight block-wise (the [Q|K|V] projection: each rank takes the
    Q, K and V columns of its own heads). Backward hands the serial kernels their cache
    (input, weight, has bias) rebuilt: the input kept at forward, the weight read now.
    """

    def __init__(self, ctx, name: str, d_in: int, d_out: int, std: float, blocks: int = 1):
        super().__init__()
        self.tp, self.sp = ctx.tp, ctx.sequence_parallel
        axis, parts, index = (2 if blocks > 1 else 1), ctx.tp.size, ctx.tp.rank
        w_view = (d_in, blocks, d_out // blocks) if blocks > 1 else None
        b_view = (blocks, d_out // blocks) if blocks > 1 else None
        self.w = make_param(ctx, f"{name}.w", (d_in, d_out), std,
                            Sharding(axis, parts, index, view=w_view))  # (C, out/tp)
        self.b = make_param(ctx, f"{name}.b", (d_out,), "zeros",
                            Sharding(axis - 1, parts, index, view=b_view), decay=False)

    def forward(self, x, mb=0):
        if self.sp:
            x_full = gather_seq_fwd(x, self.tp)  # (B, T, C): allgather of every (B, T/tp, C)
        else:
            x_full = copy_to_tp_fwd(x, self.tp)  # (B, T, C): f is the identity forward
        y, _ = F.linear_fwd(x_full, self.w.data, self.b.data)  # (B, T, out/tp)
        self.save(mb, x)  # the input as given (T/tp tokens under SP), never the weight
        return y

    def backward(self, dy, mb=0):
        x = self.pop(mb)
        x_full = gather_seq_fwd(x, self.tp) if self.sp else x  # (B, T, C) again, for dW
        dx = F.linear_bwd_input(dy, (x_full, self.w.data, True))  # (B, T, C), partial over tp
        self.weight_grads(x_full, dy)
        if self.sp:
            return gather_seq_bwd(dx, self.tp)  # (B, T/tp, C): reduce-scatter along T
        return copy_to_tp_bwd(dx, self.tp)  # (B, T, C): f allreduces the partial sums

    def weight_grads(self, x, dy) -> None:
        """dW = x^T dy and db = sum of dy over the full input (B, T, C); needs no weight."""
        dw, db = F.linear_bwd_weight(dy, (x, None, True))  # (C, out/tp), (out/tp,)
        self.w.accumulate(dw)
        self.b.accumulate(db)


class RowParallelLinear(Module):
    """y = g(x[:, rows of this rank] W[rows, :]) + b. The input arrives split over tp."""

    def __init__(self, ctx, name: str, d_in: int, d_out: int, std: float):
        super().__init__()
        self.tp, self.sp = ctx.tp, ctx.sequence_parallel
        self.w = make_param(ctx, f"{name}.w", (d_in, d_out), std,
                            Sharding(axis=0, parts=ctx.tp.size, index=ctx.tp.rank))  # (in/tp, C)
        # The bias is added after the reduction, so it is replicated; under sequence parallelism
        # each rank adds it to its own tokens only and its gradient is a partial sum over tp.
        self.b = make_param(ctx, f"{name}.b", (d_out,), "zeros", decay=False)
        self.b.tp_partial_grad = self.sp

    def forward(self, x, mb=0):
        partial, _ = F.linear_fwd(x, self.w.data)  # (B, T, C): a partial sum over tp
        if self.sp:
            y = reduce_scatter_seq_fwd(partial, self.tp)  # (B, T/tp, C): this rank's tokens
        else:
            y = reduce_from_tp_fwd(partial, self.tp)  # (B, T, C): g allreduces the sums
        y += self.b.data  # once, after the sum
        self.save(mb, x)  # the input only, never the weight
        return y

    def backward(self, dy, mb=0):
        x = self.pop(mb)  # (B, T, in/tp)
        self.b.accumulate(sum_fp32(dy, axis=(0, 1)))  # (C,), over this rank's tokens under SP
        if self.sp:
            dy_full = reduce_scatter_seq_bwd(dy, self.tp)  # (B, T, C): allgather along T
        else:
            dy_full = reduce_from_tp_bwd(dy, self.tp)  # (B, T, C): g is the identity backward
        dx = F.linear_bwd_input(dy_full, (x, self.w.data, False))  # (B, T, in/tp)
        self.weight_grads(x, dy_full)
        return dx

    def weight_grads(self, x, dy) -> None:
        """dW = x^T dy for this rank's input rows; needs no weight."""
        dw, _ = F.linear_bwd_weight(dy, (x, None, False))  # (in/tp, C)
        self.w.accumulate(dw)


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel embedding, LM head and cross-entropy.


class VocabParallelEmbedding(Module):
    """Each tp rank holds V/tp rows; a token looked up elsewhere contributes zeros here, and g
    (or the sequence-parallel reduce-scatter) sums the pieces into the full embedding."""

    def __init__(self, ctx, name: str, vocab: int, width: int, std: float):
        super().__init__()
        self.tp, self.sp = ctx.tp, ctx.sequence_parallel
        self.rows = padded_vocab(vocab, self.tp.size) // self.tp.size
        self.start = self.tp.rank * self.rows
        self.w = make_param(ctx, f"{name}.w", (vocab, width), std,
                            Sharding(axis=0, parts=self.tp.size, index=self.tp.rank,
                                     padded=padded_vocab(vocab, self.tp.size)))  # (V/tp, C)

    def forward(self, ids, mb=0):
        local, valid = ids, None
        if self.tp.size > 1:
            local = ids - self.start  # (B, T)
            valid = (local >= 0) & (local < self.rows)  # (B, T): ids in this rank's rows
        y, cache = F.embedding_fwd(local, self.w.data, valid)  # (B, T, C) partial over tp
        self.save(mb, cache)
        if self.sp:
            return reduce_scatter_seq_fwd(y, self.tp)  # (B, T/tp, C)
        return reduce_from_tp_fwd(y, self.tp)  # (B, T, C)

    def backward(self, dy, mb=0):
        if self.sp:
            dy = reduce_scatter_seq_bwd(dy, self.tp)  # (B, T, C)
        else:
            dy = reduce_from_tp_bwd(dy, self.tp)  # (B, T, C)
        self.w.accumulate(F.embedding_bwd(dy, self.pop(mb)))
        return None


class VocabParallelHead(Module):
    """Logits over this rank's V/tp slice of the vocabulary: a column-parallel linear with no
    bias. With weight tying it reads the embedding's (V/tp, C) rows, transposed."""

    def __init__(self, ctx, name: str, width: int, vocab: int, std: float,
                 tied: Param | None = None):
        super().__init__()
        self.tp, self.sp = ctx.tp, ctx.sequence_parallel
        self.tied = tied
        if tied is None:
            self.w = make_param(ctx, f"{name}.w", (width, vocab), std,
                                Sharding(axis=1, parts=self.tp.size, index=self.tp.rank,
                                         padded=padded_vocab(vocab, self.tp.size)))

    def weight(self):
        return self.tied.data.T if self.tied is not None else self.w.data  # (C, V/tp)

    def forward(self, x, mb=0):
        if self.sp:
            x_full = gather_seq_fwd(x, self.tp)  # (B, T, C)
        else:
            x_full = copy_to_tp_fwd(x, self.tp)  # (B, T, C)
        logits, _ = F.linear_fwd(x_full, self.weight())  # (B, T, V/tp)
        self.save(mb, x)  # the input as given, never the weight
        return logits

    def backward(self, dlogits, mb=0):
        x = self.pop(mb)
        x_full = gather_seq_fwd(x, self.tp) if self.sp else x  # (B, T, C)
        dx = F.linear_bwd_input(dlogits, (x_full, self.weight(), False))  # (B, T, C) partial
        self.weight_grads(x_full, dlogits)
        if self.sp:
            return gather_seq_bwd(dx, self.tp)  # (B, T/tp, C)
        return copy_to_tp_bwd(dx, self.tp)  # (B, T, C)

    def weight_grads(self, x, dlogits) -> None:
        """dW = x^T dlogits; a tied weight receives it transposed, as embedding rows."""
        dw, _ = F.linear_bwd_weight(dlogits, (x, None, False))  # (C, V/tp)
        if self.tied is not None:
            self.tied.accumulate(dw.T.copy())
        else:
            self.w.accumulate(dw)

    def params(self) -> list[Param]:
        return [] if self.tied is not None else [self.w]  # a tied weight is the embedding's


def mask_padding(logits, tp, vocab: int):
    """Set this rank's columns past the real vocabulary to -inf, in place; returns ``logits``."""
    cols = logits.shape[-1]  # V/tp
    first_pad = vocab - tp.rank * cols  # local index of the first padded column
    if first_pad < cols:
        logits[..., max(first_pad, 0):] = -backend.xp().inf
    return logits


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
        self.ignore_index = ignore_index

    def forward(self, logits, targets, normalizer=None, mb=0):
        """logits (B, T, V/tp), targets (B, T) -> scalar loss (same on every tp rank)."""
        xp, tp = backend.xp(), self.tp
        dtype = logits.dtype  # of the logits' gradient (16-bit under mixed precision)
        logits = float32(logits)  # (B, T, V/tp): log-sum-exp in fp32 (minipar.nn.precision)
        mask_padding(logits, tp, self.vocab)
        valid = targets != self.ignore_index  # (B, T)
        norm = float(valid.sum() if normalizer is None else normalizer)
        rows, cols = logits.shape[:-1], logits.shape[-1]
        flat = logits.reshape(-1, cols)  # (N, V/tp)
        lmax = xp.empty(len(flat), dtype=flat.dtype)  # (N,)
        exps = xp.empty_like(flat)  # (N, V/tp)
        lsum = xp.empty(len(flat), dtype=flat.dtype)  # (N,)
        # A slice of rows at a time on the worker threads (minipar.nn.threads): the same bits
        # as whole-array calls, the (N, V) passes shared by the cores.
        block = threads.cache_rows(cols)
        threads.map_rows(lambda r: xp.max(flat[r], axis=-1, out=lmax[r]), len(flat),
                         flat.size, block)
        gmax = tp.allreduce(lmax.reshape(rows), op="max")  # (B, T)
        gflat = gmax.reshape(-1, 1)  # (N, 1)

        def shift_exp(r):  # shifted logits in place (the head's output is not reused), exp
            flat[r] -= gflat[r]
            xp.exp(flat[r], out=exps[r])
            exps[r].sum(axis=-1, out=lsum[r])

        threads.map_rows(shift_exp, len(flat), flat.size, block)
        logits, exps = flat.reshape(logits.shape), exps.reshape(logits.shape)  # (B, T, V/tp)
        sumexp = tp.allreduce(lsum.reshape(rows))  # (B, T)
        local = targets - tp.rank * cols  # (B, T)
        mine = valid & (local >= 0) & (local < cols)  # (B, T): targets in this rank's slice
        safe = xp.where(mine, local, 0)  # (B, T)
        picked = xp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # (B, T)
        # where, not a product: on a rank whose slice is all padding the pick is -inf, and
        # -inf * 0 would be nan (vocab 5 over tp 4: the last rank holds padding only).
        target_logit = tp.allreduce(xp.where(mine, picked, 0.0))  # (B, T)
        nll = xp.log(sumexp) - target_logit  # (B, T)
        loss = (nll * valid).sum() / max(norm, 1.0)
        self.save(mb, (exps, sumexp, safe, mine, valid, norm, dtype))
        return loss

    def backward(self, dloss=1.0, mb=0):
        """dlogits = (softmax - onehot(target)) * valid / normalizer, on this rank's columns."""
        xp = backend.xp()
        exps, sumexp, safe, mine, valid, norm, dtype = self.pop(mb)
        cols = exps.shape[-1]
        flat, sums = exps.reshape(-1, cols), sumexp.reshape(-1, 1)  # (N, V/tp), (N, 1)
        block = threads.cache_rows(cols)
        # softmax, in place over the exponentials
        threads.map_rows(lambda r: xp.divide(flat[r], sums[r], out=flat[r]), len(flat),
                         flat.size, block)
        hit = xp.flatnonzero(mine.reshape(-1))  # (M,) rows whose target is in this slice
        flat[hit, safe.reshape(-1)[hit]] -= 1.0
        factor = (valid * (dloss / max(norm, 1.0))).reshape(-1, 1)  # (N, 1)
        threads.map_rows(lambda r: xp.multiply(flat[r], factor[r], out=flat[r]), len(flat),
                         flat.size, block)
        grad = flat.reshape(exps.shape)  # (B, T, V/tp)
        return grad.astype(dtype, copy=False)  # 16-bit under mixed precision


def vocab_parallel_argmax(logits, tp, vocab: int):
    """The predicted token ids (B, T) when each tp rank holds a slice of the logits."""
    xp = backend.xp()
    masked = mask_padding(float32(logits).copy(), tp, vocab)  # (B, T, V/tp)
    idx = masked.argmax(axis=-1)  # (B, T)
    if tp.size == 1:
        return idx
    best = xp.take_along_axis(masked, idx[..., None], axis=-1)[..., 0]  # (B, T)
    all_best = tp.allgather(best[None], axis=0)  # (tp, B, T)
    all_idx = tp.allgather((idx + tp.rank * logits.shape[-1])[None], axis=0)  # (tp, B, T)
    winner = all_best.argmax(axis=0)  # (B, T): the first rank wins ties, as a serial argmax
    return xp.take_along_axis(all_idx, winner[None], axis=0)[0]
