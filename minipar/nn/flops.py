"""Forward FLOPs counted as the kernels run: how recomputation's extra work is measured.

The forward kernels (``functional.linear_fwd``, ``functional.attention_fwd``, the blockwise
attention) each report the multiply-add FLOPs of their matrix products (2 m k n per product)
with ``add``; ``counting()`` collects them for the calling thread. A training step run inside
``counting()`` gives the forward FLOPs it actually executed, recomputed forwards included, so
recomputation's cost is read off the kernels, not assumed (the tests compare it with
``minipar.sim.costmodel``'s formulas). Only the rank's own thread counts: kernels report once,
from the thread that called them, before they hand rows to worker threads.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

_local = threading.local()


def add(n: int) -> None:
    """Record ``n`` forward FLOPs if this thread is counting (a no-op otherwise)."""
    tally = getattr(_local, "tally", None)
    if tally is not None:
        tally[0] += n


@contextmanager
def counting():
    """Count the forward FLOPs this thread's kernels run inside the block: yields a one-item
    list whose item is the running total (read it after the block)."""
    saved = getattr(_local, "tally", None)
    _local.tally = [0]
    try:
        yield _local.tally
    finally:
        inner = _local.tally[0]
        _local.tally = saved
        if saved is not None:  # nested: the outer count includes the inner one
            saved[0] += inner


__all__ = ["add", "counting"]
