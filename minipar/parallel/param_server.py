"""Asynchronous data parallelism: a parameter server, with or without a bound on staleness.

Synchronous data parallelism (``data.py``) waits every step until every replica's gradient is in:
the slowest rank sets the pace. A parameter server (Dean et al. 2012, "Downpour SGD"; Li et al.
2014) drops that barrier. Ranks ``0 .. S-1`` are servers, each owning a contiguous shard of the
flat parameter vector; the other ranks are workers, and each loops on its own:

    pull   ask every server for its shard of the current weights (and its version)
    compute a gradient on the worker's own batch
    push   send each server its shard of the gradient

A server applies each gradient the moment it arrives, to whatever weights it holds by then: the
gradient may have been computed on weights several updates old. Its *staleness* is the number
of updates applied between the pull it was computed on and its push (Hogwild-style; Recht et al.
2011). A fast worker simply does more updates; nobody waits for the slowest.

Bounded staleness (stale-synchronous parallel, Ho et al. 2013): a server answers a worker's pull
for its step ``c`` only once ``c - min(clocks) <= s``, where a worker's clock counts the
gradients it has pushed. ``s = 0`` is synchronous training again (every pull of step c waits for
every push of step c - 1); no bound is the plain parameter server. Staleness-aware learning rates
(Zhang et al. 2016) divide the step by ``1 + staleness``.

Every message is explicit point-to-point: a worker sends a 3-integer header ``[kind, step,
version]`` (tag ``TAG_HEADER``) and, for a push, the gradient shard (``TAG_GRAD``); the server
receives headers from whichever worker sent first (``recv_any``, MPI_ANY_SOURCE) and replies with
the version and the weights shard (``TAG_VERSION``, ``TAG_WEIGHTS``). The server applies
``w -= lr * g / W`` for W workers, so with ``s = 0`` and plain SGD a round of W pushes is one
synchronous step on the W workers' batches (equal up to the order of the W additions).

Determinism: the order in which pushes arrive depends on timing, so a free run cannot be
repeated. Server 0 records the order it handled pulls and pushes (``ServerResult.order``); a run
given such an ``order`` (*replay*) makes every server handle exactly those events in exactly that
sequence, and ``replay_reference`` computes, in one process, what that sequence must produce.
The two are equal bit for bit, which is what the tests check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy

from minipar import backend
from minipar.dist.algorithms import chunk_bounds
from minipar.dist.comm import Comm, CommError
from minipar.nn.optim import adamw_update

TAG_HEADER, TAG_GRAD, TAG_VERSION, TAG_WEIGHTS = 40, 41, 42, 43
PULL, PUSH, DONE = 0, 1, 2
KIND_NAMES = {PULL: "pull", PUSH: "push"}

# grad_fn(worker, step, weights) -> (loss, gradient): worker ``worker``'s batch of step ``step``.
GradFn = Callable[[int, int, object], tuple]


@dataclass(frozen=True)
class Roles:
    """Who is who in a parameter-server world, and how the flat parameters are cut."""

    n_servers: int
    n_workers: int
    size: int  # flat parameter count

    def bounds(self, server: int) -> tuple[int, int]:
        piece = chunk_bounds(self.size, self.n_servers)[server]
        return piece.start, piece.stop

    def rank_of_worker(self, worker: int) -> int:
        return self.n_servers + worker


@dataclass
class RankTimes:
    """Seconds a rank spent working (compute, applying updates) and waiting for messages."""

    busy_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class ServerResult:
    order: list = field(default_factory=list)  # [(kind name, worker)] as handled (server 0)
    staleness: list = field(default_factory=list)  # each push's staleness, in handling order
    times: RankTimes = field(default_factory=RankTimes)


@dataclass
class WorkerResult:
    losses: list = field(default_factory=list)  # this worker's loss at each of its steps
    versions: list = field(default_factory=list)  # the version each gradient was computed on
    times: RankTimes = field(default_factory=RankTimes)


def check_order(order: list, n_workers: int, budget: int) -> None:
    """A replay order gives each worker pull, push, pull, push ... (ending on a push), and
    ``budget`` pushes in all."""
    pulled = [False] * n_workers  # does the worker hold an unanswered pull?
    for i, (kind, w) in enumerate(order):
        if not 0 <= w < n_workers or kind not in ("pull", "push"):
            raise CommError(f"replay order: event {i} {(kind, w)} names no worker/kind")
        if (kind == "pull") == pulled[w]:
            raise CommError(f"replay order: event {i} is a {kind} of worker {w}, which "
                            f"must {'push' if pulled[w] else 'pull'} next")
        pulled[w] = kind == "pull"
    pushes = sum(kind == "push" for kind, _ in order)
    if any(pulled) or pushes != budget:
        raise CommError(f"replay order: needs {budget} pushes, each after its pull; it has "
                        f"{pushes}")


def lr_for(lr, sync_step: int) -> float:
    """``lr`` as given, or, for a schedule ``lr(step)``, its rate at synchronous step
    ``sync_step`` (a server counts ``workers`` updates as one step)."""
    return lr(sync_step) if callable(lr) else lr


class Update:
    """How a gradient changes a flat vector of weights: plain SGD, or AdamW with its own moment
    state (a server keeps it for its shard; a local-SGD rank for its copy). The gradient of one
    worker's batch is divided by the ``n_workers`` whose batches make up one synchronous step."""

    def __init__(self, kind: str, size: int, dtype, n_workers: int) -> None:
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"--optimizer {kind!r}: asynchronous modes support sgd or adamw")
        self.kind, self.n_workers, self.steps = kind, n_workers, 0
        if kind == "adamw":
            xp = backend.xp()
            self.m, self.v = xp.zeros(size, dtype=dtype), xp.zeros(size, dtype=dtype)  # (size,)

    def __call__(self, w, grad, lr: float) -> None:
        self.steps += 1
        if self.kind == "sgd":
            w -= (lr / self.n_workers) * grad  # (size,)
        else:
            adamw_update(w, grad / self.n_workers, self.m, self.v, lr=lr, beta1=0.9, beta2=0.999,
                         eps=1e-8, weight_decay=0.0, step=self.steps)


