"""Synchronous vs asynchronous training of the GPT over whole replicas: one function per mode.

Each rank holds the whole model (``Replica``: the engine on a 1 x 1 x 1 mesh, seen as a function
of one flat weight vector), and the modes differ only in how the ranks combine what they compute
(``parallel.local_sgd`` and ``parallel.param_server``):

- ``sync``: every step all ranks average their gradients (one allreduce) and take the same step;
- ``ps``: ranks ``0 .. S-1`` serve the weights, the others push gradients whenever they are done;
- ``ssp``: the same with a staleness bound ``s`` (``s = 0`` is synchronous again);
- ``local-sgd``: each rank steps its own copy; the copies are averaged every ``H`` steps.

Worker ``w`` at its step ``k`` trains on rows ``w`` of the ``W`` dp slices of the task's global
batch ``k``, so every mode sees the same data as synchronous data parallelism over the workers.
Snapshots of the weights (with the wall time and update count they were taken at) are kept on
the rank that holds the model's progress (server 0, or rank 0) and evaluated after the run, so
evaluating never slows the run being measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from minipar import backend
from minipar.config import ConfigError, ModelConfig, ParallelConfig
from minipar.dist.comm import Comm
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.parallel.local_sgd import run_local_sgd, run_sync_sgd
from minipar.parallel.param_server import RankTimes, run_parameter_server

MODES = ("sync", "ps", "ssp", "local-sgd")


class Replica:
    """The whole model on this rank, as ``gradient(worker, step, weights) -> (loss, grad)``."""

    def __init__(self, cfg: ModelConfig, task, batch_size: int, n_workers: int, seed: int = 0,
                 dtype: str = "float32") -> None:
        self.engine = Engine(cfg, ParallelConfig(), Mesh.serial(), seed=seed, dtype=dtype)
        self.params = self.engine.params
        self.task, self.batch_size, self.n_workers = task, batch_size, n_workers

    def weights(self):
        """The flat weight vector, parameters in model order (a copy)."""
        return backend.xp().concatenate([p.data.ravel() for p in self.params])  # (size,)

    def load(self, flat) -> None:
        start = 0
        for p in self.params:
            p.data[...] = flat[start:start + p.data.size].reshape(p.data.shape)
            start += p.data.size

    def batch(self, worker: int, step: int) -> tuple:
        return self.task.dp_rows(step, self.batch_size, worker, self.n_workers)

    def gradient(self, worker: int, step: int, weights) -> tuple:
        """The loss and flat gradient of worker ``worker``'s batch at its step ``step``."""
        self.load(weights)
        inputs, targets = self.batch(worker, step)
        loss = self.engine.gradients(inputs, targets, self.task.n_scored(targets), step=step,
                                     first_row=worker * len(inputs))  # dropout: global rows
        return loss, backend.xp().concatenate([p.grad.ravel() for p in self.params])

    def evaluate(self, weights) -> dict:
        self.load(weights)
        return self.engine.evaluate(self.task.eval_batches(self.batch_size))


@dataclass
class ModeResult:
    mode: str
    weights: object  # the final flat weights (the same on every rank)
    losses: list  # this rank's loss per step it computed (none on a server)
    times: RankTimes
    staleness: list = field(default_factory=list)  # per applied push (server 0)
    order: list = field(default_factory=list)  # the pulls and pushes server 0 handled
    snapshots: list = field(default_factory=list)  # (seconds, updates, weights) on the keeper


class Snapshots:
    """Every ``every`` updates, a copy of the weights with the wall time and update count."""

    def __init__(self, every: int, t0: float) -> None:
        self.every, self.t0, self.taken = every, t0, []

    def __call__(self, updates: int, weights) -> None:
        if self.every and updates % self.every == 0:
            self.taken.append((time.perf_counter() - self.t0, updates, weights.copy()))


def run_mode(mode: str, comm: Comm, replica: Replica, steps: int, lr: float, *,
             servers: int = 1, staleness: int | None = None, sync_every: int = 1,
             staleness_lr: bool = False, optimizer: str = "adamw", delay=None, order=None,
             snapshot_every: int = 0) -> ModeResult:
    """Collective over ``comm``: train ``replica`` for ``steps`` steps per worker in ``mode``."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "ssp" and (staleness is None or staleness < 0):
        raise ConfigError("--mode ssp needs --staleness S >= 0 (0 is synchronous)")
    w0 = replica.weights()
    snap = Snapshots(snapshot_every, time.perf_counter())
    if mode in ("ps", "ssp"):
        bound = staleness if mode == "ssp" else None
        keep = snap if comm.rank == 0 else None
        final, result = run_parameter_server(comm, w0, replica.gradient, steps, lr,
                                             n_servers=servers, staleness=bound,
                                             staleness_lr=staleness_lr, order=order,
                                             delay=delay, optimizer=optimizer, on_update=keep)
        return ModeResult(mode, final, getattr(result, "losses", []), result.times,
                          getattr(result, "staleness", []), getattr(result, "order", []),
                          snap.taken)
    keep = snap if comm.rank == 0 else None
    if mode == "sync":
        final, losses, times = run_sync_sgd(comm, w0, replica.gradient, steps, lr, delay,
                                            optimizer, on_update=keep)
    else:
        final, losses, times = run_local_sgd(comm, w0, replica.gradient, steps, lr, sync_every,
                                             delay, optimizer, on_update=keep)
    return ModeResult(mode, final, losses, times, snapshots=snap.taken)


def evaluate_snapshots(replica: Replica, snapshots: list) -> list[tuple]:
    """(seconds, updates, exact match or loss) of each snapshot, evaluated one by one."""
    out = []
    for seconds, updates, weights in snapshots:
        metrics = replica.evaluate(weights)
        out.append((seconds, updates, metrics.get("exact_match", metrics["loss"])))
    return out
