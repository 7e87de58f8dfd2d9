"""Local SGD (periodic model averaging): every rank steps its own copy, the copies meet every H.

Between synchronous data parallelism (average the *gradients* every step) and a parameter
server (never wait) sits local SGD (Zinkevich et al. 2010; Lin et al. 2020, "Don't use large
mini-batches, use local SGD"): each rank trains its own copy of the model on its own batches
with no communication at all, and every ``H`` steps the ranks average their *weights* with one
allreduce. ``H = 1`` with plain SGD is synchronous data parallelism again: the average of
``w - lr g_i`` is ``w - lr mean(g_i)`` (equal up to the order of the additions); a large ``H``
communicates ``H`` times less, and lets the copies drift apart in between.
"""

from __future__ import annotations

import time
from typing import Callable

from minipar.dist.comm import Comm
from minipar.parallel.param_server import GradFn, RankTimes, Update, lr_for


def run_local_sgd(comm: Comm, weights, grad_fn: GradFn, steps: int, lr,
                  sync_every: int, delay: Callable[[float], float] | None = None,
                  optimizer: str = "sgd", on_update: Callable | None = None) -> tuple:
    """Collective over ``comm``: ``optimizer`` steps on this rank's copy of ``weights`` (the
    same flat array on every rank at the start), the copies averaged over the ranks every
    ``sync_every`` steps and after the last. Returns (the averaged weights, this rank's losses,
    its RankTimes). ``on_update(batches, weights)`` sees the averaged weights at each meeting."""
    if sync_every < 1:
        raise ValueError(f"--sync-every must be >= 1, got {sync_every}")
    w = weights.copy()  # (size,) this rank's own copy
    update = Update(optimizer, w.size, w.dtype, n_workers=1)  # its own state, its own steps
    losses, times = [], RankTimes()
    for step in range(steps):
        t0 = time.perf_counter()
        loss, grad = grad_fn(comm.rank, step, w)
        if delay is not None:  # a straggler: its compute takes `factor` times longer
            time.sleep(delay(time.perf_counter() - t0))
        update(w, grad, lr_for(lr, step))  # lr: a rate, or a schedule of the step
        losses.append(float(loss))
        times.busy_s += time.perf_counter() - t0
        if (step + 1) % sync_every == 0 or step + 1 == steps:
            t1 = time.perf_counter()
            comm.allreduce_(w, op="avg")  # the copies meet: every rank now holds the mean
            times.wait_s += time.perf_counter() - t1
            if on_update is not None:  # batches consumed so far, over all ranks
                on_update((step + 1) * comm.size, w)
    return w, losses, times


def run_sync_sgd(comm: Comm, weights, grad_fn: GradFn, steps: int, lr,
                 delay: Callable[[float], float] | None = None, optimizer: str = "sgd",
                 on_update: Callable | None = None) -> tuple:
    """Synchronous data parallelism on the same terms, for comparison: every step the ranks
    average their *gradients* (one allreduce, the slowest rank sets the pace), then all take
    the same step. Returns (weights, this rank's losses, its RankTimes)."""
    w = weights.copy()  # (size,) identical on every rank, step after step
    update = Update(optimizer, w.size, w.dtype, n_workers=1)
    losses, times = [], RankTimes()
    for step in range(steps):
        t0 = time.perf_counter()
        loss, grad = grad_fn(comm.rank, step, w)
        if delay is not None:
            time.sleep(delay(time.perf_counter() - t0))
        t1 = time.perf_counter()
        comm.allreduce_(grad, op="avg")  # wait for everyone, then the mean gradient
        t2 = time.perf_counter()
        update(w, grad, lr_for(lr, step))  # lr: a rate, or a schedule of the step
        losses.append(float(loss))
        times.busy_s += (t1 - t0) + (time.perf_counter() - t2)
        times.wait_s += t2 - t1
        if on_update is not None:  # batches consumed so far, over all ranks
            on_update((step + 1) * comm.size, w)
    return w, losses, times
