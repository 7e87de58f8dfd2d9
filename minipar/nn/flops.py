"""Forward FLOPs counted as the kernels run: how recomputation's extra work is measured.

The forward kernels (``functional.linear_fwd``, ``functional.attention_fwd``, the blockwise
attention) each report the FLOPs of their matrix products (2 m k n per product) with ``add``;
``counting()`` collects them for the calling thread: item 0 every forward FLOP, item 1 those run
inside ``recomputing()``, the forwards that activation recomputation reruns in backward. A
training step run inside ``counting()`` gives what it executed, recomputation included, read
off the kernels rather than assumed (the tests compare both with ``minipar.sim.costmodel``).
Only the rank's own thread counts: a kernel reports once, from the thread that called it,
before it hands rows to worker threads.
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
        if getattr(_local, "recomputing", False):
            tally[1] += n


@contextmanager
def counting():
    """Count this thread's forward FLOPs inside the block: yields [forward, recomputed], read
    after the block (a nested count is added to the outer one too)."""
    saved = getattr(_local, "tally", None)
    _local.tally = tally = [0, 0]
    try:
        yield tally
    finally:
        _local.tally = saved
        if saved is not None:
            saved[0] += tally[0]
            saved[1] += tally[1]


@contextmanager
def recomputing():
    """Mark the forward FLOPs inside the block as recomputed (run again in backward)."""
    saved = getattr(_local, "recomputing", False)
    _local.recomputing = True
    try:
        yield
    finally:
        _local.recomputing = saved


__all__ = ["add", "counting", "recomputing"]
