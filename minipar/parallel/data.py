"""Data parallelism: every dp rank runs the same model on its slice of the global batch, then the
gradients are summed over the dp group so that every replica takes the serial step.

Why a sum and not an average: each microbatch loss is already divided by the number of scored
tokens in the *global* batch (see ``VocabParallelCrossEntropy``), so the sum over ranks and
microbatches of the gradients is exactly the gradient of the serial mean loss.

Gradients live in one flat buffer: each ``Param.grad`` is a view into it (as PyTorch DDP's
gradient-as-bucket-view), so the sync needs no copy. ``FlatLayout`` says where each parameter
sits in that buffer and cuts it into *segments*, the pieces synced as one collective.

Two modes (``bucket_mb``):

- 0, the default and the one to read first: after the whole backward, ONE allreduce of the flat
  gradient over dp.
- > 0, bucketed overlap: the flat buffer is cut into ceil(bytes / bucket) near-equal segments
  (buckets of at most ``bucket_mb`` MiB). Backward produces gradients from the last unit to the
  first, so buckets are launched from the end of the buffer: as soon as every parameter touching
  a bucket has had its last backward of the step, a non-blocking ``iallreduce_`` starts on it
  while the backward of earlier units goes on; ``sync_grads`` waits for them all. With gradient
  accumulation, buckets launch only during the LAST microbatch's backward (one sync per step).
  The same bytes as the plain allreduce, in more calls. Knowing which microbatch is the last
  needs the count (``microbatches=``); without it the first step counts the backward passes
  and syncs all buckets in ``sync_grads``, later steps overlap. (ZeRO-1/2 reduce-scatter each
  bucket instead, with a blocking call: ``Comm`` has no non-blocking reduce-scatter.)

Parameters whose gradient is a partial sum over the tp group (LayerNorm, biases and positions in
sequence-parallel regions, Korthikanti et al. 2022) are allreduced over tp once per step, after
the dp sync (sums over dp and over tp commute).

ZeRO stages 1-3 (``minipar.parallel.zero``) reuse ``FlatLayout`` and the bucket machinery here;
``minipar.parallel.zero.strategy_class`` picks the class for a ZeRO stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

from minipar import backend
from minipar.dist.algorithms import chunk_bounds
from minipar.nn.module import Hooks, Param
from minipar.nn.optim import local_grad_sq, make_optimizer

MIB = 2 ** 20  # bucket_mb counts MiB, as the cost model (minipar.sim.comm_volume) does


def flatten(arrays, dtype):
    """One contiguous buffer holding ``arrays`` back to back."""
    xp = backend.xp()
    sizes = [a.size for a in arrays]
    flat = xp.empty(sum(sizes), dtype=dtype)
    offset = 0
    for a, n in zip(arrays, sizes):
        flat[offset:offset + n] = a.reshape(-1)
        offset += n
    return flat


def unflatten_into(flat, arrays) -> None:
    """Copy slices of ``flat`` back into ``arrays`` (in place)."""
    offset = 0
    for a in arrays:
        a[...] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size


def sync_tp_partial_grads(params, tp) -> None:
    """Allreduce over tp the gradients that each tp rank holds only a partial sum of."""
    partial = [p for p in params if p.tp_partial_grad]
    if tp.size == 1 or not partial:
        return
    for p in partial:
        if p.grad is None:
            p.grad = backend.xp().zeros_like(p.data)
    flat = flatten([p.grad for p in partial], partial[0].grad.dtype)
    tp.allreduce_(flat)
    unflatten_into(flat, [p.grad for p in partial])


def bucket_count(nbytes: int, bucket_mb: float, most: int) -> int:
    """How many segments a buffer of ``nbytes`` is cut into: ceil(nbytes / bucket), 1..most."""
    if bucket_mb <= 0:
        return 1
    return max(1, min(most, math.ceil(nbytes / (bucket_mb * MIB))))


# -- where parameters live in a flat buffer ----------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """Elements [start, start + size) of the flat buffer, synced by one collective.

    In a sharded layout ``size`` is a multiple of dp and dp rank r owns the r-th of its dp equal
    slices; ``shard_start`` is where that slice begins in the rank's shard (its owned slices of
    all segments, back to back).
    """

    start: int
    size: int
    shard_start: int
    params: tuple[int, ...]  # indices of the parameters that overlap the segment


class FlatLayout:
    """The offset of every parameter in one flat (padded) buffer, and its segments.

    ``contiguous``: parameters back to back in the given order; sharded, the buffer is padded at
    the end to a multiple of dp. ``grouped``: one segment per group of parameters, each padded
    on its own (ZeRO-3's units, so a unit can be gathered by itself).
    """

    def __init__(self, params, offsets: list[int], total: int, segments: list[Segment],
                 dp: int, rank: int):
        self.params = list(params)
        self.offsets = offsets
        self.sizes = [int(p.data.size) for p in self.params]
        self.shapes = [tuple(p.data.shape) for p in self.params]
        self.numel = sum(self.sizes)
        self.total = total
        self.segments = segments
        self.dp, self.rank = dp, rank
        self.shard_size = sum(s.size // dp for s in segments)

    @classmethod
    def contiguous(cls, params, dp: int, rank: int, n_segments: int = 1,
                   sharded: bool = False) -> "FlatLayout":
        sizes = [int(p.data.size) for p in params]
        offsets = [0, *accumulate(sizes)][:-1]
        numel = sum(sizes)
        if not sharded:  # nobody owns a slice: every rank holds the whole buffer
            bounds = chunk_bounds(numel, max(1, min(n_segments, numel)))
            spans = [(b.start, b.stop - b.start) for b in bounds]
            return cls(params, offsets, numel, _segments(spans, offsets, sizes, 1), 1, 0)
        rows = -(-numel // dp)  # each segment is rows x dp elements, padding at the very end
        bounds = chunk_bounds(rows, max(1, min(n_segments, rows)))
        spans = [(b.start * dp, (b.stop - b.start) * dp) for b in bounds]
        return cls(params, offsets, rows * dp, _segments(spans, offsets, sizes, dp), dp, rank)

    @classmethod
    def grouped(cls, groups: list[list], dp: int, rank: int) -> "FlatLayout":
        params, offsets, spans, start = [], [], [], 0
        for group in groups:
            offset = start
            for p in group:
                params.append(p)
                offsets.append(offset)
                offset += int(p.data.size)
            size = -(-(offset - start) // dp) * dp
            spans.append((start, size))
            start += size
        sizes = [int(p.data.size) for p in params]
        return cls(params, offsets, start, _segments(spans, offsets, sizes, dp), dp, rank)

    def view(self, flat, i: int, origin: int = 0):
        """Parameter i's elements of ``flat``, shaped like the parameter (a view, no copy).
        ``flat`` may be a piece of the buffer that starts at element ``origin``."""
        lo = self.offsets[i] - origin
        return flat[lo:lo + self.sizes[i]].reshape(self.shapes[i])

    def local(self, k: int) -> slice:
        """This rank's slice of segment k, in flat-buffer coordinates."""
        seg = self.segments[k]
        c = seg.size // self.dp
        return slice(seg.start + self.rank * c, seg.start + (self.rank + 1) * c)

    def shard_of(self, flat):
        """This rank's shard of a full flat buffer (a new array)."""
        xp = backend.xp()
        return xp.concatenate([flat[self.local(k)] for k in range(len(self.segments))])

    def unshard(self, gathered, out) -> None:
        """Fill the flat buffer ``out`` from every rank's shard, ``gathered`` (dp * shard,)."""
        rows = gathered.reshape(self.dp, self.shard_size)  # (dp, shard)
        for seg in self.segments:
            block = rows[:, seg.shard_start:seg.shard_start + seg.size // self.dp]  # (dp, c)
            out[seg.start:seg.start + seg.size] = block.reshape(-1)

    def runs(self, value_of) -> list[tuple]:
        """Maximal runs of this rank's shard lying in parameters with the same
        ``value_of(param)``: (value, flat start, shard start, size); padding is left out."""
        out: list[list] = []
        for k, seg in enumerate(self.segments):
            mine = self.local(k)
            for i in seg.params:
                lo = max(mine.start, self.offsets[i])
                hi = min(mine.stop, self.offsets[i] + self.sizes[i])
                if lo >= hi:
                    continue
                value, shard = value_of(self.params[i]), seg.shard_start + lo - mine.start
                last = out[-1] if out else None
                if (last and last[0] == value and last[1] + last[3] == lo
                        and last[2] + last[3] == shard):
                    last[3] += hi - lo
                else:
                    out.append([value, lo, shard, hi - lo])
        return [tuple(r) for r in out]


def _segments(spans, offsets, sizes, dp) -> list[Segment]:
    segs, shard = [], 0
    for start, size in spans:
        overlap = tuple(i for i, (o, n) in enumerate(zip(offsets, sizes))
                        if o < start + size and o + n > start)
        segs.append(Segment(start, size, shard, overlap))
        shard += size // dp
    return segs


# -- which unit finishes which parameter ---------------------------------------------------------

def params_used(unit) -> list:
    """Every Param a unit reads, its own and borrowed ones (a tied head reads the embedding)."""
    found: dict[int, object] = {}
    stack = [unit]
    while stack:
        module = stack.pop(0)
        for value in vars(module).values():
            if isinstance(value, Param):
                found.setdefault(id(value), value)
        stack.extend(module.children())
    return list(found.values())


def unit_owners(chunks, params) -> tuple[list, dict[int, int]]:
    """(units in forward order, {id(param): index of its owner unit}).

    A parameter's owner is the first unit to use it in forward, so the last in backward: its
    gradient is final after the owner's backward (a tied embedding after the embedding's, not
    the head's). Every parameter must be used by exactly one chunk.
    """
    units = [u for c in chunks for u in c.units]
    chunk_of: dict[int, int] = {}
    owner: dict[int, int] = {}
    u = 0
    for ci, chunk in enumerate(chunks):
        for unit in chunk.units:
            for p in params_used(unit):
                if chunk_of.setdefault(id(p), ci) != ci:
                    raise NotImplementedError(f"{p.name} is used by two model chunks; data "
                                              "parallel hooks need each parameter in one chunk")
                owner.setdefault(id(p), u)
            u += 1
    missing = [p.name for p in params if id(p) not in owner]
    if missing:
        raise ValueError(f"parameters used by no unit of the chunks: {missing[:5]}")
    return units, owner


class BackwardHooks(Hooks):
    """Tells a data-parallel strategy when a unit's backward of a microbatch has ended."""

    def __init__(self, strategy):
        self.strategy = strategy

    def post_backward(self, unit, mb) -> None:
        self.strategy.unit_backward_done(unit, mb)


# -- plain data parallelism (ZeRO-0) and the bucket machinery ZeRO-1/2 share --------------------

class GradSync:
    """Flat gradient buffer, segments, and launching segments as backward finishes them.

    Subclasses say how a segment is synced (``_sync_segment``) and what happens once all are
    (``_after_sync``).
    """

    zero = 0
    sharded = False

    def __init__(self, params, mesh, bucket_mb: float = 0.0, microbatches: int | None = None):
        self.params = list(params)
        self.mesh = mesh
        self.bucket_mb = float(bucket_mb)
        self.microbatches = microbatches  # None: learned from the first step's backward passes
        self.dtype = self.params[0].data.dtype
        n = sum(int(p.data.size) for p in self.params)
        padded = -(-n // mesh.dp.size) * mesh.dp.size if self.sharded else n
        most = padded // mesh.dp.size if self.sharded else n
        self.layout = FlatLayout.contiguous(
            self.params, mesh.dp.size, mesh.dp_rank,
            bucket_count(padded * self.dtype.itemsize, self.bucket_mb, most), self.sharded)
        self._units: dict[int, int] = {}  # id(unit) -> index, set by install_hooks
        self._owned: list[list[int]] = []  # unit index -> indices of the params it finishes
        self._reset_step()

    # -- hooks ---------------------------------------------------------------------------------

    def install_hooks(self, chunks) -> None:
        """Bucketed mode watches every unit's backward; the plain mode needs no hooks."""
        if self.bucket_mb <= 0:
            return
        units, owner = unit_owners(chunks, self.params)
        self._units = {id(u): i for i, u in enumerate(units)}
        self._owned = [[] for _ in units]
        for i, p in enumerate(self.layout.params):
            self._owned[owner[id(p)]].append(i)
        for chunk in chunks:
            chunk.hooks = BackwardHooks(self)

    def unit_backward_done(self, unit, mb) -> None:
        """A unit's backward of microbatch ``mb`` ended: launch every bucket it completed."""
        u = self._units[id(unit)]
        self._backwards[u] = self._backwards.get(u, 0) + 1
        if self.microbatches is None or self._backwards[u] != self.microbatches:
            return
        self._done.update(self._owned[u])
        while self._next >= 0 and self._done.issuperset(self.layout.segments[self._next].params):
            self._launch(self._next, overlap=True)
            self._next -= 1

    def _reset_step(self) -> None:
        self._backwards: dict[int, int] = {}
        self._done: set[int] = set()
        self._next = len(self.layout.segments) - 1  # buckets launch from the end of the buffer
        self._pending: list = []

    # -- the step --------------------------------------------------------------------------------

    def _bind_grads(self, flat) -> None:
        self._grad_views = [self.layout.view(flat, i) for i in range(len(self.layout.params))]
        for p, v in zip(self.layout.params, self._grad_views):
            p.grad = v

    def _adopt(self, k: int) -> None:
        """Make sure segment k's parameters accumulated into the flat buffer (code that replaced
        ``p.grad`` by a new array, or set it to None, is copied back in)."""
        for i in self.layout.segments[k].params:
            p, view = self.layout.params[i], self._grad_views[i]
            if p.grad is not view:
                view[...] = 0 if p.grad is None else p.grad
                p.grad = view

    def _launch(self, k: int, overlap: bool) -> None:
        self._adopt(k)
        self._sync_segment(k, overlap)

    def sync_grads(self) -> None:
        """Make every rank's gradients the gradient of the serial global-batch loss."""
        if self.microbatches is None and self._backwards:
            self.microbatches = max(self._backwards.values())
        overlap = self.bucket_mb > 0
        while self._next >= 0:
            self._launch(self._next, overlap)
            self._next -= 1
        for req in self._pending:
            req.wait()
        self._after_sync()
        self._reset_step()

    def _sync_segment(self, k: int, overlap: bool) -> None:
        raise NotImplementedError

    def _after_sync(self) -> None:
        raise NotImplementedError


class DataParallel(GradSync):
    """Plain data parallelism (ZeRO stage 0): allreduce of all gradients (one call, or one per
    bucket), every replica keeps the full parameters, gradients and optimizer state."""

    zero = 0

    def __init__(self, params, mesh, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, bucket_mb: float = 0.0,
                 microbatches: int | None = None):
        super().__init__(params, mesh, bucket_mb, microbatches)
        self.optimizer = make_optimizer(optimizer, self.params, lr, weight_decay)
        self.flat_grad = backend.xp().zeros(self.layout.total, dtype=self.dtype)
        self._bind_grads(self.flat_grad)

    def zero_grad(self) -> None:
        self.flat_grad.fill(0)
        self._bind_grads(self.flat_grad)
        self._reset_step()

    def materialize(self) -> None:
        """Make every Param hold its full (tp-local) data and gradient; ZeRO-3 gathers here."""

    def release(self) -> None:
        """Undo ``materialize`` (ZeRO-3 frees the gathered parameters again)."""

    def _sync_segment(self, k: int, overlap: bool) -> None:
        seg = self.layout.segments[k]
        buf = self.flat_grad[seg.start:seg.start + seg.size]
        if overlap:
            self._pending.append(self.mesh.dp.iallreduce_(buf))
        else:
            self.mesh.dp.allreduce_(buf)

    def _after_sync(self) -> None:
        sync_tp_partial_grads(self.params, self.mesh.tp)

    def grad_sq(self) -> float:
        """This rank's share of the global squared gradient norm (summed over the world later):
        replicas hold identical gradients, so only dp rank 0 contributes."""
        if self.mesh.dp_rank != 0:
            return 0.0
        return local_grad_sq(self.params, self.mesh.tp_rank)

    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        if clip_coef != 1.0:
            self.flat_grad *= clip_coef
        self.optimizer.step(lr)

    def memory(self) -> dict:
        """Bytes this rank keeps across steps: parameters, the flat gradient, optimizer state."""
        return {
            "params": sum(int(p.data.nbytes) for p in self.params),
            "grads": int(self.flat_grad.nbytes),
            "optimizer": self.optimizer.state_bytes(),
        }
