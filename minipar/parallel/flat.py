"""Where parameters live in one flat buffer, and the segments it is synced in.

Data parallelism syncs gradients as one contiguous buffer: each ``Param.grad`` is a view into it
(as PyTorch DDP's gradient-as-bucket-view, Li et al. 2020), so a collective on the buffer needs
no copy. ``FlatLayout`` says where each parameter sits in that buffer and cuts it into
*segments*, the pieces synced by one collective each: the buckets of overlapped data
parallelism, and under ZeRO the pieces every dp rank owns 1/dp of (ZeRO-3: one segment per
unit, so a unit can be gathered by itself). The cost model (``minipar.sim.comm_volume``) builds
the same layouts from parameter counts alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

from minipar import backend
from minipar.dist.algorithms import chunk_bounds

MIB = 2 ** 20  # bucket_mb counts MiB, as the cost model (minipar.sim.comm_volume) does


def bucket_count(nbytes: int, bucket_mb: float, most: int) -> int:
    """How many segments a buffer of ``nbytes`` is cut into: ceil(nbytes / bucket), 1..most."""
    if bucket_mb <= 0:
        return 1
    return max(1, min(most, math.ceil(nbytes / (bucket_mb * MIB))))


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

    @property
    def span(self) -> slice:
        """The segment's elements of the flat buffer."""
        return slice(self.start, self.start + self.size)


class FlatLayout:
    """The offset of every parameter in one flat (padded) buffer, and its segments.

    ``contiguous``: parameters back to back in the given order; sharded, the buffer is padded at
    the end to a multiple of dp. ``segmented``: one segment per given list of parameters, each
    padded on its own (ZeRO-3's units, so a unit can be gathered by itself).
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
        """``params`` back to back, cut into ``n_segments`` near-equal segments."""
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
    def segmented(cls, param_lists: list[list], dp: int, rank: int) -> "FlatLayout":
        """One segment per list of parameters, each padded to a multiple of dp."""
        params, offsets, spans, start = [], [], [], 0
        for plist in param_lists:
            offset = start
            for p in plist:
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

    def bind_grads(self, flat) -> list:
        """Make every parameter's ``.grad`` its view of ``flat``; returns the views."""
        views = [self.view(flat, i) for i in range(len(self.params))]
        for p, v in zip(self.params, views):
            p.grad = v
        return views

    def adopt_grads(self, views: list, indices) -> None:
        """Copy back into their views the gradients of parameters ``indices`` whose ``.grad``
        code replaced by a new array (or set to None) since ``bind_grads``."""
        for i in indices:
            p, view = self.params[i], views[i]
            if p.grad is not view:
                view[...] = 0 if p.grad is None else p.grad
                p.grad = view

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
