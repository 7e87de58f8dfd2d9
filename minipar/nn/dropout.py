"""Dropout that does not depend on the layout: every rank draws exactly its slice of the mask
the serial run draws, so a dp x tp x pp run with dropout still equals the serial run.

Dropout (Srivastava et al. 2014) zeroes each element with probability P and scales the rest by
1 / (1 - P) ("inverted" dropout, so E[output] = input and evaluation simply turns it off).
minipar applies it where GPT-2 and Megatron-LM do: to the attention probabilities, to the
output of each attention and MLP block before the residual add, and to the embedding.

Why this is hard in parallel. A stateful generator (``numpy.random.default_rng(seed)`` drawing
one tensor after another) hands out numbers in the order they are asked for. In a serial run
that order is "every element of the batch, layer after layer"; a tensor-parallel rank holds
only some heads, a sequence-parallel rank only some tokens, a data-parallel rank only some rows,
a pipeline stage only some layers: each would have to skip exactly what the others draw.
Megatron-LM (Shoeybi et al. 2019) instead keeps an *RNG tracker*: one generator state for
replicated regions (the same seed on every tp rank, so the residual-stream masks agree) and one
per tp rank for the sharded regions (the attention probabilities of its own heads), forked
around each use. That makes the ranks consistent with each other, but the masks still depend
on the layout: a tp=2 run drops other attention probabilities than the serial run, so the two
cannot be compared number for number, and changing the layout changes the training.

How minipar does it. A counter-based generator (Salmon et al. 2011, "Parallel random numbers:
as easy as 1, 2, 3") is a pure function: ``Philox(counter, key)`` -> 4 x 64 random bits, with
no state between calls. So the random number of an element can be *addressed* instead of
*drawn in order*:

    key     = hash(seed, step, site)         site: the layer's name, "blocks.0.attn.probs"
    word g  = 32-bit word g % 8 of Philox4x64-10(counter = g // 8, key)
    keep g  = word g >= floor(P * 2^32)      (kept with probability 1 - P, to within 2^-32)

where ``g`` is the element's flat index in the *global* tensor of the step: rows numbered over
the whole global batch (a dp rank's microbatch starts at its first global row, so the
microbatch index enters as a row offset and the serial run's single microbatch draws the same
rows), all heads, all tokens. A rank computes the global indices of its own elements and
evaluates the generator there: its own heads (tp), tokens (sequence parallel), rows (dp and
microbatches) and layers (pp, by the site's name), nothing else. Because the elements it holds
are a few contiguous runs of the global order (one per row), each run costs one NumPy
``Philox`` with its counter set to the run's start. A replicated tensor (the residual stream
under plain tp) gets the same mask on every tp rank because every rank addresses the same
elements. No tracker, no forking, and the mask is the serial run's by construction.

Backward multiplies by the same mask. The forward keeps the mask (one byte per element, a
boolean array in the layer's cache, so the activation meter ``minipar.nn.memory`` counts it),
as Megatron does and as Korthikanti et al. 2022 count it. Regenerating it in backward (it is a
pure function of the step and the indices) would save that byte per element at the price of a
second Philox draw per element; keeping it makes the measured memory the memory the formula
counts, and the backward as cheap as the forward's multiply. The attention keeps the mask and
the softmax output, not the dropped probabilities (one elementwise product of the two,
recomputed in backward). The blockwise kernel and the ring take the other road: they keep no
(T, T) array at all, so each tile draws its slice of the same mask (``TileMasks``) in forward
and again in backward.

The kernel pair itself, y = x * keep / (1 - P) and its backward, lives with the other kernels
in ``minipar.nn.functional`` (the attention kernel applies it inside its per-head loop); this
file is where the masks come from and the ``Dropout`` module of the residual stream.

Evaluation and decoding run with the microbatch key ``"_eval"``, for which ``MaskSource.keep``
draws nothing: dropout is off and the result is deterministic.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy

from minipar import backend
from minipar.nn.functional import dropout_bwd, dropout_fwd  # y = x * keep / (1 - P)
from minipar.nn.module import Module

WORDS_PER_BLOCK = 8  # Philox4x64 gives 4 x 64 bits per counter value: 8 words of 32 bits
EVAL = "_eval"  # the microbatch key of evaluation passes (as in minipar.nn.memory)


# -- the generator: a pure function of (key, global index) ---------------------------------------

def site_key(seed: int, step: int, site: str) -> numpy.ndarray:
    """Philox's 128-bit key for one dropout site of one step: a hash of (seed, step, site), so
    every site and step has its own stream and no layout enters it."""
    return numpy.random.SeedSequence([seed, step, zlib.crc32(site.encode())]).generate_state(
        2, numpy.uint64)


def philox_words(key: numpy.ndarray, first: int, count: int) -> numpy.ndarray:
    """32-bit words ``first .. first + count - 1`` of the stream of ``key`` (host uint32).

    Word g is half of output (g % 8) // 2 of Philox4x64-10 at counter g // 8: its low 32 bits
    when g is even, its high 32 bits when g is odd. NumPy's ``Philox`` adds one to its counter
    before each block, so it starts one below the first block we want (modulo 2^256)."""
    block, lead = divmod(first, WORDS_PER_BLOCK)
    n_blocks = -(-(lead + count) // WORDS_PER_BLOCK)
    gen = numpy.random.Philox(key=key, counter=(block - 1) % 2 ** 256)
    raw = gen.random_raw(4 * n_blocks).astype("<u8", copy=False)  # 4 outputs per block
    return raw.view("<u4")[lead:lead + count]  # little-endian: low word, then high word


def threshold(p: float) -> int:
    """Words below this are dropped: floor(P * 2^32) (exact: P * 2^32 is a float product)."""
    return int(p * 2 ** 32)


def keep_mask(key: numpy.ndarray, p: float, shape: tuple, start: tuple,
              full: tuple) -> numpy.ndarray:
    """The keep mask (host bool, ``shape``) of the block of a global tensor that starts at
    ``start`` (one offset per axis), where ``full`` gives the global size of every axis but
    the first (rows are numbered over the whole global batch, which needs no size).

    The block's elements are contiguous runs of the global C order: every axis after the last
    one the block cuts is whole, so a run spans that axis's slice times the whole trailing
    axes; there is one run per index of the axes before it (one per row for tp heads or
    sequence-parallel tokens, a single run when only rows are cut)."""
    ndim = len(shape)
    if len(start) != ndim or len(full) != ndim - 1:
        raise ValueError(f"keep_mask: shape {shape}, start {start}, full (after rows) {full}")
    sizes = (None, *full)
    cut = max([a for a in range(1, ndim) if shape[a] != sizes[a]], default=0)  # last cut axis
    run = math.prod(shape[cut:])  # elements per contiguous run
    strides = [math.prod(full[a:]) for a in range(ndim)]  # global C-order strides
    t = threshold(p)
    out = numpy.empty((math.prod(shape[:cut]), run), dtype=bool)  # one row per run
    for i, idx in enumerate(itertools.product(*(range(n) for n in shape[:cut]))):
        first = sum((start[a] + idx[a]) * strides[a] for a in range(cut))
        out[i] = philox_words(key, first + start[cut] * strides[cut], run) >= t
    return out.reshape(shape)


# -- the step's state: which step, which global rows each microbatch holds ---------------------

class MaskSource:
    """This rank's dropout: the probability, the seed, and where the current step's
    microbatches sit in the global batch. The engine sets the step before its passes
    (``begin_step``); layers ask for their slice of a site's mask (``keep``)."""

    def __init__(self, seed: int, p: float):
        self.seed, self.p = seed, float(p)
        self.step: int | None = None
        self.first_rows: dict = {}  # microbatch -> its first row in the global batch

    @property
    def active(self) -> bool:
        return self.p > 0.0

    def begin_step(self, step: int, first_rows: list[int]) -> None:
        """Step ``step`` runs microbatches 0, 1, ... starting at these global rows."""
        self.step, self.first_rows = step, dict(enumerate(first_rows))

    def keep(self, site: str, mb, shape: tuple, start: tuple = (), full: tuple = ()):
        """This rank's slice of the keep mask of ``site`` (on the device), or None when
        dropout is off: P = 0, or an evaluation pass. ``shape`` is the local tensor's, rows
        first; ``start`` and ``full`` give this slice's offset and the global size along every
        axis after the rows (default: the whole axis, offset 0)."""
        if not self.active or mb == EVAL:
            return None
        if self.step is None or mb not in self.first_rows:
            raise RuntimeError(f"dropout at {site}: microbatch {mb!r} has no global rows; "
                               "the engine sets them with begin_step before each step")
        full = tuple(full) or tuple(shape[1:])
        start = (self.first_rows[mb], *(tuple(start) or (0,) * len(full)))
        mask = keep_mask(site_key(self.seed, self.step, site), self.p, tuple(shape), start, full)
        return backend.from_host(mask)

    def tiles(self, site: str, mb, local_heads: int, h0: int, n_heads: int, t: int):
        """The ``TileMasks`` of ``site``'s (B, n_heads, t, t) mask for this rank's heads
        h0 .. h0 + local_heads - 1, or None when dropout is off (P = 0, or evaluation)."""
        if not self.active or mb == EVAL:
            return None
        if self.step is None or mb not in self.first_rows:
            raise RuntimeError(f"dropout at {site}: microbatch {mb!r} has no global rows; "
                               "the engine sets them with begin_step before each step")
        return TileMasks(site_key(self.seed, self.step, site), self.p, self.first_rows[mb],
                         local_heads, h0, n_heads, t)


