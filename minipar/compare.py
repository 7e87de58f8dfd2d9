"""Parallel == serial: run the same training on any layout and compare it with one rank.

The heart of minipar's tests. ``train_layout`` is a collective: every rank of ``world`` calls it
(threads of ``run_threads`` in-process, or the processes of ``mpirun``), and every rank gets back
the losses of each step, the full (gathered, unsharded) parameters after the last step and the
full gradients of the last step. Because initialisation is layout-independent, the serial run is
the same call on a world of one, and the two results can be compared number for number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from minipar.config import ModelConfig, ParallelConfig
from minipar.tasks import IGNORE


@dataclass
class RunResult:
    losses: list = field(default_factory=list)  # global mean loss of each step
    params: dict = field(default_factory=dict)  # name -> full parameter after the last step
    grads: dict = field(default_factory=dict)  # name -> full gradient of the last step
    comm: list = field(default_factory=list)  # per step: {group: {op: stats}} seen by this rank
    initial: dict = field(default_factory=dict)  # name -> full parameter before the first step


def random_batches(cfg: ModelConfig, steps: int, batch: int, seed: int = 0,
                   ignore_fraction: float = 0.2) -> list[tuple[numpy.ndarray, numpy.ndarray]]:
    """Random token batches, some targets ignored, the same for every rank and layout."""
    rng = numpy.random.default_rng(seed)
    out = []
    for _ in range(steps):
        x = rng.integers(0, cfg.vocab_size, (batch, cfg.seq_len))
        y = rng.integers(0, cfg.vocab_size, (batch, cfg.seq_len))
        y[rng.random((batch, cfg.seq_len)) < ignore_fraction] = IGNORE
        y[:, -1] = rng.integers(0, cfg.vocab_size, batch)  # never a batch with nothing scored
        out.append((x, y))
    return out


def train_layout(world, cfg: ModelConfig, par: ParallelConfig, batches, *, seed: int = 0,
                 dtype: str = "float64", lr: float = 1e-2, optimizer: str = "adamw",
                 weight_decay: float = 0.01, grad_clip: float = 1.0,
                 precision: str | None = None, loss_scale: float = 2.0 ** 16,
                 loss_scale_window: int = 200, init: dict | None = None,
                 freeze: tuple[str, ...] = ()) -> RunResult:
    """Train on ``batches`` (global batches) with layout ``par``; collective over ``world``.

    Fine-tuning: ``init`` (full tensors by name, as a checkpoint holds them) replaces the seed's
    weights before the first step; ``freeze`` names parameter prefixes that are not trained.
    """
    from minipar.dist.mesh import Mesh
    from minipar.engine import Engine

    mesh = Mesh(world, dp=par.dp, pp=par.pp, tp=par.tp, cp=par.cp)
    engine = Engine(cfg, par, mesh, seed=seed, dtype=dtype, optimizer=optimizer, lr=lr,
                    weight_decay=weight_decay, grad_clip=grad_clip, precision=precision,
                    loss_scale=loss_scale, loss_scale_window=loss_scale_window, freeze=freeze)
    if init is not None:
        engine.init_weights(init)
    result = RunResult()
    if init is not None or freeze:  # a collective: only the fine-tuning tests look at it
        result.initial = engine.full_params()
    for x, y in batches:
        rows = len(x) // par.dp
        lo = mesh.dp_rank * rows
        mesh.reset_stats()
        step = engine.train_step(x[lo:lo + rows], y[lo:lo + rows], int((y != IGNORE).sum()))
        result.comm.append(mesh.stats())
        result.losses.append(step.loss)
    result.params = engine.full_params()
    result.grads = engine.full_params(grads=True)
    return result


def serial_reference(cfg: ModelConfig, batches, **kw) -> RunResult:
    """The same training on one rank (microbatches 1, no parallelism)."""
    from minipar.dist.comm import local_comm

    return train_layout(local_comm(), cfg, ParallelConfig(), batches, **kw)


def mismatches(result: RunResult, reference: RunResult, rtol: float) -> list[str]:
    """Human-readable differences beyond ``rtol`` (relative to each tensor's largest entry)."""
    bad = []
    loss, ref = numpy.asarray(result.losses), numpy.asarray(reference.losses)
    if loss.shape != ref.shape or not numpy.allclose(loss, ref, rtol=rtol, atol=0):
        bad.append(f"losses {loss.tolist()} != serial {ref.tolist()}")
    for kind in ("params", "grads"):
        mine, theirs = getattr(result, kind), getattr(reference, kind)
        if sorted(mine) != sorted(theirs):
            bad.append(f"{kind}: names differ: {sorted(set(mine) ^ set(theirs))}")
            continue
        for name in theirs:
            # float64, so that 16-bit results (bfloat16, float16) compare exactly
            a = numpy.asarray(mine[name]).astype(numpy.float64)
            b = numpy.asarray(theirs[name]).astype(numpy.float64)
            if a.shape != b.shape:
                bad.append(f"{kind} {name}: shape {a.shape} != serial {b.shape}")
                continue
            # fp16 gradients overflow under a large loss scale (the step is then skipped): an
            # inf or nan agrees only with the same value at the same place, and the finite
            # entries are compared as usual.
            finite = numpy.isfinite(b)
            if not numpy.array_equal(finite, numpy.isfinite(a)) or not numpy.array_equal(
                    a[~finite], b[~finite], equal_nan=True):
                bad.append(f"{kind} {name}: its infs or nans differ from the serial run's")
                continue
            a, b = a[finite], b[finite]
            scale = max(float(numpy.abs(b).max(initial=0.0)), 1e-30)
            err = float(numpy.abs(a - b).max(initial=0.0)) / scale
            if err > rtol:
                bad.append(f"{kind} {name}: max relative difference {err:.2e} > {rtol:.0e}")
    return bad


def layout_mismatches(cfg: ModelConfig, par: ParallelConfig, rows: int, seed: int,
                      steps: int = 2, rtol: float = 1e-9) -> dict[int, list[str]]:
    """The property every layout test states, in one place: train ``steps`` random global
    batches (``rows`` sequences per microbatch per dp rank) on ``par`` in a thread world and on
    one rank; returns each rank's differences from the serial run (all empty when equal)."""
    from minipar.dist.comm import run_threads

    batches = random_batches(cfg, steps, par.dp * par.microbatches * rows, seed=seed)
    reference = serial_reference(cfg, batches, seed=seed)
    results = run_threads(lambda w: train_layout(w, cfg, par, batches, seed=seed), par.world)
    return {rank: bad for rank, r in enumerate(results) if (bad := mismatches(r, reference, rtol))}
