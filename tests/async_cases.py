"""Asynchronous-training test bodies, shared by the thread world and the mpirun tests.

The replica is a least-squares problem with a closed-form gradient, so each property is checked
against a computation written out here in plain NumPy, independently of minipar's messaging:
worker ``w`` at step ``k`` has a batch (A, b) and loss 0.5 / n * ||A x - b||^2, whose gradient
is A^T (A x - b) / n.
"""

from __future__ import annotations

import numpy

from minipar import backend
from minipar.parallel.local_sgd import run_local_sgd, run_sync_sgd
from minipar.parallel.param_server import replay_reference, run_parameter_server

SIZE, ROWS = 7, 5


def batch(worker: int, step: int) -> tuple:
    rng = numpy.random.default_rng(1000 * worker + step)
    return rng.standard_normal((ROWS, SIZE)), rng.standard_normal(ROWS)


def grad_fn(worker: int, step: int, x):
    a, b = batch(worker, step)
    r = a @ backend.to_host(x) - b  # (ROWS,)
    return 0.5 * float(r @ r) / ROWS, backend.from_host(a.T @ r / ROWS)


def start() -> numpy.ndarray:
    return numpy.random.default_rng(7).standard_normal(SIZE)


def sync_sgd(workers: int, steps: int, lr: float) -> numpy.ndarray:
    """Synchronous data parallelism with plain SGD, written out: mean gradient every step."""
    x = start()
    for k in range(steps):
        g = sum(grad_fn(w, k, x)[1] for w in range(workers)) / workers
        x = x - lr * backend.to_host(g)
    return x


def hand_replay(lr: float) -> numpy.ndarray:
    """Two workers, one step each, both pulled before either pushes: worker 1's gradient is
    one update stale. Order: pull 0, pull 1, push 0, push 1."""
    x0 = start()
    x1 = x0 - lr / 2 * backend.to_host(grad_fn(0, 0, x0)[1])
    return x1 - lr / 2 * backend.to_host(grad_fn(1, 0, x0)[1])  # computed on x0: stale


HAND_ORDER = [("pull", 0), ("pull", 1), ("push", 0), ("push", 1)]


def ps_case(comm, steps: int, lr: float, servers: int, staleness, order=None,
            staleness_lr: bool = False, optimizer: str = "sgd"):
    w0 = backend.from_host(start())
    final, result = run_parameter_server(comm, w0, grad_fn, steps, lr, n_servers=servers,
                                         staleness=staleness, order=order,
                                         staleness_lr=staleness_lr, optimizer=optimizer)
    return backend.to_host(final), result


def local_sgd_case(comm, steps: int, lr: float, sync_every: int):
    w, losses, _ = run_local_sgd(comm, backend.from_host(start()), grad_fn, steps, lr,
                                 sync_every)
    return backend.to_host(w)


def local_sgd_reference(workers: int, steps: int, lr: float, sync_every: int) -> numpy.ndarray:
    copies = [start() for _ in range(workers)]
    for k in range(steps):
        copies = [x - lr * backend.to_host(grad_fn(w, k, x)[1]) for w, x in enumerate(copies)]
        if (k + 1) % sync_every == 0 or k + 1 == steps:
            mean = sum(copies) / workers
            copies = [mean.copy() for _ in range(workers)]
    return copies[0]


def reference_of(order: list, workers: int, lr: float, staleness_lr: bool = False,
                 optimizer: str = "sgd"):
    return backend.to_host(replay_reference(backend.from_host(start()), grad_fn, order, workers,
                                            lr, staleness_lr, optimizer))


def sync_case(comm, steps: int, lr: float):
    w, _, _ = run_sync_sgd(comm, backend.from_host(start()), grad_fn, steps, lr)
    return backend.to_host(w)