class TileMasks:
    """The attention-probability mask of one (site, microbatch) as a function of the tile: a
    blockwise kernel or a ring (``minipar.nn.blockwise``, ``minipar.parallel.context``) asks
    for the keep mask of the (query range, key range) tile it is about to compute, for some of
    its (batch, head) pairs, and gets the serial run's (B, H, T, T) mask there.

    Nothing is stored: backward asks again with the same address and gets the same bits, so a
    blockwise kernel keeps O(T) per head with dropout too (the cost model counts no mask for
    it). A tile is drawn as whole mask rows (one Philox run per (batch, head): the tile's rows
    are contiguous in the global order only across all T keys) and cut to its keys, since one
    generator call costs about as much as a few thousand words. The rows are drawn a bounded
    number at a time (``ROW_WORDS``): a tile of many query rows would otherwise draw a whole
    (rows, T) block per head, as large as the softmax the blockwise kernel avoids keeping.
    The whole rows still cost random words: about T / tk per element a tile keeps."""

    ROW_WORDS = 1 << 16  # mask elements drawn per (batch, head) at once, whole rows of T keys

    def __init__(self, key, p: float, row0: int, local_heads: int, h0: int, n_heads: int,
                 t: int):
        self.key, self.p, self.row0 = key, p, row0
        self.hl, self.h0, self.n_heads, self.t = local_heads, h0, n_heads, t

    def __call__(self, pairs: slice, q_start: int, tq: int, k_start: int, tk: int):
        """Keep mask (n, tq, tk) on the device of (batch, head) pairs ``pairs`` (numbered
        batch-major over this rank's heads, as the kernels' (B*H/tp) axis), global query rows
        q_start.. and global keys k_start.."""
        b0, b1 = pairs.start // self.hl, -(-pairs.stop // self.hl)  # the batch rows touched
        lo, hi = pairs.start - b0 * self.hl, pairs.stop - b0 * self.hl
        out = numpy.empty((hi - lo, tq, tk), dtype=bool)
        step = max(1, self.ROW_WORDS // self.t)  # query rows drawn at once: a bounded peak
        for q in range(0, tq, step):
            n = min(step, tq - q)
            rows = keep_mask(self.key, self.p, (b1 - b0, self.hl, n, self.t),
                             (self.row0 + b0, self.h0, q_start + q, 0),
                             (self.n_heads, self.t, self.t))  # (b, H/tp, n, T) whole rows
            out[:, q:q + n] = rows.reshape(-1, n, self.t)[lo:hi, :, k_start:k_start + tk]
        return backend.from_host(out)


class Dropout(Module):
    """Dropout of an activation of the residual stream, (B, T, C), or (B, T/tp, C) under
    sequence parallelism, where this rank holds tokens [rank T/tp, (rank + 1) T/tp).

    Under context parallelism ``tokens`` = (global positions of this cp rank's tokens in local
    order, host int array; the global length T): the rank's tokens are then one or more
    contiguous runs of the sequence (two chunks under the zig-zag cut), each drawn as its own
    block of the global (B, T, C) mask."""

    def __init__(self, ctx, site: str, tokens: tuple | None = None):
        super().__init__()
        self.site, self.masks = site, ctx.dropout
        self.tp, self.sp = ctx.tp, ctx.sequence_parallel
        self.tokens = tokens

    def _on(self) -> bool:
        return self.masks is not None and self.masks.active

    def forward(self, x, mb=0):
        if not self._on():
            return x  # off: the very same array, so P = 0 is bit for bit the model without it
        b, t, c = x.shape
        t0 = self.tp.rank * t if self.sp else 0
        if self.tokens is not None:
            keep = self._keep_runs(mb, b, t0, t, c)  # (B, T, C)
        else:
            keep = self.masks.keep(self.site, mb, x.shape, (t0, 0),
                                   (t * self.tp.size if self.sp else t, c))  # (B, T, C)
        if keep is None:  # evaluation
            return x
        self.save(mb, keep)  # 1 byte per element, kept for backward
        return dropout_fwd(x, keep, self.masks.p)  # (B, T, C)

    def _keep_runs(self, mb, b: int, t0: int, t: int, c: int):
        """The mask of local tokens t0 .. t0 + t - 1 under context parallelism: one block of
        the global mask per contiguous run of their global positions. None in evaluation."""
        positions, length = self.tokens
        pos = positions[t0:t0 + t]  # (t,) global positions, in local order
        cuts = [0, *(numpy.flatnonzero(numpy.diff(pos) != 1) + 1).tolist(), t]
        parts = [self.masks.keep(self.site, mb, (b, e - a, c), (int(pos[a]), 0), (length, c))
                 for a, e in zip(cuts[:-1], cuts[1:])]  # (B, run, C) each
        if parts[0] is None:
            return None
        return parts[0] if len(parts) == 1 else backend.xp().concatenate(parts, axis=1)

    def backward(self, dy, mb=0):
        if not self._on():
            return dy
        return dropout_bwd(dy, self.pop(mb), self.masks.p)  # (B, T, C)


__all__ = ["site_key", "philox_words", "threshold", "keep_mask", "dropout_fwd", "dropout_bwd",
           "MaskSource", "TileMasks", "Dropout", "WORDS_PER_BLOCK"]