class Server:
    """One server rank: owns ``shard`` (updated in place) and answers workers' messages.

    With a staleness bound ``s``, a read (pull) of step ``c`` must see every update of the steps
    before ``c - s`` and none of step ``c + s`` or later (Ho et al. 2013's window), so the server
    holds a pull until the first is true and holds a received push of step ``c'`` until every
    worker has read step ``c' - s``. With ``s = 0`` every step-c gradient is computed on exactly
    the weights after all step-(c-1) updates: synchronous SGD.
    """

    def __init__(self, comm: Comm, roles: Roles, shard, lr, staleness: int | None = None,
                 staleness_lr: bool = False, optimizer: str = "sgd",
                 on_update: Callable | None = None, budget: int | None = None) -> None:
        self.comm, self.roles, self.shard = comm, roles, shard
        self.budget = budget  # server 0 only: pulls to answer in all, then STOP
        self.on_update = on_update  # called with (updates applied, shard) after each update
        self.update = Update(optimizer, shard.size, shard.dtype, roles.n_workers)
        self.lr, self.bound, self.staleness_lr = lr, staleness, staleness_lr
        self.version = 0  # updates applied so far
        self.applied = [0] * roles.n_workers  # each worker's updates applied
        self.read = [0] * roles.n_workers  # each worker's pulls answered
        self.stopped: set[int] = set()  # workers told to stop: they read and push no more
        self.pulls: list[int] = []  # workers whose pull waits for the bound
        self.pushes: list[tuple] = []  # (worker, step, version, grad) waiting for the bound
        self.sends: list = []  # replies in flight (the shard changes under them: copies)
        self.result = ServerResult()

    def run(self, order: list | None = None) -> ServerResult:
        """Serve until every worker is done. A free run handles messages as they arrive; a
        replay handles the events of ``order`` in sequence (then the workers' DONEs)."""
        expected = list(order or ()) + [("done", w) for w in range(self.roles.n_workers)]
        done = 0
        while done < self.roles.n_workers:
            t0 = time.perf_counter()
            if order is None:
                header, src = self.comm.recv_any((3,), "int64", TAG_HEADER)
            else:  # replay: the next prescribed event's worker, and no other
                want, w = expected[len(self.result.order) + done]
                src = self.roles.rank_of_worker(w)
                header = self.comm.recv((3,), "int64", src, TAG_HEADER)
            self.result.times.wait_s += time.perf_counter() - t0
            kind, step, version = (int(v) for v in backend.to_host(header))
            worker = src - self.roles.n_servers
            if kind == PULL and self._spent():  # the budget is used up: this worker stops
                self._stop(worker)
            elif order is not None and KIND_NAMES.get(kind, "done") != want:
                raise CommError(f"replay diverged: worker {worker} sent a "
                                f"{KIND_NAMES.get(kind, 'done')} where the order has a {want}")
            elif kind == DONE:
                done += 1
                self.stopped.add(worker)  # (servers other than 0 learn it here)
            elif kind == PULL:
                self.pulls.append(worker)
            else:
                grad = self.comm.recv(self.shard.shape, self.shard.dtype, src, TAG_GRAD)
                self.pushes.append((worker, step, version, grad))
            self._release(bounded=order is None)  # a replay's order obeys its bound already
        for request in self.sends:
            request.wait()
        return self.result

    def _spent(self) -> bool:
        return self.budget is not None and sum(self.read) >= self.budget

    def _stop(self, worker: int) -> None:
        self.stopped.add(worker)
        stop = backend.from_host(numpy.array([-1], dtype=numpy.int64))
        self.sends.append(self.comm.isend(stop, self.roles.rank_of_worker(worker), TAG_VERSION))

    def _release(self, bounded: bool) -> None:
        """Answer the pulls and apply the pushes the bound allows, until nothing changes."""
        s = self.bound if bounded else None
        progress = True
        while progress:
            progress = False
            active = [w for w in range(self.roles.n_workers) if w not in self.stopped]
            slowest_applied = min((self.applied[w] for w in active), default=1 << 60)
            slowest_read = min((self.read[w] for w in active), default=1 << 60)
            for worker in list(self.pulls):
                if self._spent():
                    self.pulls.remove(worker)
                    self._stop(worker)
                    progress = True
                elif s is None or slowest_applied >= self.read[worker] - s:
                    self.pulls.remove(worker)
                    self._answer(worker)
                    progress = True
            for push in list(self.pushes):
                if s is None or slowest_read >= push[1] - s + 1:
                    self.pushes.remove(push)
                    self._apply(*push)
                    progress = True

    def _answer(self, worker: int) -> None:
        self.read[worker] += 1
        self.result.order.append(("pull", worker))  # recorded when answered: what it reads
        dest = self.roles.rank_of_worker(worker)
        version = backend.from_host(numpy.array([self.version], dtype=numpy.int64))
        self.sends.append(self.comm.isend(version, dest, TAG_VERSION))
        self.sends.append(self.comm.isend(self.shard.copy(), dest, TAG_WEIGHTS))

    def _apply(self, worker: int, step: int, version: int, grad) -> None:
        t0 = time.perf_counter()
        stale = self.version - version
        lr = lr_for(self.lr, self.version // self.roles.n_workers)
        self.update(self.shard, grad, lr / (1 + stale) if self.staleness_lr else lr)
        self.version += 1
        self.applied[worker] += 1
        self.result.order.append(("push", worker))
        self.result.staleness.append(stale)
        self.result.times.busy_s += time.perf_counter() - t0
        if self.on_update is not None:
            self.on_update(self.version, self.shard)


class Worker:
    """One worker rank: pull, compute, push until server 0 says STOP; ``delay`` slows its
    compute."""

    def __init__(self, comm: Comm, roles: Roles, worker: int, grad_fn: GradFn, dtype,
                 delay: Callable[[float], float] | None = None) -> None:
        self.comm, self.roles, self.worker = comm, roles, worker
        self.grad_fn, self.dtype, self.delay = grad_fn, dtype, delay
        self.result = WorkerResult()

    def _header(self, kind: int, step: int, version: int):
        return backend.from_host(numpy.array([kind, step, version], dtype=numpy.int64))

    def pull(self, step: int) -> tuple | None:
        """The current weights and each server's version, or None when server 0 says STOP."""
        self.comm.send(self._header(PULL, step, -1), 0, TAG_HEADER)
        first = int(backend.to_host(self.comm.recv((1,), "int64", 0, TAG_VERSION))[0])
        if first < 0:
            return None
        for k in range(1, self.roles.n_servers):
            self.comm.send(self._header(PULL, step, -1), k, TAG_HEADER)
        pieces, versions = [], []
        for k in range(self.roles.n_servers):
            lo, hi = self.roles.bounds(k)
            if k:
                versions.append(
                    int(backend.to_host(self.comm.recv((1,), "int64", k, TAG_VERSION))[0]))
            else:
                versions.append(first)
            pieces.append(self.comm.recv((hi - lo,), self.dtype, k, TAG_WEIGHTS))
        return backend.xp().concatenate(pieces), versions  # (size,)

    def push(self, step: int, grad, versions: list) -> None:
        for k in range(self.roles.n_servers):
            lo, hi = self.roles.bounds(k)
            self.comm.send(self._header(PUSH, step, versions[k]), k, TAG_HEADER)
            self.comm.send(grad[lo:hi], k, TAG_GRAD)

    def run(self) -> WorkerResult:
        """Pull, compute, push until server 0 says the budget of updates is spent."""
        t, step = self.result.times, 0
        while True:
            t0 = time.perf_counter()
            pulled = self.pull(step)
            t1 = time.perf_counter()
            t.wait_s += t1 - t0
            if pulled is None:
                break
            weights, versions = pulled
            loss, grad = self.grad_fn(self.worker, step, weights)
            t2 = time.perf_counter()
            if self.delay is not None:  # a straggler: its compute takes `factor` times longer
                time.sleep(self.delay(t2 - t1))
            t3 = time.perf_counter()
            self.push(step, grad, versions)
            t.wait_s += time.perf_counter() - t3
            t.busy_s += t3 - t1
            self.result.losses.append(float(loss))
            self.result.versions.append(versions[0])
            step += 1
        for k in range(self.roles.n_servers):
            self.comm.send(self._header(DONE, step, -1), k, TAG_HEADER)
        return self.result


def run_parameter_server(comm: Comm, weights, grad_fn: GradFn, steps: int, lr,
                         n_servers: int = 1, staleness: int | None = None,
                         staleness_lr: bool = False, order: list | None = None,
                         delay: Callable[[float], float] | None = None,
                         optimizer: str = "sgd", on_update: Callable | None = None) -> tuple:
    """Collective over ``comm``: train ``weights`` (the same flat array on every rank) with
    ``steps x workers`` updates in all, as many as ``steps`` synchronous steps make; a fast
    worker makes more of them than a slow one. Returns (final weights on every rank, this
    rank's result).
    With one server, ``on_update(updates, weights)`` sees the weights after each update."""
    if not 1 <= n_servers < comm.size:
        raise CommError(f"--servers {n_servers}: needs 1 <= servers < ranks ({comm.size}), "
                        "so that at least one rank is a worker")
    roles = Roles(n_servers, comm.size - n_servers, int(weights.size))
    budget = steps * roles.n_workers  # updates in all: as many as synchronous steps would make
    if order is not None:
        check_order(order, roles.n_workers, budget)
    if comm.rank < n_servers:
        lo, hi = roles.bounds(comm.rank)
        shard = weights[lo:hi].copy()  # (n_shard,)
        server = Server(comm, roles, shard, lr, staleness, staleness_lr, optimizer,
                        on_update if n_servers == 1 else None,  # a whole model on one server
                        budget if comm.rank == 0 else None)
        result = server.run(order)
        mine = backend.to_host(shard)
    else:
        worker = Worker(comm, roles, comm.rank - n_servers, grad_fn, weights.dtype, delay)
        result = worker.run()
        mine = None
    pieces = comm.allgather_obj(mine)  # the one collective: assemble the servers' shards
    final = backend.from_host(numpy.concatenate([p for p in pieces[:n_servers]]))
    return final, result


def replay_reference(weights, grad_fn: GradFn, order: list, n_workers: int, lr,
                     staleness_lr: bool = False, optimizer: str = "sgd"):
    """What a parameter-server run handling ``order`` computes, in one process and one loop:
    each pull snapshots the weights, each push applies the gradient of that snapshot."""
    w = weights.copy()  # (size,)
    update = Update(optimizer, w.size, w.dtype, n_workers)
    snapshot: dict[int, tuple] = {}
    steps = [0] * n_workers
    version = 0
    for kind, worker in order:
        if kind == "pull":
            snapshot[worker] = (w.copy(), version)
            continue
        seen, seen_version = snapshot.pop(worker)
        _, grad = grad_fn(worker, steps[worker], seen)
        rate = lr_for(lr, version // n_workers)
        update(w, grad, rate / (1 + version - seen_version) if staleness_lr else rate)
        version += 1
        steps[worker] += 1
    return w
